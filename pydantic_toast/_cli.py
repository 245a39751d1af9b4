"""``python -m pydantic_toast``: look after stored records from a shell.

    python -m pydantic_toast --storage URL ping
    python -m pydantic_toast --storage URL stats
    python -m pydantic_toast --storage URL ls User [--limit 20]
    python -m pydantic_toast --storage URL get User 550e8400-...   (or a reference as JSON)
    python -m pydantic_toast --storage URL rm User ID [ID ...]
    python -m pydantic_toast --storage URL purge User --older-than 30d [--dry-run]
    python -m pydantic_toast --storage URL rekey myapp.models:User [--dry-run]
    python -m pydantic_toast --storage URL gc [--roots-from URL ...] [--grace 7d] [--dry-run]

The storage URL may also come from ``PYDANTIC_TOAST_STORAGE`` (kept out of the process list).
``--storage`` and ``--json`` go anywhere on the line, before or after the command. Output is a
table for people, or JSON with ``--json``. A record that cannot be decoded is a warning on
stderr and the listing goes on. Exit status: 0; 1 for an error, a record not found or a
corrupt record; 2 for a usage error.

``gc`` deletes the content-addressed records that no record references (see
`pydantic_toast.collect_garbage`); ``--roots-from`` names other storages whose records hold
references too (given once with several URLs, or several times), ``--grace`` (default 1d) how
long a new value is kept whatever references it.

``ls`` shows the newest 50 records unless given ``--limit`` (``0``: all), and says on stderr
when it left some out.

``--older-than`` and ``--grace`` take a number and a unit: ``s``, ``min``, ``h``, ``d`` or
``w`` (``90min``, ``1.5h``). There is no ``m``: it could mean minutes or months, so it is
refused.

The tool works on records, not models, so it needs no model classes: it talks to the backend
directly. The exception is ``rekey``, which re-encrypts a class's records under its primary key:
the keys belong to the model (its ``keyring``, the one `use_keyring` installs when the module is
imported, or ``PYDANTIC_TOAST_KEYS``), so it takes the class as ``module:Class``, imported from
the current directory.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import sys
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn, TextIO
from uuid import UUID

from pydantic_toast._errors import (
    CorruptRecordError,
    ExternalStorageError,
    StorageValidationError,
    mask_url,
)
from pydantic_toast._gc import _collect
from pydantic_toast._model import ExternalBaseModel
from pydantic_toast._references import parse_id
from pydantic_toast._registry import backend_class_for
from pydantic_toast._rekey import rekey
from pydantic_toast.backends.base import StorageBackend
from pydantic_toast.backends.options import format_duration, parse_duration
from pydantic_toast.backends.records import check_class_name

__all__ = ["main"]


def _duration_argument(text: str, *, allow_zero: bool = False) -> timedelta:
    """`parse_duration`, its error as argparse's (a usage error naming the option)."""
    try:
        return parse_duration(text, allow_zero=allow_zero)
    except StorageValidationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _older_than(text: str) -> timedelta:
    """``30d``, ``12h``, ``90min``, ``45s``, ``2w``, decimals too (``1.5h``); more than zero."""
    return _duration_argument(text)


def _grace(text: str) -> timedelta:
    """A duration as for ``--older-than``, or zero (``0s``): nothing is kept for being new, as
    `collect_garbage` allows."""
    return _duration_argument(text, allow_zero=True)


def _whole_number(text: str, *, least: int) -> int:
    """``text`` as an `int` of at least ``least``, or argparse's usage error naming the option."""
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if number < least:
        raise argparse.ArgumentTypeError(f"must be {least} or more, not {number}")
    return number


def _limit(text: str) -> int:
    """How many records ``ls`` shows: zero for all."""
    return _whole_number(text, least=0)


def _batch_size(text: str) -> int:
    return _whole_number(text, least=1)


