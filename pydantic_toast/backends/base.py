"""The backend contract: `StorageBackend`, the spine every backend shares.

The public operations (`write_records`, `read_records`, `delete_records`, `scan_records`,
`purge` and their single forms) do the shared work once, here: class-name and id checks,
chunking and bounded concurrency, the ``created_at`` rule, class filtering, decoding and
checking what was read (`decode_stored`), and mapping every failure to the error tree of
`pydantic_toast._errors` (transient failures become `StorageConnectionError`, the only kind
the model layer retries). An engine implements a few primitives, each a plain move of data:

=================  ===========================================================================
``get_many``       what the store holds for each id (envelope bytes, a `StoredRow`, a dict or
                   a `Record`), ``None`` where nothing is stored
``put_many``       upsert records; with ``keeps_created_at``, keep a stored ``created_at`` and
                   return the ``created_at`` each record now has
``put_new``        (``put_if_absent``) write only records whose id holds nothing; say which
``put_unchanged``  (``conditional_write``) write each record only if the one stored under its
                   id (of its class) still has a given ``updated_at``, each check and write
                   atomic; say which were written
``delete_many``    (``delete``) delete ids of a class; return how many existed
``delete_stale``   (``conditional_delete``) delete ids of a class whose ``updated_at`` is still
                   before a moment, each check and delete atomic
``scan``           (``scan``) every record of a class, as `StoredInfo`
``purge_before``   (``purge``) delete records not updated since a moment, natively
=================  ===========================================================================

and declares what it supports as data (`Capabilities`) and its options as a `BackendOptions`
model (parsed by `pydantic_toast.backends.options`, never by the engine).

A custom backend may instead implement the four methods of the first round on plain dicts
(`connect`, `disconnect`, `save`, `load`): the default primitives are built from them, so it
gets every feature the four can express.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from functools import partial
from typing import Any, ClassVar, NoReturn, TypeVar
from uuid import UUID

from pydantic_toast._errors import (
    CorruptRecordError,
    ExternalStorageError,
    StorageConnectionError,
    StorageOperationError,
    StorageValidationError,
    UnsupportedOperationError,
    mask_url,
    scrub_password,
)
from pydantic_toast.backends.options import (
    BackendOptions,
    StorageURL,
    parse_options,
    parse_storage_url,
)
from pydantic_toast.backends.records import (
    Record,
    RecordInfo,
    StoredInfo,
    check_class_name,
    decode_info,
    decode_stored,
    holds_unchanged,
)

__all__ = ["Capabilities", "Record", "RecordInfo", "StorageBackend", "check_class_name"]

A = TypeVar("A")
T = TypeVar("T")

#: What a scan reports a corrupt record to, instead of failing the whole scan.
CorruptHandler = Callable[[CorruptRecordError], None]

# errno values of failures that go away by themselves: a peer restarting or unreachable.
_TRANSIENT_ERRNOS = frozenset(
    {
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.EPIPE,
        errno.ETIMEDOUT,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.EAGAIN,
    }
)


# A backend writes by one of these methods and reads by one of those (a wrapper around another
# backend may override the public operations themselves).
_WAYS_TO_WRITE_AND_READ = (
    ("save", "put_many", "write_record", "write_records"),
    ("load", "get_many", "read_record", "read_records"),
)


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What an engine's primitives support; the spine plans every operation from this."""

    #: ``delete_many`` is implemented.
    delete: bool = False
    #: ``scan`` is implemented (listings, the CLI, the default purge).
    scan: bool = False
    #: ``delete_stale`` is implemented: a delete that re-checks ``updated_at`` atomically.
    #: Otherwise the spine re-reads the records, then deletes those still stale (a record
    #: rewritten between the two is lost: weaker, but all a plain store can do).
    conditional_delete: bool = False
    #: ``purge_before`` is implemented; otherwise purging scans and deletes.
    purge: bool = False
    #: ``put_many`` keeps a stored ``created_at`` atomically and reports it.
    keeps_created_at: bool = False
    #: ``put_new`` is implemented (a conditional create), so a first save costs one write.
    put_if_absent: bool = False
    #: ``put_unchanged`` is implemented: a write that re-checks the stored ``updated_at``
    #: atomically (compare-and-set). Otherwise the spine re-reads the records, then writes
    #: those still unchanged (a record saved between the two is overwritten: weaker, but all
    #: a plain store can do).
    conditional_write: bool = False
    #: Concurrent single loads are worth gathering into batches (the store is remote).
    coalesce_loads: bool = True
    #: Ids or records per primitive call.
    batch_size: int = 1
    #: Ids per ``delete_many`` call (default: ``batch_size``).
    delete_batch_size: int = 0
    #: Primitive calls in flight for one batch.
    concurrency: int = 16


