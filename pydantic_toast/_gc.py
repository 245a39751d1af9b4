"""Garbage collection of content-addressed records: `collect_garbage`.

A content-addressed value is stored once and shared by every dump that holds it, so no dump can
delete it; records nobody references any more pile up instead. A collection finds them:

* **Roots** are every record that is not content-addressed (a model saved under its own id,
  an order) and every content-addressed record updated within ``grace``, in the storage
  collected and every record of the storages in ``roots_from`` (which are only read).
* **Reachable** is every record a root's stored data references, at any depth of the data (a
  field, a list, a dict value), and transitively whatever those records reference.
* **Swept** are the content-addressed records older than ``grace`` that are not reachable.

A record is content-addressed when its id is a version-8 UUID (`pydantic_toast._content`) and
its content proves it: the id is the digest of the stored class name and data. The version
alone is a claim anyone can make (Python 3.14's ``uuid.uuid8()``, another tool writing the same
table); the digest is checked before anything is deleted, so a record whose id was not made
from its content is never deleted (it is counted corrupt: every loader refuses it too).

Encrypted records (`pydantic_toast._crypto`) are opened before their references are looked
for and their ids proved (the id of an encrypted value is keyed: an HMAC under a key of the
keyring), with the keyring of the class of that name if this process defines one, else the
installed one or ``PYDANTIC_TOAST_KEYS``. A sealed record that no keyring opens (none set, a
key id the keyring lacks, a tampered ciphertext) may reference anything, so the collection
stops with a `StorageValidationError` before it deletes anything, dry run or not: every
unreachable record is read and proved first, and the deletions come after.

Cost: one listing of each storage, the data of roots and reachable records read in batches
(and that of the unreachable ones, to verify them), memory for the reachable ids (16 bytes and
a set slot each) and 16 bytes per old content-addressed record (then per one proved stale).

Concurrency: a dump writes every value it references, and writing a content-addressed record
that exists refreshes its ``updated_at``, so a value written after the collection started is
younger than the cutoff. The sweep deletes with `StorageBackend.delete_records` and
``updated_before=cutoff``: a record refreshed after it was listed is not deleted. A reference a
dump handed out must reach a root (be saved in a record, or in a storage of ``roots_from``)
within ``grace``; a reference held elsewhere for longer (a message in a queue) is not seen.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from uuid import UUID

from pydantic import BaseModel, ConfigDict

from pydantic_toast._bridge import run_sync
from pydantic_toast._config import ModelSettings, as_duration
from pydantic_toast._content import CONTENT_VERSION, content_id
from pydantic_toast._crypto import (
    KEYS_VARIABLE,
    Keyring,
    content_secrets,
    current_keyring,
    open_data,
    sealed_key_id,
)
from pydantic_toast._errors import (
    CorruptRecordError,
    StorageValidationError,
    UnsupportedOperationError,
    mask_url,
)
from pydantic_toast._external import _references_in
from pydantic_toast._model import ExternalBaseModel
from pydantic_toast._records import keyring_of
from pydantic_toast._registry import get_backend
from pydantic_toast.backends.base import StorageBackend
from pydantic_toast.backends.records import Record, check_class_name

__all__ = ["GarbageReport", "collect_garbage", "collect_garbage_sync"]

Storage = str | StorageBackend

#: Records read per call, and the bytes a batch of roots may add up to before it is read.
_BATCH = 1000
_BATCH_BYTES = 16 << 20


class GarbageReport(BaseModel):
    """What a collection found (``report.model_dump(mode="json")`` for JSON).

    Every record listed in the storage falls in one of ``roots``, ``recent``, ``reachable``,
    ``deleted``, ``refreshed`` and ``corrupt`` (records written or deleted by others during
    the collection may make the sum differ from ``scanned``).
    """

    model_config = ConfigDict(frozen=True)

    #: The storage collected, its password masked.
    storage: str
    #: Nothing was deleted: ``deleted`` counts what would have been.
    dry_run: bool
    #: Content-addressed records updated at or after this moment were kept as recent.
    cutoff: datetime
    #: Records listed in the storage collected.
    scanned: int = 0
    #: Records read from the storages of ``roots_from``, all of them roots.
    roots_scanned: int = 0
    #: Records that are not content-addressed: never deleted, their references followed.
    roots: int = 0
    #: Content-addressed records updated within the grace period: kept.
    recent: int = 0
    #: Older content-addressed records that a root references, directly or not: kept.
    reachable: int = 0
    #: Unreachable content-addressed records deleted (in a dry run: that would be).
    deleted: int = 0
    #: Unreachable records written again while the collection ran, so kept.
    refreshed: int = 0
    #: Records that could not be decoded or whose content does not match their id: skipped,
    #: never deleted.
    corrupt: int = 0


async def collect_garbage(
    storage: Storage,
    *,
    roots_from: Storage | Sequence[Storage] = (),
    grace: timedelta | float = timedelta(days=1),
    dry_run: bool = False,
) -> GarbageReport:
    """Delete the content-addressed records of ``storage`` that no record references.

    ``storage`` is a URL or a connected backend, as everywhere in the library. Records of the
    storages in ``roots_from`` (one storage or a sequence of them) are roots too (an order in
    PostgreSQL whose lines live in Redis); nothing is deleted there. Content-addressed
    records updated within ``grace`` are kept whatever references them: a reference a dump
    returned must be stored in a root within that time. With ``dry_run`` nothing is deleted
    and the report says what would have been.
    Records that cannot be decoded are counted and skipped, never deleted. Encrypted records
    are opened with their class's keyring, else the installed one or ``PYDANTIC_TOAST_KEYS``;
    when one cannot be opened, a `StorageValidationError` names it and nothing is deleted.
    """
    return await _collect(storage, roots_from=roots_from, grace=grace, dry_run=dry_run)


def collect_garbage_sync(
    storage: Storage,
    *,
    roots_from: Storage | Sequence[Storage] = (),
    grace: timedelta | float = timedelta(days=1),
    dry_run: bool = False,
) -> GarbageReport:
    """`collect_garbage` for synchronous code."""
    return run_sync(collect_garbage(storage, roots_from=roots_from, grace=grace, dry_run=dry_run))


async def _collect(
    storage: Storage,
    *,
    roots_from: Storage | Sequence[Storage] = (),
    grace: timedelta | float = timedelta(days=1),
    dry_run: bool = False,
    on_corrupt: Callable[[CorruptRecordError], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> GarbageReport:
    """`collect_garbage`, with hooks for the command-line tool: ``on_corrupt`` hears of each
    record skipped, ``on_progress`` of the records listed so far."""
    kept = as_duration(grace)  # seconds, as every other duration
    if not isinstance(kept, timedelta) or kept < timedelta(0):
        raise StorageValidationError(
            f"grace must be a duration (a timedelta or seconds) of zero or more, not {grace!r}"
        )
    if isinstance(roots_from, str | StorageBackend):
        roots_from = (roots_from,)
    for other in roots_from:
        if _same(other, storage):
            raise StorageValidationError(
                f"roots_from names the storage collected ({_shown(storage)}): its records are "
                "roots already"
            )
    backend = await _backend(storage)
    sources = [await _backend(other) for other in roots_from]
    _require(backend, "scan", "list its records")
    if not dry_run:
        _require(backend, "delete", "delete records")
    for source in sources:
        _require(source, "scan", "list its records")
    now = datetime.now(UTC)
    # A grace longer than the calendar (``timedelta.max``) keeps every record.
    cutoff = now - min(kept, now - datetime.min.replace(tzinfo=UTC))
    run = _Collection(backend, cutoff, on_corrupt, on_progress)
    for source in sources:
        await run.read_roots_from(source)
    await run.scan()
    await run.sweep(dry_run)
    return GarbageReport(
        storage=mask_url(backend.url),
        dry_run=dry_run,
        cutoff=cutoff,
        **run.counts,
    )


#: What a `GarbageReport` counts.
_COUNTS = (
    "scanned",
    "roots_scanned",
    "roots",
    "recent",
    "reachable",
    "deleted",
    "refreshed",
    "corrupt",
)


class _Collection:
    """The state of one collection: reachable ids as 16-byte strings, old content-addressed
    records as packed 16-byte ids per class, and the references still to follow."""

    def __init__(
        self,
        backend: StorageBackend,
        cutoff: datetime,
        on_corrupt: Callable[[CorruptRecordError], None] | None,
        on_progress: Callable[[int], None] | None,
    ) -> None:
        self.backend = backend
        self.cutoff = cutoff
        self.on_corrupt = on_corrupt
        self.on_progress = on_progress
        self.reachable: set[bytes] = set()
        self.candidates: dict[str, bytearray] = {}
        # References to content-addressed records still to read, per class.
        self.frontier: dict[str, list[UUID]] = {}
        self.names: dict[str, str] = {}  # one string per class name, however often parsed
        self.broken: set[str] = set()  # ids of the records counted corrupt (few)
        self.counts = dict.fromkeys(_COUNTS, 0)
        self.keyrings: dict[str, tuple[list[Keyring], str]] = {}  # per class name, see `open`
        self.unopened = 0  # sealed records no keyring opened: the sweep must not run
        self.first_unopened = ""

    def corrupt(self, error: CorruptRecordError) -> None:
        if error.id in self.broken:
            return  # listed corrupt, then referenced: one record, counted once
        self.counts["corrupt"] += 1
        self.broken.add(error.id)
        if self.on_corrupt is not None:
            self.on_corrupt(error)

    # --- encrypted records -----------------------------------------------------------------

    def open(self, record: Record) -> tuple[bytes, Keyring | None] | None:
        """The record's JSON and the keyring that opened it (``None`` for a record stored in
        the clear); ``None`` for a sealed record that no keyring opens, counted so that the
        sweep refuses to run."""
        if b'"$toast"' not in record.data:
            return record.data, None  # the cheap test: most records are not sealed
        key_id = sealed_key_id(record)
        if key_id is None:
            return record.data, None
        keyrings, missing = self.keyrings_for(record.class_name)
        problem = ""
        for keyring in keyrings:
            try:
                return open_data(record, keyring), keyring
            except StorageValidationError as exc:
                problem = problem or str(exc)
        if not problem:
            shown = repr(key_id) if len(key_id) <= 64 else repr(key_id[:61] + "...")
            problem = (
                f"stored {record.class_name} record {record.id} is encrypted under key id "
                f"{shown}, and {missing}"
            )
        self.unopened += 1
        self.first_unopened = self.first_unopened or problem
        return None

    def keyrings_for(self, class_name: str) -> tuple[list[Keyring], str]:
        """The keyrings to open a sealed record of ``class_name`` with: those of the classes
        of that name defined in this process, then the installed one (or the environment's);
        and, when there is none, why."""
        found = self.keyrings.get(class_name)
        if found is not None:
            return found
        keyrings: list[Keyring] = []
        for settings in _encrypted_settings(class_name):
            if settings.keyring is not None:
                keyrings.append(keyring_of(settings))
        missing = "no keyring is set"
        try:
            keyrings.append(current_keyring(None, class_name))
        except StorageValidationError as exc:
            if str(exc).startswith(KEYS_VARIABLE):  # set, but unreadable: say why
                missing = f"{missing} ({exc})"
        unique = list({id(keyring): keyring for keyring in keyrings}.values())
        found = self.keyrings[class_name] = (unique, missing)
        return found

    def refuse_unopened(self) -> None:
        """Stop before the sweep when a sealed record could not be opened: what it references
        is unknown, so any candidate may be in use."""
        if not self.unopened:
            return
        count = self.unopened
        what, it, verb = (
            ("record", "it", "references") if count == 1 else ("records", "them", "reference")
        )
        subject = "it" if count == 1 else "they"
        raise StorageValidationError(
            f"garbage collection stopped before deleting anything: {count} encrypted {what} "
            f"could not be opened, so what {subject} {verb} is unknown; the first: "
            f"{self.first_unopened}. Install the keyring that sealed {it} "
            f"(pydantic_toast.use_keyring(...), ExternalConfigDict(keyring=...) on the class, "
            f"or {KEYS_VARIABLE}=id:base64url-key) and run again"
        )

    # --- marking ---------------------------------------------------------------------------

    def follow(self, record: Record) -> bool:
        """Mark what ``record``'s data references, opened first when it is sealed (nothing
        to look for without a reference's key: most records hold none, and are not parsed);
        false if it is not JSON."""
        opened = self.open(record)
        if opened is None:
            return True  # counted: `refuse_unopened` stops the collection before its sweep
        raw = opened[0]
        if b'"class_name"' not in raw:
            return True
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            self.corrupt(CorruptRecordError(record.class_name, record.id, "its data is not JSON"))
            return False
        for class_name, id, _ in _references_in(data):
            if id.version != CONTENT_VERSION:
                continue  # not content-addressed: a root already, never deleted
            key = id.bytes
            if key not in self.reachable:
                name = self.names.get(class_name)
                if name is None:
                    try:
                        name = self.names[class_name] = check_class_name(class_name)
                    except StorageValidationError:
                        continue  # no record is stored under such a name: it names nothing
                self.reachable.add(key)
                self.frontier.setdefault(name, []).append(id)
        return True

    async def expand(self, everything: bool = False) -> None:
        """Read the referenced records (a batch per class; all of them with ``everything``)
        and mark what they reference in turn, until nothing more is found."""
        while True:
            ready = [
                name
                for name, ids in self.frontier.items()
                if ids and (everything or len(ids) >= _BATCH)
            ]
            if not ready:
                return
            for name in ready:
                ids = self.frontier[name]
                batch = ids[-_BATCH:]  # from the end: a long list is not copied each time
                del ids[-_BATCH:]
                for record in await self.read(self.backend, name, batch):
                    if record is not None and record is not _CORRUPT:
                        self.follow(record)

    async def read(
        self, backend: StorageBackend, class_name: str, ids: Sequence[UUID]
    ) -> Sequence[Record | None]:
        """The records, one batch (``None`` where there is none); one at a time where the
        batch holds a corrupt record, so that it, and only it, is counted and `_CORRUPT`."""
        try:
            return await backend.read_records(class_name, ids)
        except CorruptRecordError:
            pass
        records: list[Record | None] = []
        for id in ids:
            try:
                records.append(await backend.read_record(class_name, id))
            except CorruptRecordError as exc:
                self.corrupt(exc)
                records.append(_CORRUPT)
        return records

    # --- the passes ------------------------------------------------------------------------

    async def read_roots_from(self, source: StorageBackend) -> None:
        """Every record of a storage of ``roots_from`` is a root."""
        roots = _Batches(self, source)
        async for info in source.scan_records(None, on_corrupt=self.corrupt):
            self.counts["roots_scanned"] += 1
            await roots.add(info.class_name, info.id, info.size, None)
        await roots.flush()

    async def scan(self) -> None:
        """List the storage collected: roots are read and followed, old content-addressed
        records put aside."""
        roots = _Batches(self, self.backend)
        scanned = 0
        unlisted: list[CorruptRecordError] = []

        def corrupt(error: CorruptRecordError) -> None:
            unlisted.append(error)
            self.corrupt(error)

        async for info in self.backend.scan_records(None, on_corrupt=corrupt):
            scanned += 1
            if self.on_progress is not None and scanned % 1000 == 0:
                self.on_progress(scanned)
            id = info.id
            if id.version != CONTENT_VERSION:
                self.counts["roots"] += 1
                await roots.add(info.class_name, id, info.size, "roots")
            elif info.updated_at >= self.cutoff:
                self.counts["recent"] += 1
                self.reachable.add(id.bytes)  # read now: no reference need read it again
                await roots.add(info.class_name, id, info.size, "recent")
            else:
                name = self.names.setdefault(info.class_name, info.class_name)
                self.candidates.setdefault(name, bytearray()).extend(id.bytes)
        self.counts["scanned"] = scanned + len(unlisted)
        await roots.flush()
        await self.expand(everything=True)
        if self.on_progress is not None:
            self.on_progress(scanned)

    async def sweep(self, dry_run: bool) -> None:
        """Delete the old content-addressed records not reached, once their content proves
        they are content-addressed, and only if they were not written again meanwhile.

        Every one is read and proved first, and only then is anything deleted: a sealed
        record that cannot be opened stops the collection before its first deletion."""
        self.refuse_unopened()
        stale: dict[str, bytearray] = {}
        while self.candidates:
            class_name, packed = self.candidates.popitem()
            doomed: list[UUID] = []
            for start in range(0, len(packed), 16):
                key = bytes(packed[start : start + 16])
                if key in self.reachable:
                    if not self.broken or str(UUID(bytes=key)) not in self.broken:
                        self.counts["reachable"] += 1
                    continue
                doomed.append(UUID(bytes=key))
                if len(doomed) >= _BATCH:
                    await self.prove(class_name, doomed, stale)
                    doomed = []
            if doomed:
                await self.prove(class_name, doomed, stale)
        self.refuse_unopened()
        while stale:
            class_name, packed = stale.popitem()
            step = 16 * _BATCH
            for start in range(0, len(packed), step):
                chunk = packed[start : start + step]
                ids = [UUID(bytes=bytes(chunk[at : at + 16])) for at in range(0, len(chunk), 16)]
                await self.delete(class_name, ids, dry_run)

    async def prove(self, class_name: str, ids: list[UUID], stale: dict[str, bytearray]) -> None:
        """Put aside, in ``stale``, the records of ``ids`` that may be deleted: not written
        again since the cutoff, and holding the content their id names."""
        for id, record in zip(ids, await self.read(self.backend, class_name, ids), strict=True):
            if record is None or record is _CORRUPT:
                continue  # deleted by someone else meanwhile, or counted corrupt
            if record.updated_at >= self.cutoff:
                self.counts["refreshed"] += 1
                continue
            opened = self.open(record)
            if opened is None:
                continue  # counted: the sweep stops before deleting anything
            data, keyring = opened
            if not _proves(record, data, keyring):
                self.corrupt(
                    CorruptRecordError(class_name, id, "its content does not match its id")
                )
            else:
                stale.setdefault(class_name, bytearray()).extend(id.bytes)

    async def delete(self, class_name: str, ids: list[UUID], dry_run: bool) -> None:
        if dry_run:
            self.counts["deleted"] += len(ids)
            return
        deleted = await self.backend.delete_records(class_name, ids, updated_before=self.cutoff)
        self.counts["deleted"] += deleted
        self.counts["refreshed"] += len(ids) - deleted


#: What `_Collection.read` gives for a record it counted corrupt.
_CORRUPT = Record(
    UUID(int=0),
    "corrupt",
    b"",
    1,
    datetime.min.replace(tzinfo=UTC),
    datetime.min.replace(tzinfo=UTC),
)


class _Batches:
    """Roots waiting to be read, per class, in batches bounded in count and bytes."""

    def __init__(self, run: _Collection, backend: StorageBackend) -> None:
        self.run = run
        self.backend = backend
        self.waiting: dict[str, list[tuple[UUID, str | None]]] = {}
        self.sizes: dict[str, int] = {}

    async def add(self, class_name: str, id: UUID, size: int, bucket: str | None) -> None:
        waiting = self.waiting.setdefault(class_name, [])
        waiting.append((id, bucket))
        self.sizes[class_name] = self.sizes.get(class_name, 0) + size
        if len(waiting) >= _BATCH or self.sizes[class_name] >= _BATCH_BYTES:
            await self.read(class_name)

    async def flush(self) -> None:
        for class_name in list(self.waiting):
            await self.read(class_name)

    async def read(self, class_name: str) -> None:
        waiting = self.waiting.pop(class_name, [])
        self.sizes.pop(class_name, None)
        if not waiting:
            return
        run = self.run
        records = await run.read(self.backend, class_name, [id for id, _ in waiting])
        for (_, bucket), record in zip(waiting, records, strict=True):
            if record is None:
                continue  # deleted since it was listed
            if (record is _CORRUPT or not run.follow(record)) and bucket is not None:
                run.counts[bucket] -= 1  # counted corrupt instead
        await run.expand()


def _proves(record: Record, data: bytes, keyring: Keyring | None) -> bool:
    """Whether the record's id is the digest of its class name and content ``data``: keyed
    with a key of ``keyring`` when it was sealed, as the ids of encrypted values are."""
    keys: tuple[bytes | None, ...] = (None,) if keyring is None else content_secrets(keyring)
    try:
        return any(content_id(record.class_name, data, key) == record.id for key in keys)
    except (ValueError, RecursionError):
        return False


def _encrypted_settings(class_name: str) -> list[ModelSettings]:
    """The settings of the encrypted `ExternalBaseModel` classes stored as ``class_name``
    that this process defines (an encrypted `External` value of another type has no keyring
    of its own: the installed one seals it)."""
    found: list[ModelSettings] = []
    stack = [ExternalBaseModel]
    seen: set[type] = set()
    while stack:
        for cls in stack.pop().__subclasses__():
            if cls in seen:
                continue
            seen.add(cls)
            stack.append(cls)
            settings = cls.__dict__.get("__external_settings__")
            if settings is not None and settings.encrypt and settings.class_name == class_name:
                found.append(settings)
    return found


async def _backend(storage: Storage) -> StorageBackend:
    if isinstance(storage, StorageBackend):
        return storage
    if not isinstance(storage, str):
        raise StorageValidationError(
            f"a storage is a URL or a StorageBackend, not {type(storage).__name__}"
        )
    return await get_backend(storage)


def _require(backend: StorageBackend, capability: str, doing: str) -> None:
    if not getattr(backend.capabilities, capability):
        raise UnsupportedOperationError(
            f"{type(backend).__name__} cannot {doing}, so garbage collection cannot use it",
            backend.url,
        )


def _same(one: Storage, other: Storage) -> bool:
    if isinstance(one, str) and isinstance(other, str):
        return one == other
    if isinstance(one, StorageBackend) and isinstance(other, StorageBackend):
        return one is other or one.url == other.url
    url = one if isinstance(one, str) else other
    backend = other if isinstance(other, StorageBackend) else one
    return isinstance(backend, StorageBackend) and backend.url == url


def _shown(storage: Storage) -> str:
    return mask_url(storage if isinstance(storage, str) else storage.url)