class _Parser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` that masks URLs in what it prints.

    argparse quotes the words it could not use in its errors: a storage URL put where it
    does not belong would show its password. ``words`` are the command line's words.
    """

    def __init__(self, *args: Any, words: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.words = words

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.format_usage()}{self.prog}: error: {message}\n")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        super().exit(status, None if message is None else _masked(message, self.words))


def _masked(text: str, words: Iterable[str]) -> str:
    """``text`` with every URL among ``words`` masked by `mask_url`, however it is quoted.

    A message may hold a word whole, or only its tail after an option glued to it
    (``--json=URL``, ``-hURL``), plain or escaped by `repr`: every tail that still holds
    the word's ``://`` (or, without one, its ``@``) is masked, longest first.
    """
    for word in words:
        start = word.find("://") if "://" in word else word.find("@")
        for tail in (word[i:] for i in range(start + 1)):
            masked = mask_url(tail)
            if masked != tail:
                text = text.replace(tail, masked).replace(repr(tail)[1:-1], masked)
    return text


def _parser(words: Sequence[str]) -> _Parser:
    # --storage and --json belong to the main parser and to every command's, so they may go
    # before or after the command. Left out of the namespace unless given (SUPPRESS), they
    # cannot be reset by a command's defaults; `main` fills in the defaults afterwards.
    shared = _Parser(add_help=False)
    shared.add_argument(
        "--storage",
        default=argparse.SUPPRESS,
        metavar="URL",
        help="storage URL (default: $PYDANTIC_TOAST_STORAGE)",
    )
    shared.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON for scripts"
    )
    parser = _Parser(
        prog="python -m pydantic_toast",
        description="Inspect and maintain stored records.",
        parents=[shared],
        words=words,
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, help: str) -> _Parser:
        return commands.add_parser(name, help=help, parents=[shared], words=words)

    command("ping", "check that the storage answers")
    command("stats", "records and bytes per class")
    ls = command("ls", "a class's records, newest first, with sizes")
    ls.add_argument("class_name")
    ls.add_argument(
        "--limit", type=_limit, default=50, help="at most this many (default %(default)s; 0: all)"
    )
    get = command("get", "print a record as JSON")
    get.add_argument("target", nargs="+", help="CLASS ID, or a reference as JSON")
    rm = command("rm", "delete records")
    rm.add_argument("class_name")
    rm.add_argument("ids", nargs="+")
    purge = command("purge", "delete a class's records not updated lately")
    purge.add_argument("class_name")
    purge.add_argument(
        "--older-than",
        type=_older_than,
        required=True,
        metavar="AGE",
        help="not updated for this long: 30d, 12h, 90min, 45s, 2w",
    )
    purge.add_argument("--dry-run", action="store_true", help="count, delete nothing")
    rekey = command("rekey", "re-encrypt a class's records under its primary key")
    rekey.add_argument("model", metavar="MODULE:CLASS", help="the model, e.g. app.models:User")
    rekey.add_argument("--dry-run", action="store_true", help="count, write nothing")
    rekey.add_argument(
        "--batch-size",
        type=_batch_size,
        default=200,
        help="records per read and write (default %(default)s)",
    )
    gc = command("gc", "delete content-addressed records that no record references")
    gc.add_argument(
        "--roots-from",
        action="extend",
        nargs="+",
        default=[],
        metavar="URL",
        help="other storages whose records reference records of this one (only read)",
    )
    gc.add_argument(
        "--grace",
        type=_grace,
        default=timedelta(days=1),
        metavar="AGE",
        help="keep values written within this long (default 1d): 7d, 12h, 90min",
    )
    gc.add_argument("--dry-run", action="store_true", help="count, delete nothing")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    arguments = _parser(words).parse_args(words)
    arguments.storage = getattr(arguments, "storage", os.environ.get("PYDANTIC_TOAST_STORAGE"))
    arguments.json = getattr(arguments, "json", False)
    if not arguments.storage:
        print("error: give --storage URL or set PYDANTIC_TOAST_STORAGE", file=sys.stderr)
        return 2
    words = [*words, arguments.storage]  # what to mask in messages, the environment's URL too
    on_corrupt = _CorruptRecords(words)
    try:
        _check(arguments)
        status = asyncio.run(_run(arguments, on_corrupt))
        sys.stdout.flush()  # here, where a closed pipe can be told apart from a failure
    except (ExternalStorageError, ValueError, RecursionError) as exc:
        print(f"error: {_masked(str(exc), words)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader left (`| head`): stop quietly, and keep the interpreter's own final flush
        # from failing again on the closed pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return status or (1 if on_corrupt.count else 0)


def _check(arguments: argparse.Namespace) -> None:
    """Check class names and ids before connecting: a refused argument must leave no table or
    directory behind, and be reported even when the storage does not answer."""
    if "class_name" in arguments:
        arguments.class_name = _class_name(arguments.class_name)
    if "ids" in arguments:
        arguments.ids = [_id(text) for text in arguments.ids]
    if "target" in arguments:
        arguments.class_name, arguments.id = _target(arguments.target)
    if "model" in arguments:
        arguments.model = _model_class(arguments.model)


async def _run(arguments: argparse.Namespace, on_corrupt: _CorruptRecords) -> int:
    backend = backend_class_for(arguments.storage)(arguments.storage)
    # Every command works on records that exist, so none needs a new table or directory: a
    # typo in a table name or a path is an error, not an empty store made on the spot.
    backend.create_missing = False
    backend.read_only = arguments.command in _READ_ONLY or getattr(arguments, "dry_run", False)
    await backend.open()
    try:
        return await _COMMANDS[arguments.command](backend, arguments, on_corrupt)
    finally:
        await backend.disconnect()


async def _ping(
    backend: StorageBackend, arguments: argparse.Namespace, on_corrupt: _CorruptRecords
) -> int:
    started = asyncio.get_running_loop().time()
    await backend.read_record("pydantic_toast.ping", UUID(int=0))
    elapsed = (asyncio.get_running_loop().time() - started) * 1000
    result = {"storage": mask_url(backend.url), "ok": True, "round_trip_ms": round(elapsed, 3)}
    if arguments.json:
        _print_json(result)
    else:
        print(f"ok: {result['storage']} answered in {elapsed:.1f} ms")
    return 0


async def _stats(
    backend: StorageBackend, arguments: argparse.Namespace, on_corrupt: _CorruptRecords
) -> int:
    classes: dict[str, dict[str, Any]] = {}
    progress = _Progress("scanned")
    async for info in backend.scan_records(None, on_corrupt=on_corrupt):
        entry = classes.setdefault(info.class_name, {"records": 0, "bytes": 0, "newest": None})
        entry["records"] += 1
        entry["bytes"] += info.size
        if entry["newest"] is None or info.updated_at > entry["newest"]:
            entry["newest"] = info.updated_at
        progress.tick()
    progress.done()
    rows = [
        {"class_name": name, **entry, "newest": entry["newest"].isoformat()}
        for name, entry in sorted(classes.items())
    ]
    if arguments.json:
        _print_json(rows)
    else:
        _print_table(rows, ["class_name", "records", "bytes", "newest"])
    return 0


async def _ls(
    backend: StorageBackend, arguments: argparse.Namespace, on_corrupt: _CorruptRecords
) -> int:
    infos = [
        info async for info in backend.scan_records(arguments.class_name, on_corrupt=on_corrupt)
    ]
    infos.sort(key=lambda info: info.updated_at, reverse=True)
    shown = infos[: arguments.limit] if arguments.limit else infos
    rows = [
        {"id": str(i.id), "bytes": i.size, "updated_at": i.updated_at.isoformat()} for i in shown
    ]
    if arguments.json:
        _print_json(rows)
    else:
        _print_table(rows, ["id", "bytes", "updated_at"])
        if len(shown) < len(infos):  # a person must not take the first page for all of them
            print(
                f"showing the newest {len(shown)} of {len(infos)} {arguments.class_name} "
                "records; --limit N shows more, --limit 0 all",
                file=sys.stderr,
            )
    return 0


async def _get(
    backend: StorageBackend, arguments: argparse.Namespace, on_corrupt: _CorruptRecords
) -> int:
    class_name, id = arguments.class_name, arguments.id
    record = await backend.read_record(class_name, id)
    if record is None:
        print(f"error: no {class_name} record with id {id}", file=sys.stderr)
        return 1
    try:
        data = json.loads(record.data)
    except ValueError as exc:
        raise StorageValidationError(
            f"stored {class_name} record {id} does not hold JSON: {exc}"
        ) from exc
    _print_json(
        {
            "class_name": record.class_name,
            "id": str(record.id),
            "schema_version": record.schema_version,
            "created_at": record.created_at.isoformat(),
            "updated_at": record.updated_at.isoformat(),
            "data": data,
        }
    )
    return 0


async def _rm(
    backend: StorageBackend, arguments: argparse.Namespace, on_corrupt: _CorruptRecords
) -> int:
    class_name, ids = arguments.class_name, arguments.ids
    deleted = await backend.delete_records(class_name, ids)
    if arguments.json:
        _print_json({"requested": len(ids), "deleted": deleted})
    else:
        print(f"deleted {deleted} of {len(ids)} {class_name} records")
    return 0 if deleted == len(set(ids)) else 1


async def _purge(
    backend: StorageBackend, arguments: argparse.Namespace, on_corrupt: _CorruptRecords
) -> int:
    class_name = arguments.class_name
    before = datetime.now(UTC) - arguments.older_than
    if arguments.dry_run:
        progress = _Progress("scanned")
        count = 0
        async for info in backend.scan_records(class_name, on_corrupt=on_corrupt):
            count += info.updated_at < before
            progress.tick()
        progress.done()
    else:
        count = await backend.purge(class_name, before)
    verb = "would delete" if arguments.dry_run else "deleted"
    if arguments.json:
        _print_json({"class_name": class_name, "before": before.isoformat(), verb: count})
    else:
        print(f"{verb} {count} {class_name} records not updated since {before:%Y-%m-%d %H:%M} UTC")
    return 0


async def _rekey(
    backend: StorageBackend, arguments: argparse.Namespace, on_corrupt: _CorruptRecords
) -> int:
    progress = _Progress("scanned")
    report = await rekey(
        arguments.model,
        storage=backend,
        dry_run=arguments.dry_run,
        batch_size=arguments.batch_size,
        on_progress=lambda so_far: progress.at(so_far.scanned),
    )
    progress.done()
    for _, reason in report.failures:
        print(f"warning: {reason}", file=sys.stderr)
    verb = "would rekey" if arguments.dry_run else "rekeyed"
    if arguments.json:
        _print_json(report.model_dump(mode="json"))
    else:
        print(
            f"{verb} {report.rekeyed} of {report.scanned} {report.class_name} records under key "
            f"{report.primary!r}; {report.skipped} already under it or expired"
            + (f"; {report.changed} changed meanwhile, left as they are" if report.changed else "")
            + (f"; {report.failed} could not be opened" if report.failed else "")
        )
    return 1 if report.failed else 0


async def _gc(
    backend: StorageBackend, arguments: argparse.Namespace, on_corrupt: _CorruptRecords
) -> int:
    sources: list[StorageBackend] = []
    try:
        for url in arguments.roots_from:
            source = backend_class_for(url)(url)
            source.create_missing, source.read_only = False, True  # only read
            await source.open()
            sources.append(source)
        progress = _Progress("scanned")
        report = await _collect(
            backend,
            roots_from=sources,
            grace=arguments.grace,
            dry_run=arguments.dry_run,
            on_corrupt=on_corrupt,
            on_progress=progress.at,
        )
        progress.done()
    finally:
        for source in sources:
            await source.disconnect()
    if arguments.json:
        _print_json(report.model_dump(mode="json"))
        return 0
    elsewhere = f", and {report.roots_scanned} in {len(sources)} other" if sources else ""
    print(f"scanned {report.scanned} records in {report.storage}{elsewhere}")
    print(
        f"kept {report.roots} not content-addressed, {report.recent} written within"
        f" {format_duration(arguments.grace)}, {report.reachable} referenced"
    )
    if report.refreshed:
        print(f"kept {report.refreshed} written again while collecting")
    if report.corrupt:
        print(f"skipped {report.corrupt} corrupt records")
    verb = "would delete" if report.dry_run else "deleted"
    print(f"{verb} {report.deleted} content-addressed records that nothing references")
    return 0


_Command = Callable[[StorageBackend, argparse.Namespace, "_CorruptRecords"], Awaitable[int]]
# Commands that only read (a dry run of the others reads too).
_READ_ONLY = frozenset({"ping", "stats", "ls", "get"})
_COMMANDS: dict[str, _Command] = {
    "ping": _ping,
    "stats": _stats,
    "ls": _ls,
    "get": _get,
    "rm": _rm,
    "purge": _purge,
    "rekey": _rekey,
    "gc": _gc,
}


def _target(words: list[str]) -> tuple[str, UUID]:
    if len(words) == 1:
        try:
            reference = json.loads(words[0])
        except ValueError:
            raise ValueError("give CLASS ID, or a reference as JSON") from None
        # A signed reference's "sig" and "exp" are not checked: whoever runs this tool
        # reads the store directly, with or without one.
        keys = set(reference) - {"sig", "exp"} if isinstance(reference, dict) else None
        if keys != {"class_name", "id"}:
            raise ValueError('a reference is {"class_name": ..., "id": ...}')
        return _class_name(reference["class_name"]), _id(reference["id"])
    if len(words) == 2:
        return _class_name(words[0]), _id(words[1])
    raise ValueError("give CLASS ID, or a reference as JSON")


def _model_class(path: str) -> Any:
    """The `ExternalBaseModel` subclass ``module:Class`` names (the current directory is on
    the import path, as with ``python -m``)."""
    if "://" in path:
        # "redis://app:pw@host" splits at its first colon too: the error would quote the
        # password as an attribute of module "redis".
        raise ValueError(
            "rekey takes the model as module:Class, not a storage URL: "
            f"{mask_url(path)[:80]!r} (give the storage with --storage)"
        )
    module_name, colon, qualname = path.partition(":")
    if not colon or not module_name or not qualname:
        raise ValueError(f"give the model as module:Class, not {path[:80]!r}")
    if module_name.startswith("."):  # importlib would take it as relative, to no package
        raise ValueError(
            f"cannot import {path[:80]!r}: give the module's absolute name, "
            f"not {module_name[:80]!r}"
        )
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        found: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {path[:80]!r}: {exc}") from None
    walked: list[str] = []
    for part in qualname.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            where = ":".join([module_name, ".".join(walked)]) if walked else module_name
            raise ValueError(
                f"cannot import {path[:80]!r}: {where[:80]} has no attribute {part[:80]!r}"
            ) from None
        walked.append(part)
    if not isinstance(found, type) or not issubclass(found, ExternalBaseModel):
        raise ValueError(f"{path[:80]!r} is not an ExternalBaseModel subclass")
    return found


def _class_name(name: object) -> str:
    """`check_class_name`, masking first: a refused name is quoted cut short, and the cut can
    drop the ``@`` that ends a password. A valid name has no ``@`` and stays as it is."""
    return check_class_name(mask_url(name) if isinstance(name, str) else name)


def _id(text: object) -> UUID:
    id = parse_id(text)
    if id is None:
        raise ValueError(f"not a UUID: {mask_url(str(text))[:80]!r}")  # masked before the cut
    return id


class _CorruptRecords:
    """Where a scan reports each record it cannot decode: a warning on stderr, and the scan
    goes on, so one bad record hides none of the others; `count` makes the status 1."""

    def __init__(self, words: Sequence[str]) -> None:
        self.words = words  # masked in the warnings, like every message
        self.count = 0

    def __call__(self, error: CorruptRecordError) -> None:
        self.count += 1
        print(f"warning: {_masked(str(error), self.words)}", file=sys.stderr)


class _Progress:
    """A counter on stderr for long scans, when a person is watching."""

    def __init__(self, verb: str, stream: TextIO = sys.stderr) -> None:
        self.verb = verb
        self.stream = stream
        self.count = 0
        self.shown = stream.isatty()

    def tick(self) -> None:
        self.count += 1
        if self.shown and self.count % 1000 == 0:
            print(f"\r{self.verb} {self.count:,} records...", end="", file=self.stream, flush=True)

    def at(self, count: int) -> None:
        """Show a count that another loop keeps."""
        if self.shown and count >= 1000:
            self.count = count
            print(f"\r{self.verb} {count:,} records...", end="", file=self.stream, flush=True)

    def done(self) -> None:
        if self.shown and self.count >= 1000:
            print(file=self.stream)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def _print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    if not rows:
        print("(no records)")
        return
    cells = [[str(row[column]) for column in columns] for row in rows]
    widths = [max(len(column), *(len(row[i]) for row in cells)) for i, column in enumerate(columns)]
    print(
        "  ".join(
            column.upper().ljust(width) for column, width in zip(columns, widths, strict=True)
        ).rstrip()
    )
    for row in cells:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
