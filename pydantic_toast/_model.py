"""`ExternalBaseModel`: a Pydantic model that saves itself to a backend and loads back by id.

The class holds what is the model's own: its checked settings, its record metadata (in
slots, so that it takes no part in equality, dumps or copies), and the conversion between a
model and its record. What each operation does is in `_operations`; the sync twins are one
descriptor, `_SyncTwin`, that runs the async method of the same name.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from functools import partial
from typing import (
    TYPE_CHECKING,
    Any,
    ClassVar,
    Generic,
    Literal,
    Protocol,
    Self,
    TypeGuard,
    TypeVar,
    overload,
)
from uuid import UUID, uuid4

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import PydanticSerializationError

from pydantic_toast import _operations, _records
from pydantic_toast._bridge import run_sync
from pydantic_toast._config import ModelSettings, settings_for, settings_of
from pydantic_toast._content import CONTENT_VERSION, content_id, verify_content
from pydantic_toast._crypto import content_secret
from pydantic_toast._errors import (
    StorageValidationError,
    error_details,
    invalid_data,
    nesting_in,
)
from pydantic_toast._records import Migration
from pydantic_toast._references import ExternalReference, ReferenceLike, is_reference
from pydantic_toast.backends.records import Record

__all__ = ["ExternalBaseModel", "ExternalMetadata"]


@dataclass(frozen=True, slots=True)
class ExternalMetadata:
    """A stored record's metadata, as of the instance's last save or load."""

    id: UUID
    class_name: str
    schema_version: int
    created_at: datetime
    updated_at: datetime


R_co = TypeVar("R_co", covariant=True)


class _DeleteByReference(Protocol[R_co]):
    """``User.delete_external(reference)``: the record a reference points to."""

    def __call__(self, reference: ReferenceLike, *, missing_ok: bool = True) -> R_co: ...


class _DeleteOwn(Protocol[R_co]):
    """``user.delete_external()``: the model's own record."""

    def __call__(self, *, missing_ok: bool = True) -> R_co: ...


class _DeleteMethod(Generic[R_co]):
    """``delete_external``, callable on the class with a reference and on an instance without
    one: the function gets the class and the instance or ``None``. Type checkers see the
    signature of each way of access (`_DeleteByReference`, `_DeleteOwn`)."""

    def __init__(self, function: Callable[..., R_co]) -> None:
        self.__func__ = function
        self.__doc__ = function.__doc__

    @overload
    def __get__(self, instance: None, owner: type) -> _DeleteByReference[R_co]: ...

    @overload
    def __get__(self, instance: object, owner: type) -> _DeleteOwn[R_co]: ...

    def __get__(self, instance: object, owner: type) -> Callable[..., R_co]:
        bound = partial(self.__func__, owner, instance)
        bound.__doc__ = self.__doc__
        return bound


