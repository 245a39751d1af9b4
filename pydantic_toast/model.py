"""`ExternalBaseModel`: a Pydantic model that saves itself to a backend and loads back by id.

The model layer turns models into records and back. It holds no storage code: the backends
move the bytes, the registry finds the live backend, the bridge runs the sync twins.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, ClassVar, Literal, Self, TypedDict, overload
from uuid import UUID, uuid4

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import PydanticSerializationError

from pydantic_toast.backends.base import StorageBackend
from pydantic_toast.backends.records import Record, check_class_name, require_zstd
from pydantic_toast.bridge import run_sync
from pydantic_toast.errors import (
    ExternalStorageError,
    RecordNotFoundError,
    StorageConnectionError,
    StorageValidationError,
    mask_url,
)
from pydantic_toast.loader import load_record
from pydantic_toast.registry import check_storage_url, registered_schemes
from pydantic_toast.retry import RetryPolicy, with_backend

__all__ = [
    "ExternalBaseModel",
    "ExternalConfigDict",
    "ExternalMetadata",
    "ExternalNameWarning",
    "ExternalReference",
]

# The longest id string worth parsing: a UUID is 36 characters, 38 with braces, 45 as a URN.
_MAX_ID_LENGTH = 64


class ExternalConfigDict(ConfigDict, total=False):
    """Pydantic's `ConfigDict` plus the storage settings of an `ExternalBaseModel`."""

    storage: str
    """The storage URL, such as ``"sqlite:///models.db"`` or ``"postgresql://host/db"``."""

    schema_version: int
    """Stored with every record (default 1); raise it when the model's shape changes, and
    register a `migration` from the previous version."""

    class_name: str
    """The stable name records are stored under (default: the class's ``__name__``). Set it to
    rename or move the class without orphaning its records, or to tell apart two classes of
    the same name in one storage (``"billing.User"``)."""

    ttl: float | timedelta
    """Time to live of the records (seconds or a timedelta), counted from their last save.
    Redis expires them itself; elsewhere an expired record loads as missing, and
    `purge_external` deletes them."""

    save_migrated: bool
    """Write a record back after a load migrated it to the current schema version."""

    retries: int
    """How many times a load, save or delete is tried again after a connection failure
    (default 2, with exponential backoff); 0 turns retrying off."""

    retry_backoff: float
    """Seconds before the first retry (default 0.05), doubling for each next one."""

    compress_above: int
    """Compress a record's JSON with zstd when it is longer than this many bytes, on the
    backends that store bytes (Redis, S3, files); needs ``pydantic-toast[zstd]``."""


class ExternalReference(TypedDict):
    """What travels in place of a stored model."""

    class_name: str
    id: str


_log = logging.getLogger("pydantic_toast")

# What the load methods accept: a reference, or any mapping shaped like one (checked).
_ReferenceLike = ExternalReference | Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class ExternalMetadata:
    """A stored record's metadata, as of the instance's last save or load."""

    id: UUID
    class_name: str
    schema_version: int
    created_at: datetime
    updated_at: datetime


class _instance_or_class:
    """A method callable on the class (``User.delete_external(ref)``) and on an instance
    (``user.delete_external()``): the function gets the class and the instance or ``None``."""

    def __init__(self, function: Callable[..., Any]) -> None:
        self.__func__ = function
        self.__doc__ = function.__doc__

    def __get__(self, instance: object, owner: type) -> Callable[..., Any]:
        return partial(self.__func__, owner, instance)


