"""Key rotation: re-encrypt every record of a class under its keyring's primary key.

`rekey` lists the class's records, then reads them in batches, opens each one that is sealed
under another key (or not sealed at all: written before the class turned encryption on) and
writes it back sealed under the primary key, with its id, timestamps and schema version as
they were. A record already under the primary key is skipped, so a run that was interrupted
simply continues where it stopped when started again; once a run reports nothing left to
do, the old keys may leave the keyring.

The write back is conditional (`StorageBackend.write_records_if_unchanged`): a record saved
(or deleted) between rekey's read and its write keeps that save (or stays deleted), and is
counted as ``changed``; a save
through the current keyring is already under the primary key, and any other is picked up by
the next run.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import datetime
from functools import partial
from typing import TypeVar
from uuid import UUID

from pydantic import BaseModel, ConfigDict

from pydantic_toast._bridge import run_sync
from pydantic_toast._config import settings_of
from pydantic_toast._crypto import open_data, seal_data, sealed_key_id
from pydantic_toast._errors import StorageValidationError
from pydantic_toast._model import ExternalBaseModel
from pydantic_toast._records import expired, keyring_of, time_left
from pydantic_toast._references import short
from pydantic_toast._retry import with_backend
from pydantic_toast.backends.base import StorageBackend
from pydantic_toast.backends.records import Record

__all__ = ["RekeyReport", "rekey", "rekey_sync"]

T = TypeVar("T")

#: How many failed ids a report keeps (the count is always complete).
_MAX_FAILED_IDS = 100


class RekeyReport(BaseModel):
    """What a `rekey` run did (or, with ``dry_run``, would do); ``report.model_dump(mode=
    "json")`` for JSON. ``on_progress`` is given the report so far after each batch."""

    model_config = ConfigDict(frozen=True)

    class_name: str
    #: The key id records are re-encrypted under.
    primary: str
    dry_run: bool
    #: Records listed.
    scanned: int = 0
    #: Records re-encrypted under the primary key (with ``dry_run``: that need it).
    rekeyed: int = 0
    #: Records already under the primary key, or expired.
    skipped: int = 0
    #: Records saved or deleted by someone else between this run's read and its write: left
    #: as they are (a save through the current keyring is already under the primary key;
    #: any other is re-encrypted by the next run).
    changed: int = 0
    #: Records that could not be opened (unknown key id, tampered): left as they are.
    failed: int = 0
    #: The first ids of the failed records, with the reason of each.
    failures: tuple[tuple[str, str], ...] = ()


async def rekey(
    cls: type[ExternalBaseModel],
    *,
    storage: str | StorageBackend | None = None,
    dry_run: bool = False,
    batch_size: int = 200,
    on_progress: Callable[[RekeyReport], None] | None = None,
) -> RekeyReport:
    """Re-encrypt every record of ``cls`` under its keyring's primary key, ``batch_size``
    records per read and write, calling ``on_progress`` after each batch. ``storage`` (a URL
    or a connected backend) defaults to the class's own."""
    if not (isinstance(cls, type) and issubclass(cls, ExternalBaseModel)):
        shown = cls.__name__ if isinstance(cls, type) else short(cls)
        raise StorageValidationError(f"rekey needs an ExternalBaseModel subclass, not {shown}")
    settings = settings_of(cls)
    if not settings.encrypt:
        raise StorageValidationError(
            f"{cls.__name__} is not encrypted: set ExternalConfigDict(encrypt=True) to rekey it"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise StorageValidationError(f"batch_size must be a positive integer, not {batch_size!r}")
    keyring = keyring_of(settings)
    name = settings.class_name
    target = settings.storage if storage is None else storage

    async def on(operation: Callable[[StorageBackend], Awaitable[T]]) -> T:
        if isinstance(target, StorageBackend):
            return await operation(target)
        return await with_backend(target, operation, settings.retry)

    async def list_ids(backend: StorageBackend) -> list[UUID]:
        # Listed whole first: some stores must not be written to while a listing of theirs
        # is open (an SQLite cursor, a directory being walked). Ids are small.
        return [info.id async for info in backend.scan_records(name)]

    ids = await on(list_ids)
    counts = {"scanned": 0, "rekeyed": 0, "skipped": 0, "changed": 0, "failed": 0}
    failures: list[tuple[str, str]] = []

    def so_far() -> RekeyReport:
        return RekeyReport(
            class_name=name,
            primary=keyring.primary,
            dry_run=dry_run,
            failures=tuple(failures),
            **counts,
        )

    for start in range(0, len(ids), batch_size):
        batch = ids[start : start + batch_size]
        stored = await on(partial(_read, name, batch))
        writes: list[Record] = []
        read_at: list[datetime] = []
        for record in stored:
            if record is None:
                continue  # deleted since it was listed
            counts["scanned"] += 1
            key_id = sealed_key_id(record)
            if key_id == keyring.primary:
                counts["skipped"] += 1
                continue
            ttl = settings.ttl
            if ttl is not None and expired(record.updated_at, ttl):
                counts["skipped"] += 1  # purge deletes it; rewriting would revive it on Redis
                continue
            try:
                plain = record.data if key_id is None else open_data(record, keyring)
                if key_id is None:
                    _check_plain(record)
            except StorageValidationError as exc:
                counts["failed"] += 1
                if len(failures) < _MAX_FAILED_IDS:
                    failures.append((str(record.id), str(exc)))
                continue
            if dry_run:
                counts["rekeyed"] += 1
                continue
            fresh = replace(
                record,
                data=plain,
                compress_above=settings.compress_above,
                ttl=time_left(record.updated_at, ttl),
            )
            writes.append(seal_data(fresh, keyring))
            read_at.append(record.updated_at)
        if writes:
            written = await on(partial(_write, writes, read_at))
            counts["rekeyed"] += len(written)
            counts["changed"] += len(writes) - len(written)
        if on_progress is not None:
            on_progress(so_far())
    return so_far()


async def _read(name: str, ids: list[UUID], backend: StorageBackend) -> list[Record | None]:
    return await backend.read_records(name, ids)


async def _write(
    records: list[Record], read_at: list[datetime], backend: StorageBackend
) -> list[UUID]:
    """Write back only what is still as it was read: a save in between stays."""
    return await backend.write_records_if_unchanged(records, read_at)


def _check_plain(record: Record) -> None:
    """A record that is not sealed must be the class's plain JSON object, not a sealed one
    gone wrong (which would be sealed again as if it were the model's data)."""
    try:
        data = json.loads(record.data)
    except (ValueError, RecursionError):
        data = None
    if not isinstance(data, dict) or "$toast" in data:
        raise StorageValidationError(
            f"stored {record.class_name} record {record.id} is neither sealed nor plain JSON"
        )


def rekey_sync(
    cls: type[ExternalBaseModel],
    *,
    storage: str | StorageBackend | None = None,
    dry_run: bool = False,
    batch_size: int = 200,
    on_progress: Callable[[RekeyReport], None] | None = None,
) -> RekeyReport:
    """`rekey` for synchronous code."""
    return run_sync(
        rekey(
            cls,
            storage=storage,
            dry_run=dry_run,
            batch_size=batch_size,
            on_progress=on_progress,
        )
    )
