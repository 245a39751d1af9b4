"""`ExternalBaseModel`: a Pydantic model that saves itself to a backend and loads back by id.

The model layer turns models into records and back. It holds no storage code: the backends
move the bytes, the registry finds the live backend, the bridge runs the sync twins.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal, Self, TypedDict, overload
from uuid import UUID, uuid4

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import PydanticSerializationError

from pydantic_toast.backends.base import Record, check_class_name
from pydantic_toast.bridge import run_sync
from pydantic_toast.errors import RecordNotFoundError, StorageValidationError, mask_url
from pydantic_toast.loader import load_record
from pydantic_toast.registry import check_storage_url, get_backend, registered_schemes

__all__ = ["ExternalBaseModel", "ExternalConfigDict", "ExternalMetadata", "ExternalReference"]

# The longest id string worth parsing: a UUID is 36 characters, 38 with braces, 45 as a URN.
_MAX_ID_LENGTH = 64


class ExternalConfigDict(ConfigDict, total=False):
    """Pydantic's `ConfigDict` plus the storage settings of an `ExternalBaseModel`."""

    storage: str
    """The storage URL, such as ``"sqlite:///models.db"`` or ``"postgresql://host/db"``."""

    schema_version: int
    """Stored with every record (default 1); raise it when the model's shape changes."""


class ExternalReference(TypedDict):
    """What travels in place of a stored model."""

    class_name: str
    id: str


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


class ExternalBaseModel(BaseModel):
    """A Pydantic model stored out of line and passed around as an `ExternalReference`.

    Subclasses set ``model_config = ExternalConfigDict(storage=...)``; the URL is checked when
    the class is defined. Everything Pydantic does (``model_dump``, ``model_validate``, ...)
    behaves exactly as on `BaseModel`.
    """

    # The record metadata lives in a slot, not a field or private attribute, so it takes no
    # part in equality, dumps or copies: a loaded model equals the one that was saved.
    __slots__ = ("_external_metadata",)

    __external_storage__: ClassVar[str]
    __external_class_name__: ClassVar[str]
    __external_schema_version__: ClassVar[int]

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        owner = f"{cls.__module__}.{cls.__qualname__}"
        config = cls.model_config
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
            class_name = check_class_name(cls.__name__)
        except StorageValidationError as exc:
            raise StorageValidationError(f"{owner}: {exc}") from exc
        cls.__external_storage__ = storage
        cls.__external_class_name__ = class_name
        cls.__external_schema_version__ = version

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
        backend = await get_backend(type(self).__external_storage__)
        await backend.write_record(record)
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
        backend = await get_backend(cls.__external_storage__)
        record = await load_record(backend, cls.__external_class_name__, id)
        if record is None:
            raise RecordNotFoundError(cls.__external_class_name__, [str(id)], backend.url)
        return cls._from_record(record)

    @classmethod
    def load_external_sync(cls, reference: _ReferenceLike) -> Self:
        """`load_external` for synchronous code, including code inside a running loop."""
        return run_sync(cls.load_external(reference))

    @classmethod
    async def save_external_many(cls, models: Iterable[Self]) -> list[ExternalReference]:
        """Store many models in one batch per storage; return their references, in order.

        Each model keeps or gets its id exactly as with `save_external`; an instance listed
        twice is written once.
        """
        now = datetime.now(UTC)
        models = list(models)
        records: dict[int, Record] = {}
        batches: dict[str, list[Record]] = {}
        for model in models:
            if not isinstance(model, cls):
                raise TypeError(f"save_external_many of {cls.__name__} got {type(model).__name__}")
            if id(model) not in records:
                record = records[id(model)] = model._to_record(now)
                batches.setdefault(type(model).__external_storage__, []).append(record)
        for storage, batch in batches.items():
            backend = await get_backend(storage)
            await backend.write_records(batch)
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
        backend = await get_backend(cls.__external_storage__)
        records = await backend.read_records(cls.__external_class_name__, unique)
        missing = [str(id) for id, record in zip(unique, records, strict=True) if record is None]
        if missing and not missing_ok:
            raise RecordNotFoundError(cls.__external_class_name__, missing, backend.url)
        loaded = {
            id: None if record is None else cls._from_record(record)
            for id, record in zip(unique, records, strict=True)
        }
        return [loaded[id] for id in ids]

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

    def _to_record(self, now: datetime, context: Any = None) -> Record:
        """This model as a record: its id and ``created_at`` if it was saved or loaded before.

        ``context`` reaches `External` fields of this model when it is stored by a dump.
        """
        cls = type(self)
        metadata = _metadata_of(self)
        try:
            data = cls.__pydantic_serializer__.to_json(self, context=context)
        except PydanticSerializationError as exc:
            raise StorageValidationError(
                f"{cls.__external_class_name__} cannot be serialized to JSON: {exc}"
            ) from exc
        return Record(
            id=uuid4() if metadata is None else metadata.id,
            class_name=cls.__external_class_name__,
            data=data,
            schema_version=cls.__external_schema_version__,
            created_at=now if metadata is None else metadata.created_at,
            updated_at=now,
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
        extra = set(reference) - {"class_name", "id"}
        if extra:
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
    def _from_record(cls, record: Record) -> Self:
        expected = cls.__external_class_name__
        if record.class_name != expected:
            raise StorageValidationError(
                f"stored record {record.id} belongs to class {record.class_name!r}, "
                f"not {expected} ({mask_url(cls.__external_storage__)})"
            )
        try:
            model = cls.model_validate_json(record.data)
        except ValidationError as exc:
            raise StorageValidationError(
                f"stored {expected} record {record.id} no longer validates: {exc}"
            ) from exc
        _set_metadata(model, record)
        return model


_METADATA_SLOT = ExternalBaseModel.__dict__["_external_metadata"]


def _metadata_of(model: ExternalBaseModel) -> ExternalMetadata | None:
    try:
        metadata: ExternalMetadata = _METADATA_SLOT.__get__(model)
    except AttributeError:
        return None
    return metadata


def _set_metadata(model: ExternalBaseModel, record: Record) -> None:
    _METADATA_SLOT.__set__(
        model,
        ExternalMetadata(
            id=record.id,
            class_name=record.class_name,
            schema_version=record.schema_version,
            created_at=record.created_at,
            updated_at=record.updated_at,
        ),
    )


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