class StorageBackend(ABC):
    """Base class of storage backends, built-in and custom.

    A backend receives its storage URL in the constructor (``self.url``; parsed once as
    ``self.location``, options in ``self.options``, what is left for the driver in
    ``self.driver_options``). The constructor must not do I/O: the library builds one when a
    model class is defined, to check its URL early; `connect` opens connections, once.
    ``create_missing`` (default true) lets `connect` create tables and directories; tools
    that work only on what exists (the command-line tool) set it to false first, and
    ``read_only`` when nothing but reads follow (SQLite then opens its file read-only).
    """

    options_model: ClassVar[type[BackendOptions]] = BackendOptions
    #: What the primitives support (an instance may refine it, e.g. its concurrency).
    capabilities: Capabilities = Capabilities()

    def __init__(self, url: str, **options: Any) -> None:
        self.url = url
        self._url = url
        self.location: StorageURL = parse_storage_url(url)
        self.options: BackendOptions
        self.options, self.driver_options = parse_options(
            type(self).options_model, self.location, options
        )
        self.create_missing = True
        self.read_only = False
        #: Set by the registry when it closes this backend (``aclose()``, a loop shutting
        #: down, exit): an operation still in flight then failed because of that, and a retry
        #: gets a fresh backend, so its failure is transient.
        self.retired = False
        cls = type(self)
        if cls.delete is not StorageBackend.delete and not self.capabilities.delete:
            # A first-round backend that deletes one id at a time (`delete(id, class_name)`).
            self.capabilities = replace(self.capabilities, delete=True)
        for four, primitive, *public in _WAYS_TO_WRITE_AND_READ:
            if all(
                getattr(cls, name) is getattr(StorageBackend, name)
                for name in (four, primitive, *public)
            ):
                raise TypeError(f"{cls.__name__} must implement {four}() or {primitive}()")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({mask_url(self.url)!r})"

    @property
    def coalesce_loads(self) -> bool:
        return self.capabilities.coalesce_loads

    @property
    def where(self) -> str:
        """The store, for messages: never the password."""
        return type(self).__name__

    # --- lifecycle (engines implement) ---------------------------------------------------

    @abstractmethod
    async def connect(self) -> None:
        """Open connections or pools. Called once, before the first operation."""

    @abstractmethod
    async def disconnect(self) -> None:
        """Close what `connect` opened."""

    async def open(self) -> None:
        """`connect`, with any failure mapped to the library's errors (what the registry and
        the command-line tool call)."""
        await self.__run_primitive("connect", self.connect())

    # --- the four-method API of the first round ------------------------------------------

    async def save(self, id: UUID, class_name: str, data: dict[str, Any]) -> None:
        """Store ``data`` (a record as a JSON-ready dict) for ``id``."""
        await self.write_record(decode_stored(data, id, class_name))

    async def load(self, id: UUID, class_name: str) -> dict[str, Any] | None:
        """Return what `save` stored for ``id``, or ``None``."""
        record = await self.read_record(class_name, id)
        return None if record is None else record.to_dict()

    # --- primitives (engines override; the defaults use the four methods) -----------------

    async def get_many(self, class_name: str, ids: Sequence[UUID]) -> Sequence[object | None]:
        """What is stored for each id, in order; ``None`` where nothing is. The default
        reads through whichever read method the subclass implements (``load``, or a
        wrapper's ``read_records`` / ``read_record``)."""
        cls = type(self)
        if cls.load is not StorageBackend.load:
            return [await self.load(id, class_name) for id in ids]
        if cls.read_records is not StorageBackend.read_records:
            return await self.read_records(class_name, ids)
        return [await self.read_record(class_name, id) for id in ids]

    async def put_many(self, records: Sequence[Record]) -> Sequence[datetime] | None:
        """Upsert ``records``. With ``keeps_created_at``, return each one's stored
        ``created_at``; otherwise ``None`` (the spine has already set it). The default
        writes through whichever write method the subclass implements."""
        cls = type(self)
        if cls.save is not StorageBackend.save:
            for record in records:
                await self.save(record.id, record.class_name, record.to_dict())
        elif cls.write_records is not StorageBackend.write_records:
            await self.write_records(records)
        else:
            for record in records:
                await self.write_record(record)
        return None

    async def put_new(self, records: Sequence[Record]) -> Sequence[bool]:
        """Write each record only if nothing is stored under its id; True where written."""
        raise UnsupportedOperationError(f"{type(self).__name__} has no conditional write")

    async def put_unchanged(
        self, records: Sequence[Record], expected: Sequence[datetime]
    ) -> Sequence[bool]:
        """Write each record, whole (its ``created_at`` as given), only if a record of its
        class is stored under its id and that record's ``updated_at`` equals its
        ``expected`` one exactly, checked and written atomically; True where written."""
        raise UnsupportedOperationError(f"{type(self).__name__} has no conditional write", self.url)

    async def delete_many(self, class_name: str, ids: Sequence[UUID]) -> int:
        """Delete the records of ``class_name`` with these ids; return how many existed."""
        if type(self).delete is not StorageBackend.delete:
            return sum([await self.delete(id, class_name) for id in ids])
        raise UnsupportedOperationError(
            f"{type(self).__name__} does not support deleting records", self.url
        )

    async def delete_stale(self, class_name: str, ids: Sequence[UUID], before: datetime) -> int:
        """Delete the records of ``class_name`` with these ids whose ``updated_at`` is still
        before ``before`` when each is deleted (a record rewritten meanwhile stays); return how
        many were deleted."""
        raise UnsupportedOperationError(
            f"{type(self).__name__} has no conditional delete", self.url
        )

    def scan(self, class_name: str | None) -> AsyncIterator[StoredInfo]:
        """Every stored record of ``class_name`` (``None``: of every class)."""
        raise UnsupportedOperationError(
            f"{type(self).__name__} does not support listing records", self.url
        )

    async def purge_before(self, class_name: str, before: datetime, batch_size: int) -> int:
        """Delete ``class_name``'s records last updated before ``before``; return how many."""
        raise UnsupportedOperationError(f"{type(self).__name__} has no native purge", self.url)

    def is_transient(self, exc: BaseException) -> bool:
        """Whether a failure may go away by itself (so retrying makes sense). Engines add
        their driver's connection errors; the default knows the socket layer's."""
        if isinstance(exc, TimeoutError | ConnectionError):
            return True
        return isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS

    def invalid(self, exc: BaseException) -> bool:
        """Whether the store refused the data itself (retrying cannot help, and the data is
        at fault, not the store): then a `StorageValidationError`."""
        return False

    def refusal(self, record: Record) -> str | None:
        """Why the store would refuse ``record``'s data, or ``None`` (the default). A write
        that takes several primitive calls checks its records with it before the first: a
        refusal in a later call would leave the earlier calls' records written."""
        return None

    # --- the public operations ---------------------------------------------------------------

    async def write_record(self, record: Record) -> None:
        """Store a record, keeping the stored ``created_at`` when one exists (the record is
        given it)."""
        if not self.capabilities.keeps_created_at:
            await self.__write_many((record,))
            return
        # `__write_many` of one record on an engine that keeps created_at itself, written
        # out: the hot path of a single save, one coroutine frame instead of four.
        check_class_name(record.class_name)
        _check_id(record.id)
        records = (record,)
        try:
            (record.created_at,) = self.__kept(records, await self.put_many(records))
        except Exception as exc:  # noqa: BLE001 - raised again, as ours
            self.__raise_failure(exc, _doing("save", records), lambda: [record.id])

    async def read_record(self, class_name: str, id: UUID) -> Record | None:
        """The record of ``class_name`` stored for ``id``, or ``None``."""
        # `__read_many` of one id, written out: the hot path of a single load, without its
        # chunking and with the primitive awaited here, one coroutine frame instead of three.
        check_class_name(class_name)
        _check_id(id)
        ids = (id,)
        try:
            stored = await self.get_many(class_name, ids)
        except Exception as exc:  # noqa: BLE001 - raised again, as ours
            self.__raise_failure(exc, _doing("load", ids, class_name))
        (found,) = stored  # outside: a primitive that breaks its contract is no store error
        if found is None:
            return None
        record = decode_stored(found, id, class_name)
        return record if record.class_name == class_name else None

    async def write_records(self, records: Sequence[Record]) -> None:
        """Store many records; each one keeps a stored ``created_at`` and is given it.

        A failure is raised with ``failed_ids``: the records of every chunk not confirmed
        written. The others are stored.
        """
        await self.__write_many(records)

    async def write_records_if_unchanged(
        self, records: Sequence[Record], updated_at: Sequence[datetime]
    ) -> list[UUID]:
        """Write each record only if the record stored under its id, of its class, still has
        the ``updated_at`` given for it (the one it was read with): a compare-and-set, so that
        a rewrite of what was read never overwrites a save that landed in between. Return the
        ids written; the others were changed, deleted or are of another class meanwhile, and
        are left as they are. Each record is written whole, ``created_at`` included (pass it as
        read). ``updated_at`` holds one aware datetime per record, compared exactly (to the
        microsecond, in any timezone).

        Engines with ``conditional_write`` check and write atomically; on the others the
        records are re-read, then those still unchanged written, which leaves a window between
        the two (a save in it is overwritten). A failure is raised with ``failed_ids``, as
        `write_records` does.
        """
        return await self.__write_unchanged(records, updated_at)

    async def read_records(self, class_name: str, ids: Sequence[UUID]) -> list[Record | None]:
        """The record of ``class_name`` for each id, in order; ``None`` where there is none.

        A record stored under the id for another class is ``None`` too: a forged reference
        cannot tell an unknown id from one of another class.
        """
        return await self.__read_many(class_name, ids)

    # The public operations call these, never each other, so that a subclass (a wrapper that
    # counts or logs) may override any public operation without recursion.

    async def __write_many(self, records: Sequence[Record]) -> None:
        if not records:
            return
        checked = None  # a batch's records mostly share one class name: check each name once
        for record in records:
            if record.class_name is not checked:
                checked = check_class_name(record.class_name)
            if type(record.id) is not UUID:
                _check_id(record.id)
        if len(records) > 1:
            # By the ids' integers: a UUID's hash runs Python code, an int's does not.
            unique = list({record.id.int: record for record in records}.values())
            if len(unique) < len(records):  # a store may not upsert one id twice at once
                await self.__write_many(unique)
                _copy_created_at(records, unique)
                return
            self.__refuse_unstorable(records)
        if self.capabilities.keeps_created_at:
            await self.__write_chunks(records)
            return
        # A first save (the model layer gives it created_at == updated_at) may find a record
        # already there (a retried save, a concurrent one, a content-addressed value): the
        # stored created_at wins. Later saves carry the created_at they loaded.
        fresh = [record for record in records if record.created_at == record.updated_at]
        later = [str(r.id) for r in records if r.created_at != r.updated_at]  # not yet sent
        written: set[UUID] = set()
        try:
            if fresh and self.capabilities.put_if_absent:
                created = await self.__run_chunks(
                    _doing("save", fresh), fresh, self.put_new, failed=_ids
                )
                written = {r.id for r, done in zip(fresh, created, strict=True) if done}
                fresh = [record for record in fresh if record.id not in written]
        except (StorageConnectionError, StorageOperationError) as exc:
            # Unconfirmed: the first saves whose conditional create did not complete, and
            # every later save of the batch, not sent yet.
            exc.failed_ids = list(dict.fromkeys([*exc.failed_ids, *later]))
            raise
        try:
            if fresh:
                await self.__adopt_created_at(fresh)
        except (StorageConnectionError, StorageOperationError) as exc:
            exc.failed_ids = [str(r.id) for r in records if r.id not in written]
            raise
        rest = [record for record in records if record.id not in written]
        if rest:
            await self.__write_chunks(rest)

    def __refuse_unstorable(self, records: Sequence[Record]) -> None:
        """Refuse a write of several primitive calls (more records than ``batch_size``, or a
        first save's conditional create and then an upsert) whose records the engine would
        refuse one of: the calls before it would be written."""
        capabilities = self.capabilities
        if (
            type(self).refusal is StorageBackend.refusal  # the engine refuses nothing ahead
            or len(records) < 2
            or (len(records) <= capabilities.batch_size and capabilities.keeps_created_at)
        ):
            return
        for record in records:
            reason = self.refusal(record)
            if reason is not None:
                raise StorageValidationError(
                    f"{self.where} cannot store {record.class_name} record {record.id}: "
                    f"{reason}; no record of the batch of {len(records)} was written"
                )

    async def __adopt_created_at(self, records: Sequence[Record]) -> None:
        """Give each record the ``created_at`` stored under its id, if any (not atomic: the
        engine cannot keep it itself)."""
        by_class: dict[str, list[Record]] = {}
        for record in records:
            by_class.setdefault(record.class_name, []).append(record)
        for class_name, group in by_class.items():
            stored = await self.__run_chunks(
                _doing("save", group),
                [record.id for record in group],
                partial(self.get_many, class_name),
            )
            for record, found in zip(group, stored, strict=True):
                if found is None:
                    continue
                with contextlib.suppress(CorruptRecordError):  # replaced whole by this write
                    record.created_at = decode_stored(found, record.id, class_name).created_at

    async def __write_chunks(self, records: Sequence[Record]) -> None:
        kept = await self.__run_chunks(
            _doing("save", records),
            records,
            self.__put_checked,
            failed=_ids,
        )
        if self.capabilities.keeps_created_at:
            for record, created_at in zip(records, kept, strict=True):
                record.created_at = created_at

    async def __put_checked(self, records: Sequence[Record]) -> Sequence[datetime]:
        kept = await self.put_many(records)
        if not self.capabilities.keeps_created_at:
            return [record.created_at for record in records]
        return self.__kept(records, kept)

    def __kept(
        self, records: Sequence[Record], kept: Sequence[datetime] | None
    ) -> Sequence[datetime]:
        """The ``created_at`` of each record that `put_many` says it kept, checked."""
        if kept is None or len(kept) != len(records):
            raise TypeError(f"{type(self).__name__}.put_many must return one created_at each")
        return kept

    async def __write_unchanged(
        self, records: Sequence[Record], expected: Sequence[datetime]
    ) -> list[UUID]:
        if len(expected) != len(records):
            raise StorageValidationError(
                f"write_records_if_unchanged needs one updated_at per record: "
                f"{len(records)} records, {len(expected)} updated_at"
            )
        checked = None
        seen: set[UUID] = set()
        for record, moment in zip(records, expected, strict=True):
            if record.class_name is not checked:
                checked = check_class_name(record.class_name)
            _check_id(record.id)
            if record.id in seen:
                raise StorageValidationError(
                    f"{record.class_name} record {record.id} is given twice to one "
                    "conditional write"
                )
            seen.add(record.id)
            if not isinstance(moment, datetime) or moment.tzinfo is None:
                raise StorageValidationError(
                    f"updated_at of {record.class_name} record {record.id} must be an aware "
                    f"datetime, not {moment!r}"
                )
        if not records:
            return []
        self.__refuse_unstorable(records)
        primitive = (
            self.put_unchanged if self.capabilities.conditional_write else self.__reread_and_put
        )
        pairs = list(zip(records, expected, strict=True))

        async def chunk(items: Sequence[tuple[Record, datetime]]) -> Sequence[bool]:
            written = await primitive([r for r, _ in items], [m for _, m in items])
            if len(written) != len(items):
                raise TypeError(f"{type(self).__name__}.put_unchanged must answer each record")
            return written

        written = await self.__run_chunks(_doing("save", records), pairs, chunk, failed=_paired_ids)
        return [record.id for record, done in zip(records, written, strict=True) if done]

    async def __reread_and_put(
        self, records: Sequence[Record], expected: Sequence[datetime]
    ) -> list[bool]:
        """The conditional write of an engine that has none: read, then write what is still
        unchanged (not atomic)."""
        unchanged = [False] * len(records)
        by_class: dict[str, list[int]] = {}
        for index, record in enumerate(records):
            by_class.setdefault(record.class_name, []).append(index)
        for class_name, indexes in by_class.items():
            stored = await self.get_many(class_name, [records[i].id for i in indexes])
            for index, found in zip(indexes, stored, strict=True):
                unchanged[index] = holds_unchanged(found, records[index], expected[index])
        todo = [record for record, ok in zip(records, unchanged, strict=True) if ok]
        if todo:
            await self.__put_checked(todo)
        return unchanged

    async def __read_many(self, class_name: str, ids: Sequence[UUID]) -> list[Record | None]:
        check_class_name(class_name)
        for id in ids:
            if type(id) is not UUID:
                _check_id(id)
        stored = await self.__run_chunks(
            _doing("load", ids, class_name), ids, lambda chunk: self.get_many(class_name, chunk)
        )
        records: list[Record | None] = []
        for id, found in zip(ids, stored, strict=True):
            if found is None:
                records.append(None)
                continue
            record = decode_stored(found, id, class_name)
            records.append(record if record.class_name == class_name else None)
        return records

    async def delete(self, id: UUID, class_name: str) -> bool:
        """Delete the record for ``id``; return whether there was one."""
        return await self.__delete_many(class_name, [id]) > 0

    async def delete_records(
        self, class_name: str, ids: Sequence[UUID], *, updated_before: datetime | None = None
    ) -> int:
        """Delete the records of ``ids``; return how many existed. Missing ids are no error.

        With ``updated_before``, delete only the records whose ``updated_at`` is still before
        it at the moment each is deleted, and return how many were: a record written again
        meanwhile (a refreshed content-addressed value) survives. Engines with
        ``conditional_delete`` check and delete atomically; on the others the records are
        re-read, then those still stale deleted, which leaves a window between the two (a
        record rewritten in it is lost). A record that cannot be decoded is never deleted.
        """
        if updated_before is not None and (
            not isinstance(updated_before, datetime) or updated_before.tzinfo is None
        ):
            raise StorageValidationError(
                f"updated_before must be an aware datetime, not {updated_before!r}"
            )
        return await self.__delete_many(class_name, ids, updated_before)

    async def __delete_many(
        self, class_name: str, ids: Sequence[UUID], before: datetime | None = None
    ) -> int:
        check_class_name(class_name)
        for id in ids:
            _check_id(id)
        if not self.capabilities.delete:
            raise UnsupportedOperationError(
                f"{type(self).__name__} does not support deleting records", self.url
            )
        unique = list(dict.fromkeys(ids))
        primitive: Callable[[Sequence[UUID]], Awaitable[int]]
        if before is None:
            primitive = partial(self.delete_many, class_name)
        elif self.capabilities.conditional_delete:
            primitive = partial(self.delete_stale, class_name, before=before)
        else:
            primitive = partial(self.__reread_and_delete, class_name, before=before)
        counts = await self.__run_chunks(
            _doing("delete", unique, class_name),
            unique,
            lambda chunk: _one(primitive(chunk)),
            size=self.capabilities.delete_batch_size,
        )
        return sum(counts)

    async def __reread_and_delete(
        self, class_name: str, ids: Sequence[UUID], before: datetime
    ) -> int:
        """The conditional delete of an engine that has none: read, then delete what is
        still stale (not atomic)."""
        stale = []
        for id, found in zip(ids, await self.get_many(class_name, ids), strict=True):
            if found is None:
                continue
            try:
                record = decode_stored(found, id, class_name)
            except CorruptRecordError:
                continue
            if record.class_name == class_name and record.updated_at < before:
                stale.append(id)
        return await self.delete_many(class_name, stale) if stale else 0

    async def scan_records(
        self, class_name: str | None = None, *, on_corrupt: CorruptHandler | None = None
    ) -> AsyncIterator[RecordInfo]:
        """Every record of ``class_name`` (or of every class), without its data, in no
        particular order. A record that cannot be decoded raises `CorruptRecordError`, or,
        with ``on_corrupt``, is handed to it and skipped."""
        if class_name is not None:
            check_class_name(class_name)
        if not self.capabilities.scan:
            raise UnsupportedOperationError(
                f"{type(self).__name__} does not support listing records", self.url
            )
        entries = self.scan(class_name).__aiter__()
        while True:
            try:
                stored = await entries.__anext__()
            except StopAsyncIteration:
                return
            except ExternalStorageError:
                raise
            except Exception as exc:
                raise self.map_error(exc, f"list {class_name or 'all'} records") from exc
            try:
                info = decode_info(stored, class_name)
            except CorruptRecordError as exc:
                if on_corrupt is None:
                    raise
                on_corrupt(exc)
                continue
            if class_name is None or info.class_name == class_name:
                yield info

    async def purge(
        self,
        class_name: str,
        before: datetime,
        *,
        batch_size: int = 500,
        on_corrupt: CorruptHandler | None = None,
    ) -> int:
        """Delete ``class_name``'s records last updated before ``before``, ``batch_size`` at a
        time; return how many were deleted."""
        check_class_name(class_name)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise StorageValidationError(
                f"batch_size must be a positive integer, not {batch_size!r}"
            )
        if not isinstance(before, datetime) or before.tzinfo is None:
            raise StorageValidationError(f"before must be an aware datetime, not {before!r}")
        if self.capabilities.purge:
            return await self.__run_primitive(
                f"purge {class_name} records", self.purge_before(class_name, before, batch_size)
            )
        deleted = 0
        doomed: list[UUID] = []
        async for info in self.scan_records(class_name, on_corrupt=on_corrupt):
            if info.updated_at < before:
                doomed.append(info.id)
                if len(doomed) >= batch_size:
                    deleted += await self.delete_records(class_name, doomed)
                    doomed = []
        if doomed:
            deleted += await self.delete_records(class_name, doomed)
        return deleted

    # --- shared machinery --------------------------------------------------------------------

    async def __run_chunks(
        self,
        verb: object,
        items: Sequence[A],
        primitive: Callable[[Sequence[A]], Awaitable[Sequence[T]]],
        failed: Callable[[Sequence[A]], list[UUID]] | None = None,
        size: int = 0,
    ) -> list[T]:
        """``primitive`` over ``items`` in chunks of ``batch_size``, at most ``concurrency``
        chunks in flight, results in order. A failure names, in ``failed_ids``, what
        ``failed`` says of every chunk not done; the chunks still in flight are cancelled."""
        size = size or self.capabilities.batch_size
        if not items:
            return []
        if len(items) <= size:  # the common case: one call, no task
            unconfirmed = None if failed is None else partial(failed, items)
            return list(await self.__run_primitive(verb, primitive(items), unconfirmed))
        chunks = [items[start : start + size] for start in range(0, len(items), size)]
        results: dict[int, Sequence[T]] = {}
        pending = iter(range(len(chunks)))

        async def worker() -> None:
            for index in pending:
                results[index] = await self.__run_primitive(verb, primitive(chunks[index]))

        workers = min(self.capabilities.concurrency, len(chunks))
        try:
            if workers == 1:
                await worker()
            else:
                tasks = [asyncio.ensure_future(worker()) for _ in range(workers)]
                try:
                    await asyncio.gather(*tasks)
                except BaseException:
                    for task in tasks:
                        task.cancel()
                    await asyncio.wait(tasks)
                    raise
        except (StorageConnectionError, StorageOperationError) as exc:
            if failed is not None:
                undone = [c for index, c in enumerate(chunks) if index not in results]
                exc.failed_ids = [str(id) for chunk in undone for id in failed(chunk)]
            raise
        return [result for index in range(len(chunks)) for result in results[index]]

    async def __run_primitive(
        self,
        doing: object,
        operation: Awaitable[T],
        failed: Callable[[], Sequence[UUID]] | None = None,
    ) -> T:
        """Await a primitive, turning any failure into one of the library's errors (``doing``
        and ``failed`` are only looked at then: on the way through they cost nothing)."""
        try:
            return await operation
        except Exception as exc:  # noqa: BLE001 - raised again, as ours
            self.__raise_failure(exc, doing, failed)

    def __raise_failure(
        self, exc: Exception, doing: object, failed: Callable[[], Sequence[UUID]] | None = None
    ) -> NoReturn:
        """Raise what a failed primitive raises: the library's own errors as they are, any
        other mapped by `map_error` (with the driver's as its cause); a connection or
        operation error is given the ids ``failed`` names (those it may have left unwritten)
        unless it names some already."""
        failure = exc if isinstance(exc, ExternalStorageError) else self.map_error(exc, doing)
        if (
            failed is not None
            and isinstance(failure, StorageConnectionError | StorageOperationError)
            and not (failure is exc and failure.failed_ids)
        ):
            failure.failed_ids = [str(id) for id in failed()]
        if failure is exc:
            raise exc
        raise failure from exc

    def map_error(self, exc: Exception, doing: object) -> ExternalStorageError:
        """Our error for a driver's: transient, refused data, or a permanent failure. The
        driver's exception stays the ``__cause__``, with the password taken out of its
        message (a custom backend may quote its URL), so no traceback shows it."""
        _scrub_cause(exc, self.url)
        message = f"{self.where} could not {doing}: {type(exc).__name__}: {exc}"
        if isinstance(exc, ExternalStorageError):
            return exc
        if self.invalid(exc):
            return StorageValidationError(message)
        if self.retired or self.is_transient(exc):
            return StorageConnectionError(message, self.url)
        return StorageOperationError(message, self.url)

    def closed(self) -> StorageOperationError | StorageConnectionError:
        """The error for an operation on a backend that is not connected: permanent when the
        caller closed it (it stays closed), transient when the registry did (a retry gets a
        fresh backend)."""
        kind = StorageConnectionError if self.retired else StorageOperationError
        return kind(f"{self.where} is not connected", self.url)