class ExternalBaseModel(BaseModel):
    """A Pydantic model stored out of line and passed around as an `ExternalReference`.

    Subclasses set ``model_config = ExternalConfigDict(storage=...)``; the URL is checked when
    the class is defined. Everything Pydantic does (``model_dump``, ``model_validate``, ...)
    behaves exactly as on `BaseModel`.
    """

    # The record metadata lives in a slot, not a field or private attribute, so it takes no
    # part in equality, dumps or copies: a loaded model equals the one that was saved.
    __slots__ = ("_external_metadata", "_external_pending_id")

    model_config = ConfigDict(ignored_types=(_instance_or_class,))

    __external_storage__: ClassVar[str]
    __external_class_name__: ClassVar[str]
    __external_schema_version__: ClassVar[int]
    __external_ttl__: ClassVar[timedelta | None]
    __external_compress_above__: ClassVar[int | None]
    _retry: ClassVar[RetryPolicy]
    __external_migrations__: ClassVar[dict[int, Callable[[dict[str, Any]], dict[str, Any]]]]

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        owner = f"{cls.__module__}.{cls.__qualname__}"
        config = cls.model_config
        _check_config_keys(config, owner)
        storage = config.get("storage")
        if not storage:
            raise StorageValidationError(
                f"{owner} has no storage: set model_config = ExternalConfigDict("
                f"storage='scheme://...'); registered schemes: {', '.join(registered_schemes())}"
            )
        check_storage_url(storage, owner)
        assert isinstance(storage, str)  # check_storage_url proved it
        version = config.get("schema_version", 1)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise StorageValidationError(
                f"{owner}: schema_version must be a positive int, not {version!r}"
            )
        try:
            # A stable name is the class's own: a subclass inherits the config, not the name.
            explicit = config.get("class_name")
            if any(
                issubclass(base, ExternalBaseModel)
                and base is not ExternalBaseModel
                and base.model_config.get("class_name") == explicit
                for base in cls.__mro__[1:]
                if isinstance(base, type)
            ):
                explicit = None
            class_name = check_class_name(cls.__name__ if explicit is None else explicit)
        except StorageValidationError as exc:
            raise StorageValidationError(f"{owner}: {exc}") from exc
        ttl = config.get("ttl")
        if isinstance(ttl, int | float) and not isinstance(ttl, bool):
            ttl = timedelta(seconds=ttl)
        if ttl is not None and (not isinstance(ttl, timedelta) or ttl <= timedelta(0)):
            raise StorageValidationError(f"{owner}: ttl must be a positive duration, not {ttl!r}")
        compress_above = config.get("compress_above")
        if compress_above is not None:
            if not isinstance(compress_above, int) or compress_above < 0:
                raise StorageValidationError(
                    f"{owner}: compress_above must be a byte count, not {compress_above!r}"
                )
            try:
                require_zstd()
            except StorageValidationError as exc:
                raise StorageValidationError(f"{owner}: {exc}") from exc
        retries, backoff = config.get("retries", 2), config.get("retry_backoff", 0.05)
        if not isinstance(retries, int) or retries < 0 or not isinstance(backoff, int | float):
            raise StorageValidationError(
                f"{owner}: retries must be a count and retry_backoff seconds, "
                f"not {retries!r} and {backoff!r}"
            )
        _claim_name(cls, storage, class_name, owner)
        cls.__external_storage__ = storage
        cls.__external_class_name__ = class_name
        cls.__external_schema_version__ = version
        cls.__external_ttl__ = ttl
        cls.__external_migrations__ = {}
        cls.__external_compress_above__ = compress_above
        cls._retry = RetryPolicy(retries, float(backoff))

    @property
    def external_metadata(self) -> ExternalMetadata | None:
        """Id, class name, schema version and timestamps of the stored record, if any."""
        return _metadata_of(self)

    @classmethod
    def is_external_reference(cls, data: object) -> bool:
        """Whether ``data`` is a reference: exactly ``class_name`` and a UUID ``id``.

        Called on a subclass, the reference must also name that subclass.
        """
        if not isinstance(data, Mapping) or len(data) != 2:
            return False
        class_name, id = data.get("class_name"), data.get("id")
        if not isinstance(class_name, str) or _parse_id(id) is None:
            return False
        if cls is ExternalBaseModel:
            return True
        return class_name == cls.__external_class_name__

    async def save_external(self) -> ExternalReference:
        """Store this model and return its reference.

        The first save assigns an id; saving the same instance again updates that record
        (``created_at`` stays, ``updated_at`` moves). The record is written when this returns.
        """
        record = self._to_record(datetime.now(UTC))
        cls = type(self)
        await with_backend(
            cls.__external_storage__, lambda backend: backend.write_record(record), cls._retry
        )
        _set_metadata(self, record)
        return {"class_name": record.class_name, "id": str(record.id)}

    def save_external_sync(self) -> ExternalReference:
        """`save_external` for synchronous code, including code inside a running loop."""
        return run_sync(self.save_external())

    @classmethod
    async def load_external(cls, reference: _ReferenceLike) -> Self:
        """Load the model a reference points to.

        Raises `RecordNotFoundError` when there is no such record, and
        `StorageValidationError` when the reference is malformed, names another class, or the
        stored data no longer validates. Loads that tasks issue in the same event-loop turn
        reach the backend as one batch.
        """
        id = cls._reference_id(reference)
        name = cls.__external_class_name__
        record = cls._live(
            await with_backend(
                cls.__external_storage__, lambda b: load_record(b, name, id), cls._retry
            )
        )
        if record is None:
            raise RecordNotFoundError(name, [str(id)], cls.__external_storage__)
        return (await cls._from_records([record]))[id]

    @classmethod
    def load_external_sync(cls, reference: _ReferenceLike) -> Self:
        """`load_external` for synchronous code, including code inside a running loop."""
        return run_sync(cls.load_external(reference))

    @classmethod
    async def save_external_many(cls, models: Iterable[Self]) -> list[ExternalReference]:
        """Store many models in one batch per storage; return their references, in order.

        Each model keeps or gets its id exactly as with `save_external`; an instance listed
        twice is written once.

        A batch is not atomic everywhere (one PostgreSQL statement is; Redis script calls of up
        to 1,000 records and concurrent S3 puts are not). When it fails, the models whose
        records were stored get their `external_metadata` as after a save, and the
        `StorageConnectionError` names in ``failed_ids`` the ids of the records that may not
        be stored. Saving the same models again completes the batch: the stored ones keep
        their ids, so they are updated, not duplicated.
        """
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
                batches.setdefault(type(model).__external_storage__, []).append(record)
        groups = list(batches.items())
        for index, (storage, batch) in enumerate(groups):
            writer = _BatchWriter(batch)
            try:
                await with_backend(storage, writer, cls._retry)
            except StorageConnectionError as exc:
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
                        _set_metadata(model, records[id(model)])
                raise
        for model in models:
            _set_metadata(model, records[id(model)])
        return [
            {"class_name": record.class_name, "id": str(record.id)}
            for record in (records[id(model)] for model in models)
        ]

    @classmethod
    def save_external_many_sync(cls, models: Iterable[Self]) -> list[ExternalReference]:
        """`save_external_many` for synchronous code."""
        return run_sync(cls.save_external_many(models))

    @overload
    @classmethod
    async def load_external_many(
        cls,
        references: Iterable[_ReferenceLike],
        *,
        missing_ok: Literal[False] = False,
    ) -> list[Self]: ...

    @overload
    @classmethod
    async def load_external_many(
        cls, references: Iterable[_ReferenceLike], *, missing_ok: bool
    ) -> list[Self | None]: ...

    @classmethod
    async def load_external_many(
        cls,
        references: Iterable[_ReferenceLike],
        *,
        missing_ok: bool = False,
    ) -> list[Self] | list[Self | None]:
        """Load many models in one batch read, in the order of ``references``.

        Missing records raise one `RecordNotFoundError` naming every missing id, or, with
        ``missing_ok=True``, come back as ``None``. A reference listed twice gives the same
        instance twice.
        """
        ids = [cls._reference_id(reference) for reference in references]
        unique = list(dict.fromkeys(ids))
        name = cls.__external_class_name__
        stored = await with_backend(
            cls.__external_storage__, lambda b: b.read_records(name, unique), cls._retry
        )
        records = [cls._live(r) for r in stored]
        missing = [str(id) for id, record in zip(unique, records, strict=True) if record is None]
        if missing and not missing_ok:
            raise RecordNotFoundError(name, missing, cls.__external_storage__)
        loaded = await cls._from_records(r for r in records if r is not None)
        return [loaded.get(id) for id in ids]

    @overload
    @classmethod
    def load_external_many_sync(
        cls,
        references: Iterable[_ReferenceLike],
        *,
        missing_ok: Literal[False] = False,
    ) -> list[Self]: ...

    @overload
    @classmethod
    def load_external_many_sync(
        cls, references: Iterable[_ReferenceLike], *, missing_ok: bool
    ) -> list[Self | None]: ...

    @classmethod
    def load_external_many_sync(
        cls,
        references: Iterable[_ReferenceLike],
        *,
        missing_ok: bool = False,
    ) -> list[Self] | list[Self | None]:
        """`load_external_many` for synchronous code."""
        return run_sync(cls.load_external_many(references, missing_ok=missing_ok))

    @classmethod
    async def exists_external(cls, reference: _ReferenceLike) -> bool:
        """Whether the record a reference points to exists (and has not expired)."""
        id = cls._reference_id(reference)
        name = cls.__external_class_name__
        record = await with_backend(
            cls.__external_storage__, lambda b: load_record(b, name, id), cls._retry
        )
        record = cls._live(record)
        return record is not None and record.class_name == name

    @classmethod
    def exists_external_sync(cls, reference: _ReferenceLike) -> bool:
        """`exists_external` for synchronous code."""
        return run_sync(cls.exists_external(reference))

    @classmethod
    async def delete_external_many(
        cls, references: Iterable[_ReferenceLike], *, missing_ok: bool = True
    ) -> int:
        """Delete the records of ``references`` in one batch; return how many existed.

        Missing records are no error, unless ``missing_ok=False``: then, if any was missing,
        `RecordNotFoundError` is raised after the others are deleted.
        """
        ids = list(dict.fromkeys(cls._reference_id(reference) for reference in references))
        name = cls.__external_class_name__
        missing: list[str] = []
        if not missing_ok:  # one read first, to name the missing ids
            found = await with_backend(
                cls.__external_storage__, lambda b: b.read_records(name, ids), cls._retry
            )
            missing = [str(id) for id, record in zip(ids, found, strict=True) if record is None]
        deleted = await with_backend(
            cls.__external_storage__, lambda b: b.delete_records(name, ids), cls._retry
        )
        if missing:
            raise RecordNotFoundError(name, missing, cls.__external_storage__)
        return deleted

    @classmethod
    def delete_external_many_sync(
        cls, references: Iterable[_ReferenceLike], *, missing_ok: bool = True
    ) -> int:
        """`delete_external_many` for synchronous code."""
        return run_sync(cls.delete_external_many(references, missing_ok=missing_ok))

    @_instance_or_class
    async def delete_external(
        cls: type[ExternalBaseModel],
        instance: ExternalBaseModel | None,
        reference: _ReferenceLike | None = None,
        *,
        missing_ok: bool = True,
    ) -> bool:
        """Delete a record: ``await model.delete_external()`` deletes the model's own record,
        ``await User.delete_external(reference)`` the one a reference points to.

        Returns whether a record was deleted; a missing one is no error unless
        ``missing_ok=False`` (then `RecordNotFoundError`). A deleted model forgets its id, so
        saving it again creates a new record.
        """
        if instance is not None:
            metadata = _metadata_of(instance)
            if metadata is None:
                if missing_ok:
                    return False
                raise RecordNotFoundError(cls.__external_class_name__, ["(never saved)"])
            reference = {"class_name": metadata.class_name, "id": str(metadata.id)}
        if reference is None:
            raise StorageValidationError(f"{cls.__name__}.delete_external() needs a reference")
        id = cls._reference_id(reference)
        name = cls.__external_class_name__
        deleted = (
            await with_backend(
                cls.__external_storage__, lambda b: b.delete_records(name, [id]), cls._retry
            )
            > 0
        )
        if instance is not None:
            _METADATA_SLOT.__delete__(instance)
            with contextlib.suppress(AttributeError):
                _PENDING_ID_SLOT.__delete__(instance)
        if not deleted and not missing_ok:
            raise RecordNotFoundError(name, [str(id)], cls.__external_storage__)
        return deleted

    @_instance_or_class
    def delete_external_sync(
        cls: type[ExternalBaseModel],
        instance: ExternalBaseModel | None,
        reference: _ReferenceLike | None = None,
        *,
        missing_ok: bool = True,
    ) -> bool:
        """`delete_external` for synchronous code (``model.delete_external_sync()`` or
        ``User.delete_external_sync(reference)``)."""
        delete = cls.delete_external if instance is None else instance.delete_external
        result: bool = run_sync(delete(reference, missing_ok=missing_ok))
        return result

    @classmethod
    async def purge_external(
        cls, *, older_than: timedelta | None = None, before: datetime | None = None
    ) -> int:
        """Delete this class's records not updated since ``before`` (or for ``older_than``),
        in batches; without either, those past the class's ttl. Returns how many."""
        if before is None:
            age = older_than if older_than is not None else cls.__external_ttl__
            if age is None:
                raise StorageValidationError(
                    f"{cls.__name__}.purge_external needs older_than or before"
                )
            before = datetime.now(UTC) - age
        name, cutoff = cls.__external_class_name__, before
        return await with_backend(
            cls.__external_storage__, lambda b: b.purge(name, cutoff), cls._retry
        )

    @classmethod
    def purge_external_sync(
        cls, *, older_than: timedelta | None = None, before: datetime | None = None
    ) -> int:
        """`purge_external` for synchronous code."""
        return run_sync(cls.purge_external(older_than=older_than, before=before))

    def _to_record(self, now: datetime, context: Any = None) -> Record:
        """This model as a record: its id and ``created_at`` if it was saved or loaded before.

        ``context`` reaches `External` fields of this model when it is stored by a dump.
        """
        cls = type(self)
        metadata = _metadata_of(self)
        if metadata is None:
            # The id is the instance's from its first save attempt on, so a retry after a
            # failed first save, or two saves at once, write one record, not an orphan too.
            try:
                pending: UUID = _PENDING_ID_SLOT.__get__(self)
            except AttributeError:
                pending = uuid4()
                _PENDING_ID_SLOT.__set__(self, pending)
        try:
            data = cls.__pydantic_serializer__.to_json(self, context=context)
        except PydanticSerializationError as exc:
            raise StorageValidationError(
                f"{cls.__external_class_name__} cannot be serialized to JSON: {exc}"
            ) from exc
        # Pydantic writes NaN and infinity as null by default, which never loads back into a
        # float field: refuse to store what cannot be read, unless the model's own config
        # writes them in a form that loads back (ser_json_inf_nan="strings" or "constants").
        if b"null" in data and cls.model_config.get("ser_json_inf_nan", "null") == "null":
            where = _non_finite_floats(self)
            if where is not None:
                raise StorageValidationError(
                    f"{cls.__external_class_name__} field {where} is not a finite number: "
                    "it would be stored as null and never load back (set "
                    "ser_json_inf_nan='strings' in the model's config to store it)"
                )
        return Record(
            id=pending if metadata is None else metadata.id,
            class_name=cls.__external_class_name__,
            data=data,
            schema_version=cls.__external_schema_version__,
            created_at=now if metadata is None else metadata.created_at,
            updated_at=now,
            compress_above=cls.__external_compress_above__,
            ttl=cls.__external_ttl__,
        )

    @classmethod
    def _reference_id(cls, reference: object) -> UUID:
        """Check a reference against this class and return its id, before any I/O."""
        expected = cls.__external_class_name__
        if not isinstance(reference, Mapping):
            raise StorageValidationError(
                f"{expected}: a reference must be a mapping with 'class_name' and 'id', "
                f"not {type(reference).__name__}"
            )
        if len(reference) > 2 and (extra := set(reference) - {"class_name", "id"}):
            raise StorageValidationError(
                f"{expected}: a reference has only 'class_name' and 'id', "
                f"not {_short(sorted(map(str, extra)))}"
            )
        class_name = reference.get("class_name")
        if class_name != expected:
            raise StorageValidationError(
                f"reference is for class {_short(class_name)}, not {expected}"
            )
        raw_id = reference.get("id")
        id = _parse_id(raw_id)
        if id is None:
            raise StorageValidationError(f"{expected}: invalid id {_short(raw_id)}: not a UUID")
        return id

    @classmethod
    def migration(
        cls, from_version: int
    ) -> Callable[
        [Callable[[dict[str, Any]], dict[str, Any]]], Callable[[dict[str, Any]], dict[str, Any]]
    ]:
        """Register a function that upgrades a stored dict from ``from_version`` to the next.

        A load of an older record applies the steps in order, then validates::

            @User.migration(from_version=1)
            def split_name(data: dict[str, Any]) -> dict[str, Any]:
                first, _, last = data.pop("name").partition(" ")
                return {**data, "first_name": first, "last_name": last}
        """
        if (
            not isinstance(from_version, int)
            or not 1 <= from_version < cls.__external_schema_version__
        ):
            raise StorageValidationError(
                f"{cls.__name__}: a migration goes from a version below the current "
                f"schema_version {cls.__external_schema_version__}, not from {from_version!r}"
            )

        def register(
            step: Callable[[dict[str, Any]], dict[str, Any]],
        ) -> Callable[[dict[str, Any]], dict[str, Any]]:
            cls.__external_migrations__[from_version] = step
            return step

        return register

    @classmethod
    def _from_record(cls, record: Record, context: Any = None) -> Self:
        """Validate a loaded record as this class, migrating it first if it is older."""
        return cls._from_record_migrated(record, context)[0]

    @classmethod
    def _from_record_migrated(
        cls, record: Record, context: Any = None
    ) -> tuple[Self, Record | None]:
        """The model, and the upgraded record when a migration ran (else ``None``)."""
        expected = cls.__external_class_name__
        if record.class_name != expected:
            raise StorageValidationError(
                f"stored record {record.id} belongs to class {record.class_name!r}, "
                f"not {expected} ({mask_url(cls.__external_storage__)})"
            )
        current = cls.__external_schema_version__
        data = record.data if record.schema_version == current else cls._migrate(record)
        try:
            model = cls.model_validate_json(data, context=context)
        except ValidationError as exc:
            raise StorageValidationError(
                f"stored {expected} record {record.id} no longer validates: {exc}"
            ) from exc
        upgraded = None
        if data is not record.data:
            # Write back what the migration produced (references stay references), with this
            # class's own ttl and compression, as a save would.
            upgraded = replace(
                record,
                data=data,
                schema_version=current,
                ttl=cls.__external_ttl__,
                compress_above=cls.__external_compress_above__,
            )
        _set_metadata(model, upgraded or record)
        return model, upgraded

    @classmethod
    def _migrate(cls, record: Record) -> bytes:
        current = cls.__external_schema_version__
        name = cls.__external_class_name__
        if record.schema_version > current:
            raise StorageValidationError(
                f"stored {name} record {record.id} has schema version {record.schema_version}, "
                f"newer than this code's {current}: deploy the newer model first"
            )
        try:
            data = json.loads(record.data)
        except (ValueError, RecursionError) as exc:
            raise StorageValidationError(
                f"stored {name} record {record.id} is corrupt: {exc}"
            ) from exc
        for version in range(record.schema_version, current):
            step = cls.__external_migrations__.get(version)
            if step is None:
                raise StorageValidationError(
                    f"stored {name} record {record.id} has schema version {record.schema_version} "
                    f"and no migration from version {version} to {version + 1} is registered"
                )
            try:
                data = step(data)
            except Exception as exc:
                raise StorageValidationError(
                    f"migration of {name} record {record.id} from version {version} failed: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def _live(cls, record: Record | None) -> Record | None:
        """``record``, or ``None`` when there is none or it outlived the class's ttl."""
        ttl = cls.__external_ttl__
        if record is not None and ttl is not None and _expired(record.updated_at, ttl):
            return None
        return record

    @classmethod
    async def _from_records(cls, records: Iterable[Record]) -> dict[UUID, Self]:
        """Validate loaded records; write back the migrated ones if the class asks to."""
        models: dict[UUID, Self] = {}
        migrated: list[Record] = []
        for record in records:
            models[record.id], upgraded = cls._from_record_migrated(record)
            if upgraded is not None:
                migrated.append(upgraded)
        if migrated and cls.model_config.get("save_migrated"):
            try:  # best effort: the models were read fine, the next load migrates again
                await with_backend(
                    cls.__external_storage__, lambda b: b.write_records(migrated), cls._retry
                )
            except ExternalStorageError as exc:
                _log.warning(
                    "could not write back %d migrated %s records: %s",
                    len(migrated),
                    cls.__external_class_name__,
                    exc,
                )
        return models


_METADATA_SLOT = ExternalBaseModel.__dict__["_external_metadata"]
_PENDING_ID_SLOT = ExternalBaseModel.__dict__["_external_pending_id"]


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
        except StorageConnectionError as exc:
            named = set(exc.failed_ids)
            if named:
                self.pending = [record for record in self.pending if str(record.id) in named]
            raise

    def unwritten_ids(self) -> list[str]:
        return list(dict.fromkeys(str(record.id) for record in self.pending))


def _metadata_of(model: ExternalBaseModel) -> ExternalMetadata | None:
    try:
        stored: _StoredMetadata = _METADATA_SLOT.__get__(model)
    except AttributeError:
        return None
    return ExternalMetadata(*stored)


# What the slot holds: ExternalMetadata's fields as a plain tuple, which is cheaper to make
# on every load than the dataclass (built only when someone asks for it).
_StoredMetadata = tuple[UUID, str, int, datetime, datetime]


def _set_metadata(model: ExternalBaseModel, record: Record) -> None:
    _METADATA_SLOT.__set__(
        model,
        (record.id, record.class_name, record.schema_version, record.created_at, record.updated_at),
    )


_CONFIG_KEYS = frozenset(ExternalConfigDict.__optional_keys__) | frozenset(
    ExternalConfigDict.__required_keys__
)


def _check_config_keys(config: Mapping[str, Any], owner: str) -> None:
    """A misspelt setting (``tll=60``) would be ignored without a word: refuse it."""
    for key in config:
        if key not in _CONFIG_KEYS:
            close = difflib.get_close_matches(key, _CONFIG_KEYS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise StorageValidationError(
                f"{owner}: unknown ExternalConfigDict key {_short(key)}{hint}"
            )


def _non_finite_floats(value: object, path: str = "") -> str | None:
    """The path of the first NaN or infinity in a dumped model, or ``None``."""
    if isinstance(value, float):
        return None if math.isfinite(value) else path or "the value"
    if isinstance(value, BaseModel):
        items: Iterable[tuple[object, object]] = (
            (k, getattr(value, k)) for k in type(value).model_fields
        )
    elif isinstance(value, Mapping):
        items = value.items()
    elif isinstance(value, list | tuple | set | frozenset):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _non_finite_floats(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


# Which class stores under which name in which storage: (storage, class name) -> owner.
_names: dict[tuple[str, str], str] = {}


def _claim_name(cls: type, storage: str, class_name: str, owner: str) -> None:
    """Refuse two different classes storing under one name in one storage.

    Redefining the same class (a notebook cell run again, a reloaded module) is no collision;
    classes defined inside functions, as tests do, only get a warning.
    """
    key = (storage, class_name)
    holder = _names.get(key)
    _names[key] = owner
    if holder is None or holder == owner:
        return
    message = (
        f"{owner} and {holder} both store records as {class_name!r} in "
        f"{mask_url(storage)}; give one a stable name: ExternalConfigDict(class_name=...)"
    )
    if "<locals>" in owner or "<locals>" in holder:
        warnings.warn(message, ExternalNameWarning, stacklevel=4)
        return
    _names[key] = holder
    raise StorageValidationError(message)


class ExternalNameWarning(UserWarning):
    """Two classes defined inside functions store under one name in one storage."""


def _expired(updated_at: datetime, ttl: timedelta) -> bool:
    """Whether a record last updated at ``updated_at`` outlived ``ttl``. Computed from now
    backwards, so a record at the edge of time (year 9999, PostgreSQL's ``infinity``) never
    overflows: it simply has not expired."""
    try:
        return updated_at < datetime.now(UTC) - ttl
    except OverflowError:  # a ttl reaching before year 1: nothing is that old
        return False


def _parse_id(value: object) -> UUID | None:
    if isinstance(value, UUID):
        return value
    if not isinstance(value, str) or len(value) > _MAX_ID_LENGTH:
        return None
    try:
        return UUID(value)
    except ValueError:
        return None


def _short(value: object) -> str:
    """A value for an error message: its repr, cut short so hostile input stays small."""
    shown = repr(value)
    return shown if len(shown) <= 80 else shown[:77] + "..."
