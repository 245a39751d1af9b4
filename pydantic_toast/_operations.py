"""What `ExternalBaseModel`'s methods do: each operation as one sequence of steps.

Every step that talks to a store goes through `with_backend` (the live backend of the class's
URL, with the class's retries), and every reference is checked by `reference_id` before any
I/O. The model class itself only forwards here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, TypeVar
from uuid import UUID

from pydantic_toast._errors import (
    ExternalStorageError,
    RecordNotFoundError,
    StorageConnectionError,
    StorageOperationError,
    StorageValidationError,
)
from pydantic_toast._loader import load_record
from pydantic_toast._references import ExternalReference, ReferenceLike, reference_id
from pydantic_toast._retry import with_backend
from pydantic_toast.backends.base import StorageBackend
from pydantic_toast.backends.records import Record

if TYPE_CHECKING:
    from pydantic_toast._model import ExternalBaseModel

__all__ = [
    "delete",
    "delete_many",
    "exists",
    "from_records",
    "load",
    "load_many",
    "purge",
    "save",
    "save_many",
]

M = TypeVar("M", bound="ExternalBaseModel")

_log = logging.getLogger("pydantic_toast")


def _reference(record: Record) -> ExternalReference:
    return {"class_name": record.class_name, "id": str(record.id)}


async def save(model: ExternalBaseModel) -> ExternalReference:
    record = model._to_record(datetime.now(UTC))
    settings = type(model).__external_settings__
    await with_backend(settings.storage, lambda b: b.write_record(record), settings.retry)
    model._remember(record)
    return _reference(record)


async def save_many(cls: type[M], models: Iterable[M]) -> list[ExternalReference]:
    now = datetime.now(UTC)
    models = list(models)
    records: dict[int, Record] = {}
    batches: dict[str, list[Record]] = {}
    for model in models:
        if not isinstance(model, cls):
            raise StorageValidationError(
                f"save_external_many of {cls.__name__} got {type(model).__name__}"
            )
        if id(model) not in records:
            record = records[id(model)] = model._to_record(now)
            batches.setdefault(type(model).__external_settings__.storage, []).append(record)
    groups = list(batches.items())
    for index, (storage, batch) in enumerate(groups):
        writer = _BatchWriter(batch)
        try:
            await with_backend(storage, writer, cls.__external_settings__.retry)
        except (StorageConnectionError, StorageOperationError) as exc:
            # Unconfirmed: what this storage's writer has left, and every record of the
            # storages not tried yet. The others are stored: give their models metadata.
            unwritten = writer.unwritten_ids()
            unwritten += [str(record.id) for _, later in groups[index + 1 :] for record in later]
            exc.failed_ids = unwritten
            unconfirmed = set(exc.failed_ids)
            for model in models:
                if str(records[id(model)].id) not in unconfirmed:
                    model._remember(records[id(model)])
            raise
    for model in models:
        model._remember(records[id(model)])
    return [_reference(records[id(model)]) for model in models]


class _BatchWriter:
    """The operation that writes a batch of records, for `with_backend`.

    After a failed attempt, the next one writes only the records the failure named as
    possibly unwritten (all of them when the backend does not say), so `pending` ends as the
    records no attempt confirmed.
    """

    def __init__(self, records: list[Record]) -> None:
        self.pending = records

    async def __call__(self, backend: StorageBackend) -> None:
        try:
            await backend.write_records(self.pending)
        except (StorageConnectionError, StorageOperationError) as exc:
            named = set(exc.failed_ids)
            if named:
                self.pending = [record for record in self.pending if str(record.id) in named]
            raise

    def unwritten_ids(self) -> list[str]:
        return list(dict.fromkeys(str(record.id) for record in self.pending))


async def load(cls: type[M], reference: ReferenceLike) -> M:
    settings = cls.__external_settings__
    id = reference_id(reference, settings.class_name)
    name = settings.class_name
    stored = await with_backend(
        settings.storage, lambda b: load_record(b, name, id), settings.retry
    )
    record = cls._live(stored)
    if record is None:
        raise RecordNotFoundError(name, [str(id)], settings.storage)
    model, upgraded = cls._from_record_migrated(record)
    if upgraded is not None:
        await _write_back(cls, [upgraded])
    return model


async def load_many(
    cls: type[M], references: Iterable[ReferenceLike], *, missing_ok: bool
) -> list[M | None]:
    settings = cls.__external_settings__
    name = settings.class_name
    ids = [reference_id(reference, name) for reference in references]
    unique = list(dict.fromkeys(ids))
    stored = await with_backend(
        settings.storage, lambda b: b.read_records(name, unique), settings.retry
    )
    records = stored if cls.__external_ttl__ is None else [cls._live(r) for r in stored]
    missing = [str(id) for id, record in zip(unique, records, strict=True) if record is None]
    if missing and not missing_ok:
        raise RecordNotFoundError(name, missing, settings.storage)
    loaded = await from_records(cls, (record for record in records if record is not None))
    return [loaded.get(id) for id in ids]


async def exists(cls: type[M], reference: ReferenceLike) -> bool:
    settings = cls.__external_settings__
    name = settings.class_name
    id = reference_id(reference, name)
    stored = await with_backend(
        settings.storage, lambda b: load_record(b, name, id), settings.retry
    )
    return cls._live(stored) is not None


async def delete_many(
    cls: type[M], references: Iterable[ReferenceLike], *, missing_ok: bool
) -> int:
    settings = cls.__external_settings__
    name = settings.class_name
    ids = list(dict.fromkeys(reference_id(reference, name) for reference in references))
    missing: list[str] = []
    if not missing_ok:  # one read first, to name the missing ids
        found = await with_backend(
            settings.storage, lambda b: b.read_records(name, ids), settings.retry
        )
        missing = [str(id) for id, record in zip(ids, found, strict=True) if record is None]
    deleted = await with_backend(
        settings.storage, lambda b: b.delete_records(name, ids), settings.retry
    )
    if missing:
        raise RecordNotFoundError(name, missing, settings.storage)
    return deleted


async def delete(
    cls: type[M], instance: M | None, reference: ReferenceLike | None, *, missing_ok: bool
) -> bool:
    settings = cls.__external_settings__
    name = settings.class_name
    if instance is not None and reference is not None:
        raise StorageValidationError(
            f"{cls.__name__}: model.delete_external() deletes the model's own record; "
            f"delete another by reference with {cls.__name__}.delete_external(reference)"
        )
    if instance is not None:
        metadata = instance.external_metadata
        if metadata is None:
            if missing_ok:
                return False
            raise RecordNotFoundError(name, ["(never saved)"])
        reference = {"class_name": metadata.class_name, "id": str(metadata.id)}
    if reference is None:
        raise StorageValidationError(f"{cls.__name__}.delete_external() needs a reference")
    id = reference_id(reference, name)
    deleted = await with_backend(
        settings.storage, lambda b: b.delete_records(name, [id]), settings.retry
    )
    if instance is not None:
        instance._forget()
    if not deleted and not missing_ok:
        raise RecordNotFoundError(name, [str(id)], settings.storage)
    return deleted > 0


async def purge(cls: type[M], older_than: timedelta | float | None, before: datetime | None) -> int:
    settings = cls.__external_settings__
    if before is None:
        age = older_than if older_than is not None else settings.ttl
        if isinstance(age, int | float) and not isinstance(age, bool):
            age = timedelta(seconds=age)  # seconds, as ttl takes them
        if not isinstance(age, timedelta) or age <= timedelta(0):
            raise StorageValidationError(
                f"{cls.__name__}.purge_external needs before, or older_than as a positive "
                f"duration (a timedelta or seconds), not {age!r}"
            )
        before = datetime.now(UTC) - age
    elif older_than is not None:
        raise StorageValidationError(
            f"{cls.__name__}.purge_external takes older_than or before, not both"
        )
    name, cutoff = settings.class_name, before
    return await with_backend(settings.storage, lambda b: b.purge(name, cutoff), settings.retry)


async def from_records(cls: type[M], records: Iterable[Record]) -> dict[UUID, M]:
    """Validate loaded records; write back the migrated ones if the class asks to."""
    models: dict[UUID, M] = {}
    migrated: list[Record] = []
    for record in records:
        models[record.id], upgraded = cls._from_record_migrated(record)
        if upgraded is not None:
            migrated.append(upgraded)
    if migrated:
        await _write_back(cls, migrated)
    return models


async def _write_back(cls: type[M], migrated: list[Record]) -> None:
    """Store migrated records if the class asks to."""
    settings = cls.__external_settings__
    if not settings.save_migrated:
        return
    try:  # best effort: the models were read fine, the next load migrates again
        await with_backend(settings.storage, lambda b: b.write_records(migrated), settings.retry)
    except ExternalStorageError as exc:
        _log.warning(
            "could not write back %d migrated %s records: %s",
            len(migrated),
            settings.class_name,
            exc,
        )
