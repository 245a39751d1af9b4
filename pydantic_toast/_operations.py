"""What `ExternalBaseModel`'s methods do: each operation as one sequence of steps.

Every step that talks to a store goes through `with_backend` (the live backend of the class's
URL, with the class's retries), and every reference is checked by `reference_id` before any
I/O. The model class itself only forwards here.

Each operation is one OpenTelemetry span when a provider is configured (`_telemetry`): the
operation starts it first and ends it with the records it moved, or fails it with what it
raised. ``op`` is ``None`` otherwise, and then costs one test per step.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, TypeVar

from pydantic_toast import _telemetry
from pydantic_toast._config import ModelSettings, settings_of
from pydantic_toast._crypto import sign_reference
from pydantic_toast._errors import (
    ExternalStorageError,
    RecordNotFoundError,
    StorageConnectionError,
    StorageOperationError,
    StorageValidationError,
)
from pydantic_toast._loader import load_record
from pydantic_toast._records import keyring_of
from pydantic_toast._references import (
    ExternalReference,
    ReferenceLike,
    reference_id,
    reference_ids,
)
from pydantic_toast._retry import with_backend
from pydantic_toast.backends.base import StorageBackend
from pydantic_toast.backends.records import Record, id_text, id_texts

if TYPE_CHECKING:
    from uuid import UUID

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


def _reference(settings: ModelSettings, record: Record) -> ExternalReference:
    if settings.signed_references:
        keyring = keyring_of(settings)
        signed = sign_reference(keyring, record.class_name, record.id, settings.reference_ttl)
        return signed  # type: ignore[return-value]
    return {"class_name": record.class_name, "id": id_text(record.id)}


def _id_of(settings: ModelSettings, reference: object) -> UUID:
    """The id of a reference to the class, checked: with its signature and expiry when the
    class signs its references."""
    if not settings.signed_references:
        return reference_id(reference, settings.class_name)
    keyring = keyring_of(settings)
    return reference_id(
        reference, settings.class_name, keyring, expiring=settings.references_expire
    )


def _ids_of(settings: ModelSettings, references: Sequence[object]) -> list[UUID]:
    """`_id_of` of each reference, in order."""
    if not settings.signed_references:
        return reference_ids(references, settings.class_name)
    keyring = keyring_of(settings)
    return reference_ids(
        references, settings.class_name, keyring, expiring=settings.references_expire
    )


async def save(model: ExternalBaseModel) -> ExternalReference:
    settings = settings_of(type(model))
    op = _telemetry.start(_telemetry.SAVE, settings.storage, settings.class_name)
    try:
        record = model._to_record(datetime.now(UTC))
        try:
            await with_backend(
                settings.storage, lambda b: b.write_record(record), settings.retry, op
            )
        except (StorageConnectionError, StorageOperationError) as exc:
            if not exc.failed_ids:  # it failed before writing (connecting): unconfirmed too
                exc.failed_ids = [str(record.id)]
            raise
    except BaseException as exc:
        if op is not None:
            op.fail(exc)
        raise
    model._remember(record)
    if op is not None:
        op.end((record,))
    return _reference(settings, record)


async def save_many(cls: type[M], models: Iterable[M]) -> list[ExternalReference]:
    models = list(models)
    settings = settings_of(cls)
    operation = _telemetry.start(
        _telemetry.SAVE_MANY, settings.storage, settings.class_name, len(models)
    )
    with operation or _telemetry.NOTHING as op:
        now = datetime.now(UTC)
        records: dict[int, Record] = {}
        batches: dict[str, list[Record]] = {}
        for model in models:
            if not isinstance(model, cls):
                raise StorageValidationError(
                    f"save_external_many of {cls.__name__} got {type(model).__name__}"
                )
            key = id(model)
            if key not in records:
                record = records[key] = model._to_record(now)
                storage = type(model).__external_settings__.storage
                batch = batches.get(storage)
                if batch is None:
                    batch = batches[storage] = []
                batch.append(record)
        groups = list(batches.items())
        for index, (storage, batch) in enumerate(groups):
            writer = _BatchWriter(batch)
            try:
                await with_backend(storage, writer, settings.retry, op)
            except (StorageConnectionError, StorageOperationError) as exc:
                # Unconfirmed: what this storage's writer has left, and every record of the
                # storages not tried yet. The others are stored: give their models metadata.
                unwritten = writer.unwritten_ids()
                unwritten += [
                    str(record.id) for _, later in groups[index + 1 :] for record in later
                ]
                exc.failed_ids = unwritten
                unconfirmed = set(exc.failed_ids)
                for model in models:
                    if str(records[id(model)].id) not in unconfirmed:
                        model._remember(records[id(model)])
                raise
        saved = [records[id(model)] for model in models]
        for model, record in zip(models, saved, strict=True):
            model._remember(record)
        if op is not None:
            op.records = records.values()
    if settings.signed_references:
        return [_reference(settings, record) for record in saved]
    texts = id_texts([record.id for record in saved])
    return [
        {"class_name": record.class_name, "id": text}
        for record, text in zip(saved, texts, strict=True)
    ]


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
    settings = settings_of(cls)
    name = settings.class_name
    op = _telemetry.start(_telemetry.LOAD, settings.storage, name)
    try:
        id = _id_of(settings, reference)
        stored = await with_backend(
            settings.storage, lambda b: load_record(b, name, id), settings.retry, op
        )
        record = cls._live(stored)
        if record is None:
            raise RecordNotFoundError(name, [str(id)], settings.storage)
        model, upgraded = cls._from_record_migrated(record)
        if upgraded is not None:
            await _write_back(cls, [upgraded])
    except BaseException as exc:
        if op is not None:
            op.fail(exc)
        raise
    if op is not None:
        op.end((record,))
    return model


async def load_many(
    cls: type[M], references: Iterable[ReferenceLike], *, missing_ok: bool
) -> list[M | None]:
    settings = settings_of(cls)
    name = settings.class_name
    references = list(references)
    operation = _telemetry.start(_telemetry.LOAD_MANY, settings.storage, name, len(references))
    with operation or _telemetry.NOTHING as op:
        ids = _ids_of(settings, references)
        # Each id once, found by its integer: a UUID's hash runs Python code, an int's does not.
        unique = list({id.int: id for id in ids}.values())
        stored = await with_backend(
            settings.storage, lambda b: b.read_records(name, unique), settings.retry, op
        )
        records = stored if settings.ttl is None else [cls._live(r) for r in stored]
        missing = [str(id) for id, record in zip(unique, records, strict=True) if record is None]
        if missing and not missing_ok:
            raise RecordNotFoundError(name, missing, settings.storage)
        loaded = await from_records(cls, records)
        if op is not None:
            op.records = records
    if len(unique) == len(ids):
        return loaded
    by_id = {id.int: model for id, model in zip(unique, loaded, strict=True)}
    return [by_id[id.int] for id in ids]


async def exists(cls: type[M], reference: ReferenceLike) -> bool:
    settings = settings_of(cls)
    name = settings.class_name
    with _telemetry.start(_telemetry.EXISTS, settings.storage, name) or _telemetry.NOTHING as op:
        id = _id_of(settings, reference)
        stored = await with_backend(
            settings.storage, lambda b: load_record(b, name, id), settings.retry, op
        )
    return cls._live(stored) is not None


async def delete_many(
    cls: type[M], references: Iterable[ReferenceLike], *, missing_ok: bool
) -> int:
    settings = settings_of(cls)
    name = settings.class_name
    references = list(references)
    operation = _telemetry.start(_telemetry.DELETE_MANY, settings.storage, name, len(references))
    with operation or _telemetry.NOTHING as op:
        ids = list(dict.fromkeys(_ids_of(settings, references)))
        missing: list[str] = []
        if not missing_ok:  # one read first, to name the missing ids
            found = await with_backend(
                settings.storage, lambda b: b.read_records(name, ids), settings.retry, op
            )
            missing = [str(id) for id, record in zip(ids, found, strict=True) if record is None]
        deleted = await with_backend(
            settings.storage, lambda b: b.delete_records(name, ids), settings.retry, op
        )
        if missing:
            raise RecordNotFoundError(name, missing, settings.storage)
    return deleted


async def delete(
    cls: type[M], instance: M | None, reference: ReferenceLike | None, *, missing_ok: bool
) -> bool:
    settings = settings_of(cls)
    name = settings.class_name
    with _telemetry.start(_telemetry.DELETE, settings.storage, name) or _telemetry.NOTHING as op:
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
            # The model's own record: its id is the instance's, not a reference from outside.
            id = reference_id({"class_name": metadata.class_name, "id": str(metadata.id)}, name)
        elif reference is None:
            raise StorageValidationError(f"{cls.__name__}.delete_external() needs a reference")
        else:
            id = _id_of(settings, reference)
        deleted = await with_backend(
            settings.storage, lambda b: b.delete_records(name, [id]), settings.retry, op
        )
        if instance is not None:
            instance._forget()
        if not deleted and not missing_ok:
            raise RecordNotFoundError(name, [str(id)], settings.storage)
    return deleted > 0


async def purge(cls: type[M], older_than: timedelta | float | None, before: datetime | None) -> int:
    settings = settings_of(cls)
    with (
        _telemetry.start(_telemetry.PURGE, settings.storage, settings.class_name)
        or _telemetry.NOTHING as op
    ):
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
        purged = await with_backend(
            settings.storage, lambda b: b.purge(name, cutoff), settings.retry, op
        )
        if op is not None:
            op.set_batch_size(purged)
    return purged


async def from_records(cls: type[M], records: Sequence[Record | None]) -> list[M | None]:
    """Validate loaded records, in order (``None`` stays ``None``); write back the migrated
    ones if the class asks to."""
    models: list[M | None] = []
    migrated: list[Record] = []
    for record in records:
        if record is None:
            models.append(None)
            continue
        model, upgraded = cls._from_record_migrated(record)
        models.append(model)
        if upgraded is not None:
            migrated.append(upgraded)
    if migrated:
        await _write_back(cls, migrated)
    return models


async def _write_back(cls: type[M], migrated: list[Record]) -> None:
    """Store migrated records if the class asks to."""
    settings = settings_of(cls)
    if not settings.save_migrated:
        return
    try:  # best effort: the models were read fine, the next load migrates again
        # Conditional: a save that landed since the read is newer than the migrated copy.
        read_at = [record.updated_at for record in migrated]
        await with_backend(
            settings.storage,
            lambda b: b.write_records_if_unchanged(migrated, read_at),
            settings.retry,
        )
    except ExternalStorageError as exc:
        _log.warning(
            "could not write back %d migrated %s records: %s",
            len(migrated),
            settings.class_name,
            exc,
        )