def _scrub_cause(exc: BaseException, url: str) -> None:
    """Take the URL's password out of a driver exception's message, in place."""
    if len(exc.args) == 1 and isinstance(exc.args[0], str):
        scrubbed = scrub_password(exc.args[0], url)
        if scrubbed != exc.args[0]:
            exc.args = (scrubbed,)


class _doing:
    """What an operation was doing, for its error: class and id of one record, or a count.
    Made into text only when an error needs it."""

    __slots__ = ("class_name", "items", "verb")

    def __init__(
        self, verb: str, items: Sequence[Record] | Sequence[UUID], class_name: str = ""
    ) -> None:
        self.verb, self.items, self.class_name = verb, items, class_name

    def __str__(self) -> str:
        items, class_name = self.items, self.class_name
        first: object = items[0] if items else None
        if isinstance(first, Record):
            names = {item.class_name for item in items if isinstance(item, Record)}
            class_name = names.pop() if len(names) == 1 else ""
            first = first.id
        named = f" {class_name}" if class_name else ""
        if len(items) == 1:
            return f"{self.verb}{named} record {first}"
        return f"{self.verb} {len(items)}{named} records"


async def _one(count: Awaitable[int]) -> list[int]:
    return [await count]


def _ids(records: Sequence[Record]) -> list[UUID]:
    return [record.id for record in records]


def _paired_ids(pairs: Sequence[tuple[Record, datetime]]) -> list[UUID]:
    return [record.id for record, _ in pairs]


def _check_id(id: object) -> None:
    if not isinstance(id, UUID):
        raise StorageValidationError(f"a record id is a UUID, not {type(id).__name__}")


def _copy_created_at(records: Sequence[Record], unique: Sequence[Record]) -> None:
    by_id = {record.id: record.created_at for record in unique}
    for record in records:
        record.created_at = by_id[record.id]