class _SyncTwin:
    """``name_sync``: the async method ``name``, run to completion for synchronous code (in
    a script, a thread or inside a running loop: see `_bridge`)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.async_name = name.removesuffix("_sync")
        # Name, documentation and signature, worked out once per class and way of access
        # (on the class, on an instance): a sync call must not pay for `inspect` each time.
        self._looks: dict[tuple[type, bool], tuple[str, str, str, inspect.Signature]] = {}

    def __get__(self, instance: object, owner: type) -> Callable[..., Any]:
        method = getattr(owner if instance is None else instance, self.async_name)

        def twin(*args: Any, **kwargs: Any) -> Any:
            return run_sync(method(*args, **kwargs))

        # Named and documented as itself (not as the coroutine function: tools that unwrap
        # would take it for one), with the async method's parameters.
        looks = self._looks.get((owner, instance is None))
        if looks is None:
            name = f"{self.async_name}_sync"
            doc = f"`{self.async_name}` for synchronous code.\n\n{method.__doc__ or ''}"
            looks = (name, f"{owner.__qualname__}.{name}", doc, inspect.signature(method))
            self._looks[owner, instance is None] = looks
        twin.__name__, twin.__qualname__, twin.__doc__ = looks[:3]
        twin.__signature__ = looks[3]  # type: ignore[attr-defined]
        return twin


class ExternalBaseModel(BaseModel):
    """A Pydantic model stored out of line and passed around as an `ExternalReference`.

    Subclasses set ``model_config = ExternalConfigDict(storage=...)``; the URL is checked when
    the class is defined. Everything Pydantic does (``model_dump``, ``model_validate``, ...)
    behaves exactly as on `BaseModel`.
    """

    # The record metadata lives in a slot, not a field or private attribute, so it takes no
    # part in equality, dumps or copies: a loaded model equals the one that was saved.
    __slots__ = ("_external_metadata", "_external_pending_id")

    model_config = ConfigDict(ignored_types=(_DeleteMethod, _SyncTwin))

    __external_settings__: ClassVar[ModelSettings]
    __external_migrations__: ClassVar[dict[int, Migration]]

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        cls._settings()
        cls.__external_migrations__ = {}

    @classmethod
    def _settings(cls) -> ModelSettings:
        """The class's checked settings, worked out once: when the class is defined, or
        before, while Pydantic builds the schema of a class with an `External` field of its
        own type (``children: list[External[Node]]``), which needs its class name."""
        if cls is ExternalBaseModel:
            return settings_of(cls)  # refused: the base class has no storage
        settings: ModelSettings | None = cls.__dict__.get("__external_settings__")
        if settings is None:
            stored_bases = tuple(
                base
                for base in cls.__mro__[1:]
                if isinstance(base, type)
                and issubclass(base, ExternalBaseModel)
                and base is not ExternalBaseModel
            )
            settings = settings_for(cls, cls.model_config, stored_bases)
            cls.__external_settings__ = settings
        return settings

    @property
    def external_metadata(self) -> ExternalMetadata | None:
        """Id, class name, schema version and timestamps of the stored record, if any."""
        try:
            stored: tuple[UUID, str, int, datetime, datetime] = _METADATA_SLOT.__get__(self)
        except AttributeError:
            return None
        return ExternalMetadata(*stored)

    @classmethod
    def is_external_reference(cls, data: object) -> TypeGuard[ExternalReference]:
        """Whether ``data`` is a reference: exactly ``class_name`` and a UUID ``id`` (and,
        for a class with ``signed_references``, a ``sig`` and an optional ``exp``).

        Called on a subclass, the reference must also name that subclass. This checks the
        shape only: loading checks the signature and the expiry.
        """
        if cls is ExternalBaseModel:
            return is_reference(data, None, signed=True)
        settings = cls.__external_settings__
        return is_reference(data, settings.class_name, signed=settings.signed_references)

    # --- operations ----------------------------------------------------------------------------

    async def save_external(self) -> ExternalReference:
        """Store this model and return its reference.

        The first save assigns an id; saving the same instance again updates that record
        (``created_at`` stays, ``updated_at`` moves). The record is written when this returns.
        """
        return await _operations.save(self)

    @classmethod
    async def load_external(cls, reference: ReferenceLike) -> Self:
        """Load the model a reference points to.

        Raises `RecordNotFoundError` when there is no such record, and
        `StorageValidationError` when the reference is malformed, names another class, or the
        stored data no longer validates. Loads that tasks issue in the same event-loop turn
        reach the backend as one batch.
        """
        return await _operations.load(cls, reference)

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
        return await _operations.save_many(cls, models)

    @overload
    @classmethod
    async def load_external_many(
        cls, references: Iterable[ReferenceLike], *, missing_ok: Literal[False] = False
    ) -> list[Self]: ...

    @overload
    @classmethod
    async def load_external_many(
        cls, references: Iterable[ReferenceLike], *, missing_ok: bool
    ) -> list[Self | None]: ...

    @classmethod
    async def load_external_many(
        cls, references: Iterable[ReferenceLike], *, missing_ok: bool = False
    ) -> list[Self] | list[Self | None]:
        """Load many models in one batch read, in the order of ``references``.

        Missing records raise one `RecordNotFoundError` naming every missing id, or, with
        ``missing_ok=True``, come back as ``None``. A reference listed twice gives the same
        instance twice.
        """
        return await _operations.load_many(cls, references, missing_ok=missing_ok)

    @classmethod
    async def exists_external(cls, reference: ReferenceLike) -> bool:
        """Whether the record a reference points to exists (and has not expired)."""
        return await _operations.exists(cls, reference)

    @classmethod
    async def delete_external_many(
        cls, references: Iterable[ReferenceLike], *, missing_ok: bool = True
    ) -> int:
        """Delete the records of ``references`` in one batch; return how many existed.

        Missing records are no error, unless ``missing_ok=False``: then, if any was missing,
        `RecordNotFoundError` is raised after the others are deleted.
        """
        return await _operations.delete_many(cls, references, missing_ok=missing_ok)

    @_DeleteMethod
    async def delete_external(
        cls: type[ExternalBaseModel],
        instance: ExternalBaseModel | None,
        reference: ReferenceLike | None = None,
        *,
        missing_ok: bool = True,
    ) -> bool:
        """Delete a record: ``await model.delete_external()`` deletes the model's own record,
        ``await User.delete_external(reference)`` the one a reference points to.

        Returns whether a record was deleted; a missing one is no error unless
        ``missing_ok=False`` (then `RecordNotFoundError`). A deleted model forgets its id, so
        saving it again creates a new record.
        """
        return await _operations.delete(cls, instance, reference, missing_ok=missing_ok)

    @classmethod
    async def purge_external(
        cls, *, older_than: timedelta | float | None = None, before: datetime | None = None
    ) -> int:
        """Delete this class's records not updated since ``before`` (or for ``older_than``),
        in batches; without either, those past the class's ttl. Returns how many."""
        return await _operations.purge(cls, older_than, before)

    # The sync twins: one mechanism at run time, precise signatures for type checkers.
    if TYPE_CHECKING:

        def save_external_sync(self) -> ExternalReference: ...

        @classmethod
        def load_external_sync(cls, reference: ReferenceLike) -> Self: ...

        @classmethod
        def save_external_many_sync(cls, models: Iterable[Self]) -> list[ExternalReference]: ...

        @overload
        @classmethod
        def load_external_many_sync(
            cls, references: Iterable[ReferenceLike], *, missing_ok: Literal[False] = False
        ) -> list[Self]: ...

        @overload
        @classmethod
        def load_external_many_sync(
            cls, references: Iterable[ReferenceLike], *, missing_ok: bool
        ) -> list[Self | None]: ...

        @classmethod
        def load_external_many_sync(
            cls, references: Iterable[ReferenceLike], *, missing_ok: bool = False
        ) -> list[Self] | list[Self | None]: ...

        @classmethod
        def exists_external_sync(cls, reference: ReferenceLike) -> bool: ...

        @classmethod
        def delete_external_many_sync(
            cls, references: Iterable[ReferenceLike], *, missing_ok: bool = True
        ) -> int: ...

        @_DeleteMethod
        def delete_external_sync(
            cls: type[ExternalBaseModel],
            instance: ExternalBaseModel | None,
            reference: ReferenceLike | None = None,
            *,
            missing_ok: bool = True,
        ) -> bool: ...

        @classmethod
        def purge_external_sync(
            cls, *, older_than: timedelta | float | None = None, before: datetime | None = None
        ) -> int: ...

    else:
        save_external_sync = _SyncTwin()
        load_external_sync = _SyncTwin()
        save_external_many_sync = _SyncTwin()
        load_external_many_sync = _SyncTwin()
        exists_external_sync = _SyncTwin()
        delete_external_many_sync = _SyncTwin()
        delete_external_sync = _SyncTwin()
        purge_external_sync = _SyncTwin()

    # --- migrations ----------------------------------------------------------------------------

    @classmethod
    def migration(cls, from_version: int) -> Callable[[Migration], Migration]:
        """Register a function that upgrades a stored dict from ``from_version`` to the next.

        A load of an older record applies the steps in order, then validates::

            @User.migration(from_version=1)
            def split_name(data: dict[str, Any]) -> dict[str, Any]:
                first, _, last = data.pop("name").partition(" ")
                return {**data, "first_name": first, "last_name": last}
        """
        current = settings_of(cls).schema_version
        if current == 1:
            raise StorageValidationError(
                f"{cls.__name__}: schema_version is 1, so no version is older to migrate from "
                "(raise schema_version, then register the step from the version before)"
            )
        if not isinstance(from_version, int) or not 1 <= from_version < current:
            raise StorageValidationError(
                f"{cls.__name__}: a migration goes from one of the versions 1 to {current - 1} "
                f"(below the current schema_version {current}), not from {from_version!r}"
            )

        def register(step: Migration) -> Migration:
            cls.__external_migrations__[from_version] = step
            return step

        return register

    # --- the model's record --------------------------------------------------------------------

    def _to_record(self, now: datetime, context: Any = None) -> Record:
        """This model as a record: its id and ``created_at`` if it was saved or loaded before.

        ``context`` reaches `External` fields of this model when it is stored by a dump.
        """
        cls = type(self)
        settings = cls.__external_settings__
        try:
            metadata: tuple[UUID, str, int, datetime, datetime] | None
            metadata = _METADATA_SLOT.__get__(self)  # as `external_metadata`, without its object
        except AttributeError:
            metadata = None
        try:
            data = cls.__pydantic_serializer__.to_json(self, context=context)
        except PydanticSerializationError as exc:
            raise StorageValidationError(
                f"{settings.class_name} cannot be serialized to JSON: {exc}"
            ) from exc
        _records.check_storable(self, data, settings.class_name)
        if settings.content_addressed:  # the id names the content: a changed model moves
            key = content_secret(_records.keyring_of(settings)) if settings.encrypt else None
            named = content_id(settings.class_name, data, key)
            kept = metadata[3] if metadata is not None and metadata[0] == named else now
            return _records.new_record(settings, data, named, kept, now)
        if metadata is None:
            # The id is the instance's from its first save attempt on, so a retry after a
            # failed first save, or two saves at once, write one record, not an orphan too.
            try:
                id: UUID = _PENDING_ID_SLOT.__get__(self)
            except AttributeError:
                id = uuid4()
                _PENDING_ID_SLOT.__set__(self, id)
            created_at = now
        else:
            id, _, _, created_at, _ = metadata
        return _records.new_record(settings, data, id, created_at, now)

    @classmethod
    def _from_record(cls, record: Record, context: Any = None) -> Self:
        """Validate a loaded record as this class, migrating it first if it is older."""
        return cls._from_record_migrated(record, context)[0]

    @classmethod
    def _from_record_migrated(
        cls, record: Record, context: Any = None
    ) -> tuple[Self, Record | None]:
        """The model, and the upgraded record when a migration ran (else ``None``)."""
        settings = cls.__external_settings__
        if settings.encrypt:
            # Authenticated decryption proves the content is what was sealed for this class,
            # id and schema version (a content-addressed id is keyed, so it is not rechecked).
            record = replace(record, data=_records.plain_data(settings, record))
        else:
            # A content-addressed record proves its content before anything reads it (checked
            # on the stored form, so an older record still migrates under the id it has).
            verify_content(settings.class_name, record.id, record.data)
        current = settings.schema_version
        if record.schema_version == current:
            data = record.data
        else:
            data = _records.migrate(settings, cls.__external_migrations__, record)
        try:
            model = cls.model_validate_json(data, context=context)
        except ValidationError as exc:
            # Not chained: the ValidationError quotes the stored data.
            details = error_details(exc)
            nested = nesting_in(details)  # the record is fine: what it references is not
            if nested is not None:
                raise nested from None
            raise StorageValidationError(
                f"stored {settings.class_name} record {record.id} no longer validates: "
                f"{invalid_data(exc, details, sealed=settings.encrypt)}"
            ) from None
        upgraded = None
        if data is not record.data and record.id.version != CONTENT_VERSION:
            # Write back what the migration produced (references stay references), with this
            # class's compression, as a save would, and its timestamps, so with the time it
            # has left under the class's ttl; never a content-addressed record, whose id
            # names the content it has.
            upgraded = replace(
                record,
                data=data,
                schema_version=current,
                ttl=_records.time_left(record.updated_at, settings.ttl),
                compress_above=settings.compress_above,
            )
            model._remember(upgraded)
            return model, _records.sealed(settings, upgraded)
        model._remember(record)
        return model, upgraded

    @classmethod
    def _live(cls, record: Record | None) -> Record | None:
        """``record``, or ``None`` when there is none or it outlived the class's ttl."""
        ttl = cls.__external_settings__.ttl
        if record is not None and ttl is not None and _records.expired(record.updated_at, ttl):
            return None
        return record

    def _remember(self, record: Record) -> None:
        """Keep the record's metadata (as a plain tuple: cheaper to make on every load than
        `ExternalMetadata`, which is built only when someone asks for it)."""
        _METADATA_SLOT.__set__(
            self,
            (
                record.id,
                record.class_name,
                record.schema_version,
                record.created_at,
                record.updated_at,
            ),
        )

    def _forget(self) -> None:
        """Forget the record (it was deleted): a later save creates a new one. Twice is
        fine (two deletes of one instance at once)."""
        for slot in (_METADATA_SLOT, _PENDING_ID_SLOT):
            with contextlib.suppress(AttributeError):
                slot.__delete__(self)


_METADATA_SLOT = ExternalBaseModel.__dict__["_external_metadata"]
_PENDING_ID_SLOT = ExternalBaseModel.__dict__["_external_pending_id"]
