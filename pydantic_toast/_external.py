"""`External[T]`: fields that dump to references and resolve references on validation.

``External[Line]`` is ``Annotated[Line, _ExternalMarker()]``: a type checker sees ``Line``,
and Pydantic asks the marker for the core schema. Validation is a tagged union of "a
reference" and "the value", so full values stay on Pydantic's native (JSON) path; dumping goes
through a wrap serializer that stores the value and emits its reference.

Pydantic's hooks are synchronous and the backends are async, so there are two paths:

* The batched path, `dump` / `validate` (and their sync twins): the serializer only *stages*
  values in a `_Session` carried by the context, and the session writes them afterwards in one
  batch per backend; references in the input are collected and read one level at a time, in
  one batch per backend and class, before validation runs on what was read.
* The plain path, ``model_dump(context={"storage": ...})`` and
  ``model_validate(data, context={"storage": ...})``: each value is written (or each reference
  read) on the spot through the sync bridge, so a reference is never handed out before its
  record is written. Correct everywhere, including inside a running event loop; one round trip
  per value.

With OpenTelemetry configured, `dump` and `validate` are spans ``pydantic_toast.dump`` and
``pydantic_toast.validate``, and each batch they send is a ``pydantic_toast.save_many`` or
``pydantic_toast.load_many`` span within; the plain path's writes and reads are
``pydantic_toast.save`` and ``pydantic_toast.load`` spans.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import re
import weakref
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from typing import (
    TYPE_CHECKING,
    Annotated,
    Any,
    Literal,
    TypedDict,
    TypeGuard,
    TypeVar,
    Unpack,
    cast,
    overload,
)
from uuid import UUID, uuid4

from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic_core import (
    PydanticCustomError,
    PydanticSerializationError,
    PydanticSerializationUnexpectedValue,
    core_schema,
)

from pydantic_toast import _telemetry
from pydantic_toast._bridge import run_sync
from pydantic_toast._content import content_id, verify_content
from pydantic_toast._crypto import (
    Keyring,
    content_secret,
    current_keyring,
    open_data,
    seal_data,
    sign_reference,
    verify_reference,
)
from pydantic_toast._errors import (
    NESTING_ERRORS,
    ExternalStorageError,
    NestingError,
    StorageValidationError,
    error_details,
    invalid_data,
    nesting_in,
)
from pydantic_toast._model import ExternalBaseModel
from pydantic_toast._records import check_storable
from pydantic_toast._references import parse_ids
from pydantic_toast._retry import DEFAULT_RETRY_POLICY, RetryPolicy, with_backend
from pydantic_toast.backends.base import StorageBackend
from pydantic_toast.backends.records import Record, check_class_name, id_text

if TYPE_CHECKING:
    from pydantic.main import IncEx

__all__ = [
    "DEFAULT_MAX_DEPTH",
    "DumpBatch",
    "External",
    "ExternalField",
    "dump",
    "dump_json",
    "dump_json_sync",
    "dump_sync",
    "validate",
    "validate_sync",
]

T = TypeVar("T")
M = TypeVar("M")

#: How deep references may nest (a reference inside a referenced value counts one level).
DEFAULT_MAX_DEPTH = 32

# The context key under which the batched path carries its session.
_SESSION_KEY = "pydantic_toast.session"

Storage = str | StorageBackend


# --- the type ----------------------------------------------------------------------------------

if TYPE_CHECKING:
    External = Annotated[T, ...]
else:

    class External:
        """``External[T]``: a field holding a ``T`` that travels as a reference when dumped
        with a storage in the context, and accepts the value or a reference on validation."""

        __slots__ = ()

        def __class_getitem__(cls, item: Any) -> Any:
            return Annotated[item, ExternalField()]


@dataclass(frozen=True)
class ExternalField:
    """The Annotated metadata behind `External`, for options: ``Annotated[Line,
    ExternalField(threshold=4096)]`` is ``External[Line]`` that keeps values whose JSON is
    shorter than ``threshold`` bytes inline, the way PostgreSQL's TOAST keeps short values in
    the row. ``compress_above`` compresses stored values longer than that many bytes with
    zstd (on Redis, S3 and file storage). ``content_addressed`` (the default) stores a value
    under an id derived from its content, so an unchanged value is stored once however often
    it is dumped; ``False`` gives every dump a new random id (for values that must not be
    shared). ``encrypt`` stores values encrypted under the installed keyring (see
    `use_keyring`), their content-addressed ids keyed by it. `ExternalBaseModel` values
    follow their own class's ``content_addressed``, ``encrypt`` and ``signed_references``.
    Frozen, so hashable: ``External[X] | None`` works.
    """

    threshold: int = 0
    compress_above: int | None = None
    content_addressed: bool = True
    encrypt: bool = False

    def __get_pydantic_core_schema__(
        self, source: Any, handler: Callable[[Any], core_schema.CoreSchema]
    ) -> core_schema.CoreSchema:
        value_schema = handler(source)
        target = _Target(source, self)
        fields = {
            "class_name": core_schema.typed_dict_field(
                core_schema.literal_schema([target.class_name])
            ),
            "id": core_schema.typed_dict_field(core_schema.uuid_schema()),
        }
        if target.signed:
            # Taken as they come: `resolve` checks them, with the same errors as a load.
            fields["sig"] = core_schema.typed_dict_field(core_schema.any_schema(), required=False)
            fields["exp"] = core_schema.typed_dict_field(core_schema.any_schema(), required=False)
        reference_schema = core_schema.typed_dict_schema(
            fields,
            extra_behavior="forbid",
            ref=f"pydantic_toast.{target.class_name}Reference",
            metadata={"pydantic_js_functions": [target.reference_json_schema]},
        )
        return core_schema.tagged_union_schema(
            choices={
                "reference": core_schema.with_info_after_validator_function(
                    target.resolve, reference_schema
                ),
                "value": value_schema,
            },
            discriminator=(_signed_reference_or_value if target.signed else _reference_or_value),
            metadata={"pydantic_js_functions": [_any_of]},
            serialization=core_schema.wrap_serializer_function_ser_schema(
                target.serialize, info_arg=True, schema=value_schema
            ),
        )


def _any_of(
    schema: core_schema.CoreSchema, handler: Callable[[Any], dict[str, Any]]
) -> dict[str, Any]:
    """Value-or-reference as ``anyOf``: a model whose fields all have defaults accepts a
    reference's two keys as well, and ``oneOf`` would then refuse the reference."""
    json_schema = handler(schema)
    if "oneOf" in json_schema:
        json_schema["anyOf"] = json_schema.pop("oneOf")
    return json_schema


def _reference_or_value(data: Any) -> str:
    return "reference" if _looks_like_reference(data) else "value"


def _signed_reference_or_value(data: Any) -> str:
    return "reference" if _looks_like_signed_reference(data) else "value"


def _looks_like_reference(data: Any) -> bool:
    return isinstance(data, dict) and len(data) == 2 and "class_name" in data and "id" in data


_SIGNED_KEYS = frozenset({"class_name", "id", "sig", "exp"})


def _looks_like_signed_reference(data: Any) -> bool:
    """A reference, signed or not: an unsigned one to a signed class must reach `resolve`,
    which refuses it, rather than pass for an inline value."""
    return (
        isinstance(data, dict)
        and 2 <= len(data) <= 4
        and "class_name" in data
        and "id" in data
        and (len(data) == 2 or set(data) <= _SIGNED_KEYS)
    )


# Every live External target by class name, so that the batched path knows which storage an
# `ExternalBaseModel` reference in the input resolves through. Held weakly: a target lives as
# long as the schema that uses it (a model class's, an adapter's), so a class defined in a
# function and dropped is neither kept alive here nor consulted for a later class of its name.
_targets: dict[str, tuple[weakref.ref[_Target], ...]] = {}


def _register_target(target: _Target) -> None:
    name = target.class_name

    def forget(dead: weakref.ref[_Target]) -> None:
        left = tuple(ref for ref in _targets.get(name, ()) if ref is not dead)
        if left:
            _targets[name] = left
        else:
            _targets.pop(name, None)

    _targets[name] = (*_targets.get(name, ()), weakref.ref(target, forget))


def _targets_named(class_name: str) -> list[_Target]:
    """The live External targets storing under ``class_name``."""
    return [target for ref in _targets.get(class_name, ()) if (target := ref()) is not None]


class _Target:
    """What `External[T]` needs to know about one ``T``."""

    def __init__(self, source: Any, options: ExternalField) -> None:
        self.source = source
        self.threshold = options.threshold
        self.compress_above = options.compress_above
        self.content_addressed = options.content_addressed
        is_class = isinstance(source, type)
        self.model = source if is_class and issubclass(source, ExternalBaseModel) else None
        self.encrypt = options.encrypt
        self.signed = False
        if self.model is not None:
            settings = self.model._settings()
            if options.encrypt and not settings.encrypt:
                raise StorageValidationError(
                    f"ExternalField(encrypt=True) on {self.model.__name__}, which is stored "
                    f"in the clear: set ExternalConfigDict(encrypt=True) on the class instead"
                )
            self.encrypt, self.signed = settings.encrypt, settings.signed_references
            self.class_name = settings.class_name
        elif is_class:
            self.class_name = source.__name__
        else:
            self.class_name = re.sub(r"[^A-Za-z0-9_.\-]+", "_", repr(source)).strip("_.-")
        check_class_name(self.class_name)
        self.instance_of = source if is_class else None
        self.model_source = is_class and issubclass(source, BaseModel)
        _register_target(self)

    def reference_json_schema(
        self, schema: core_schema.CoreSchema, handler: Callable[[Any], dict[str, Any]]
    ) -> dict[str, Any]:
        """Title the reference branch, so OpenAPI shows "Line or LineReference"."""
        json_schema = handler(schema)
        json_schema["title"] = f"{self.class_name}Reference"
        json_schema["description"] = f"A reference to a stored {self.class_name}."
        if self.signed and self.model is not None:
            # The core schema takes sig and exp as they come (`resolve` refuses them with the
            # load's errors); what a client must send is a string sig, and exp with a ttl.
            properties = json_schema["properties"]
            properties["sig"]["type"] = "string"
            properties["exp"]["type"] = "integer"
            json_schema["required"] = ["class_name", "id", "sig"]
            if self.model.__external_settings__.references_expire:
                json_schema["required"].append("exp")
        return json_schema

    @property
    def retry(self) -> RetryPolicy:
        """The model's own retry settings for an `ExternalBaseModel`, else the defaults."""
        return (
            DEFAULT_RETRY_POLICY if self.model is None else self.model.__external_settings__.retry
        )

    def keyring(self) -> Keyring:
        """The keyring that seals values of an encrypted non-model type, or signs and checks
        references of a model class."""
        if self.model is not None:
            return current_keyring(self.model.__external_settings__.keyring, self.class_name)
        return current_keyring(None, self.class_name)

    def check_signature(self, reference: Mapping[str, Any], id: UUID) -> None:
        """Refuse an unsigned, forged or expired reference to a signed class (no I/O)."""
        if self.signed:
            assert self.model is not None  # only model classes sign
            expiring = self.model.__external_settings__.references_expire
            verify_reference(self.keyring(), self.class_name, id, reference, expiring=expiring)

    def reference_to(self, record: Record) -> dict[str, Any]:
        if self.signed:
            assert self.model is not None  # only model classes sign
            ttl = self.model.__external_settings__.reference_ttl
            return sign_reference(self.keyring(), record.class_name, record.id, ttl)
        return {"class_name": record.class_name, "id": id_text(record.id)}

    @property
    def own_storage(self) -> str | None:
        return None if self.model is None else self.model.__external_settings__.storage

    @cached_property
    def adapter(self) -> TypeAdapter[Any]:
        return TypeAdapter(self.source)

    def to_json(self, value: Any, context: Any) -> bytes:
        if isinstance(value, BaseModel):
            return type(value).__pydantic_serializer__.to_json(value, context=context)
        return self.adapter.dump_json(value, context=context)

    def from_json(self, data: bytes, context: Any) -> Any:
        if self.model_source:
            return self.source.model_validate_json(data, context=context)
        return self.adapter.validate_json(data, context=context)

    # Serialization ------------------------------------------------------------------------

    def serialize(
        self, value: Any, handler: core_schema.SerializerFunctionWrapHandler, info: Any
    ) -> Any:
        if self.instance_of is not None and not isinstance(value, self.instance_of):
            # In a union of several External types, say "not mine" so the next one is tried.
            raise PydanticSerializationUnexpectedValue(
                f"expected {self.class_name}, got {type(value).__name__}"
            )
        context = info.context
        if not _is_mapping(context) or "storage" not in context:
            return handler(value)
        storage = self.own_storage or context.get("storage")
        if storage is None:
            return handler(value)
        if self.threshold and len(self.to_json(value, None)) < self.threshold:
            return handler(value)  # small enough to stay in the row
        session = _session_for(context)
        return session.store(self, value, storage, context)

    # Validation ---------------------------------------------------------------------------

    def resolve(self, reference: dict[str, Any], info: core_schema.ValidationInfo) -> Any:
        id: UUID = reference["id"]
        context = info.context
        storage = self.own_storage
        if storage is None and _is_mapping(context):
            storage = context.get("storage")
        if storage is None:
            raise PydanticCustomError(
                "external_storage_missing",
                "a storage is needed to resolve this reference to {class_name} {id}: "
                "validate with context={'storage': URL} or pydantic_toast.validate(...)",
                {"class_name": self.class_name, "id": str(id)},
            )
        try:
            self.check_signature(reference, id)
        except StorageValidationError as exc:
            raise PydanticCustomError(
                "external_reference_refused", "{reason}", {"reason": str(exc)}
            ) from None
        session = _session_for(context)
        key = (_storage_key(storage), self.class_name, id.int)
        if key in session.resolving:
            raise _pydantic_error(
                NestingError("external_cycle", {"class_name": self.class_name, "id": str(id)})
            )
        if len(session.resolving) >= session.max_depth:
            context = {"max_depth": session.max_depth, "class_name": self.class_name, "id": str(id)}
            raise _pydantic_error(NestingError("external_too_deep", context))
        record = session.fetch(key, id, storage, self.retry)
        if self.model is not None:
            record = self.model._live(record)
        if record is None:
            raise PydanticCustomError(
                "external_not_found",
                "no {class_name} record with id {id}",
                {"class_name": self.class_name, "id": str(id)},
            )
        session.resolving.append(key)
        try:
            if self.model is not None:
                return self.model._from_record(record, context)
            if self.encrypt:  # authenticated decryption proves the content
                return self.from_json(open_data(record, self.keyring()), context)
            verify_content(self.class_name, id, record.data)
            return self.from_json(record.data, context)
        except NestingError as exc:  # found deeper: said as itself, once
            raise _pydantic_error(exc) from None
        except StorageValidationError as exc:  # it names the record itself
            raise PydanticCustomError("external_invalid", "{error}", {"error": str(exc)}) from None
        except ValidationError as exc:  # not chained: it quotes the stored data
            details = error_details(exc)
            nested = nesting_in(details)
            if nested is not None:
                raise _pydantic_error(nested) from None
            raise PydanticCustomError(
                "external_invalid",
                "stored {class_name} record {id} does not validate: {errors}",
                {
                    "class_name": self.class_name,
                    "id": str(id),
                    "errors": invalid_data(exc, details, sealed=self.encrypt),
                },
            ) from None
        finally:
            session.resolving.pop()


def _pydantic_error(nesting: NestingError) -> PydanticCustomError:
    """A nesting error as the validation error it is inside Pydantic."""
    return PydanticCustomError(nesting.kind, NESTING_ERRORS[nesting.kind], nesting.context)


def _mentions_external(schema: Any) -> bool:
    """Whether a core schema has an `External` field anywhere in it (an integration asks
    once, when it is set up, to skip the reference scan for types that cannot hold one)."""
    stack = [schema]
    while stack:
        item = stack.pop()
        if isinstance(item, Mapping):
            if isinstance(getattr(item.get("function"), "__self__", None), _Target):
                return True
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return False


def _storage_key(storage: Storage) -> str | int:
    return storage if isinstance(storage, str) else id(storage)


def _parse_json(data: str | bytes | bytearray) -> Any:
    """Parsed JSON to look for references in, or ``None`` when it does not parse: then
    validation itself reports the problem, with Pydantic's own error."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


async def _on(
    storage: Storage,
    operation: Callable[[StorageBackend], Awaitable[T]],
    policy: RetryPolicy,
    observed: _telemetry.Operation | None,
) -> T:
    """Run ``operation`` on a backend instance as is, or on a URL's live backend with
    retries (every operation here is idempotent)."""
    if isinstance(storage, StorageBackend):
        return await operation(storage)
    return await with_backend(storage, operation, policy, observed)


# --- sessions ------------------------------------------------------------------------------------


# A record as a session knows it: its storage (`_storage_key`), class name and id, the id as
# its integer (a UUID's hash runs Python code, an int's does not).
_FetchKey = tuple[str | int, str, int]
# What `_Session.fetched` answers for a record it has not read (a record read and not found
# is None there).
_UNFETCHED = cast(Record, object())


class _Session:
    """Bookkeeping of one dump or validate.

    ``batched`` sessions (the `dump`/`validate` API) stage writes and serve prefetched
    records; plain ones write and read on the spot through the sync bridge.
    """

    def __init__(self, context: object, *, batched: bool, max_depth: int = DEFAULT_MAX_DEPTH):
        self.context = context
        self.batched = batched
        self.max_depth = max_depth
        # id(value) -> (value, record): the value is kept alive so its id is not reused.
        self.stored: dict[int, tuple[Any, Record]] = {}
        self.seen: dict[int, tuple[weakref.ref[Any], Record]] = {}
        self.staged: dict[str | int, tuple[Storage, list[Record]]] = {}
        self.fetched: dict[_FetchKey, Record | None] = {}
        self.resolving: list[_FetchKey] = []
        # The moment of a batched dump's writes, one for all of them (as a batch save has):
        # formatted once, and one envelope header shared by every record read back.
        self.written_at: datetime | None = None
        # What stopped a store, kept for `dump`: Pydantic hands it on only as text.
        self.failure: ExternalStorageError | None = None

    def store(self, target: _Target, value: Any, storage: Storage, context: Any) -> Any:
        try:
            return self._store(target, value, storage, context)
        except ExternalStorageError as exc:
            if self.batched:  # only a dump reads it; a plain session may outlive its dump
                self.failure = exc
            raise

    def _store(self, target: _Target, value: Any, storage: Storage, context: Any) -> Any:
        if self.batched:
            known = self.stored.get(id(value))
            if known is not None:
                record = known[1]
            else:
                if self.written_at is None:
                    self.written_at = datetime.now(UTC)
                record = self._record(target, value, context, None, self.written_at)
                self.stored[id(value)] = (value, record)
                key = _storage_key(storage)
                staged = self.staged.get(key)
                if staged is None:
                    staged = self.staged[key] = (storage, [])
                staged[1].append(record)
        else:
            # A plain session may outlive its dump (a context dict reused for many dumps), so
            # it holds values weakly: an entry goes when its value does, and a value that
            # cannot be weakly referenced is simply written again under a new id.
            seen = self.seen.get(id(value))
            earlier = seen[1] if seen is not None and seen[0]() is value else None
            record = self._record(target, value, context, earlier, datetime.now(UTC))
            with contextlib.suppress(TypeError):
                key = id(value)
                self.seen[key] = (weakref.ref(value, lambda _: self.seen.pop(key, None)), record)
            run_sync(_write(storage, record, target.retry))
            if isinstance(value, ExternalBaseModel):
                value._remember(record)
        return target.reference_to(record)

    @staticmethod
    def _record(
        target: _Target, value: Any, context: Any, earlier: Record | None, now: datetime
    ) -> Record:
        if isinstance(value, ExternalBaseModel):
            return value._to_record(now, context=context)
        try:
            data = target.to_json(value, context)
        except ValueError as exc:
            raise StorageValidationError(
                f"{target.class_name} cannot be serialized to JSON: {exc}"
            ) from exc
        check_storable(value, data, target.class_name)
        if target.content_addressed:
            # The same value, the same id, in every process: a record that exists already is
            # rewritten with its created_at kept and updated_at refreshed (so a collection
            # running meanwhile sees it as recent), never stored twice.
            key = content_secret(target.keyring()) if target.encrypt else None
            id, created_at = content_id(target.class_name, data, key), now
        elif earlier is None:
            id, created_at = uuid4(), now
        else:
            id, created_at = earlier.id, earlier.created_at
        record = Record(id, target.class_name, data, 1, created_at, now, target.compress_above)
        return seal_data(record, target.keyring()) if target.encrypt else record

    def fetch(
        self, key: _FetchKey, id: UUID, storage: Storage, policy: RetryPolicy
    ) -> Record | None:
        """The record ``key`` (of ``id``) names: prefetched, else read now."""
        record = self.fetched.get(key, _UNFETCHED)
        if record is not _UNFETCHED:
            return record
        return run_sync(_read(storage, key[1], id, policy))

    async def flush(self) -> None:
        """Write everything staged, one batch per backend, then give models their metadata."""
        staged, self.staged = self.staged, {}
        self.written_at = None  # what a reused session stores later is stamped afresh
        await asyncio.gather(
            *(_write_many(storage, records) for storage, records in staged.values())
        )
        for value, record in self.stored.values():
            if isinstance(value, ExternalBaseModel):
                value._remember(record)

    async def prefetch(self, data: Any, default_storage: Storage | None) -> None:
        """Read every reference reachable from ``data``, one level per round of batches."""
        pending = self._unfetched(_references_in(data), default_storage)
        for _ in range(self.max_depth):
            if not pending:
                return
            groups: dict[tuple[str | int, str], tuple[Storage, list[UUID]]] = {}
            for (key, class_name, _), (storage, id) in pending.items():
                groups.setdefault((key, class_name), (storage, []))[1].append(id)
            results = await asyncio.gather(
                *(_read_many(storage, name, ids) for (_, name), (storage, ids) in groups.items())
            )
            found: list[_Found] = []
            for ((key, class_name), (_, ids)), records in zip(groups.items(), results, strict=True):
                sealed = _encrypted_target(class_name)
                for id, record in zip(ids, records, strict=True):
                    self.fetched[(key, class_name, id.int)] = record
                    data = b"" if record is None else _readable(sealed, record)
                    if b'"class_name"' in data:
                        found.extend(_references_in(_parse_json(data)))
            pending = self._unfetched(found, default_storage)

    def _unfetched(
        self, references: list[_Found], default_storage: Storage | None
    ) -> dict[_FetchKey, tuple[Storage, UUID]]:
        pending: dict[_FetchKey, tuple[Storage, UUID]] = {}
        # Worked out once per class name, not per reference: the live targets that sign
        # their references, and the storages a reference of that name is read from.
        plans: dict[str, tuple[list[_Target], list[tuple[str | int, Storage]]]] = {}
        for class_name, id, reference in references:
            plan = plans.get(class_name)
            if plan is None:
                plan = plans[class_name] = _fetch_plan(class_name, default_storage)
            signers, storages = plan
            if signers and any(not _signature_holds(t, reference, id) for t in signers):
                continue  # refused by `resolve`, before any read
            for storage_key, storage in storages:
                key = (storage_key, class_name, id.int)
                if key not in self.fetched:
                    pending[key] = (storage, id)
        return pending


def _fetch_plan(
    class_name: str, default_storage: Storage | None
) -> tuple[list[_Target], list[tuple[str | int, Storage]]]:
    """For references named ``class_name``: the live targets that check signatures, and
    the storages to read them from, as `resolve` will: a model's own storage, else the
    default one (two models may share a name in different storages: read from each; with
    no storage at all, validation reports it, naming the field). A name no `External`
    field stores is read from nowhere: nothing would resolve it (a reference-shaped dict in
    an ``Any`` field costs no query)."""
    targets = _targets_named(class_name)
    if not targets:
        return [], []
    owners = {t.own_storage for t in targets}
    storages = {own or default_storage for own in owners}
    return (
        [t for t in targets if t.signed],
        [(_storage_key(storage), storage) for storage in storages if storage is not None],
    )


_plain_session: contextvars.ContextVar[_Session | None] = contextvars.ContextVar(
    "pydantic_toast_plain_session", default=None
)


def _is_mapping(value: object) -> TypeGuard[Mapping[str, Any]]:
    """``isinstance(value, Mapping)``, answered without the ABC's check for the dict that a
    context almost always is (it runs for every External value dumped or resolved)."""
    return type(value) is dict or isinstance(value, Mapping)


def _session_for(context: Any) -> _Session:
    """The batched session carried by the context, or the plain session of this context."""
    if _is_mapping(context):
        session = context.get(_SESSION_KEY)
        if isinstance(session, _Session):
            return session
    session = _plain_session.get()
    if session is None or session.context is not context:
        session = _Session(context, batched=False)
        _plain_session.set(session)
    return session


_Found = tuple[str, UUID, dict[str, Any]]


def _encrypted_target(class_name: str) -> _Target | None:
    """A live target that encrypts records of ``class_name``, if any."""
    return next((t for t in _targets_named(class_name) if t.encrypt), None)


def _readable(target: _Target | None, record: Record) -> bytes:
    """A fetched record's JSON, to look for references in: opened when its class is
    encrypted (``target``, from `_encrypted_target`; as it is when it does not open:
    validation then reports why)."""
    if target is not None:
        with contextlib.suppress(StorageValidationError):
            return open_data(record, target.keyring())
    return record.data


def _signature_holds(target: _Target, reference: dict[str, Any], id: UUID) -> bool:
    try:
        target.check_signature(reference, id)
    except StorageValidationError:
        return False
    return True


def _references_in(data: Any) -> list[_Found]:
    """Every reference-shaped dict in parsed input, signed or not (iteratively: input depth
    is unbounded), its id parsed with the others' in one call."""
    shaped: list[dict[str, Any]] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if _looks_like_signed_reference(item):
                shaped.append(item)
                continue
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif isinstance(item, BaseModel):
            stack.extend(item.__dict__.values())
    found: list[_Found] = []
    for item, id in zip(shaped, parse_ids([item["id"] for item in shaped]), strict=True):
        class_name = item["class_name"]
        if id is not None and _is_class_name(class_name):
            found.append((class_name, id, item))
    return found


def _is_class_name(value: object) -> bool:
    """Whether a record can have this class name. Input is hostile: a name that would fail
    as a key is no reference to read, and validation refuses it where a reference belongs."""
    try:
        check_class_name(value)
    except StorageValidationError:
        return False
    return True


async def _write(storage: Storage, record: Record, policy: RetryPolicy) -> None:
    operation = _telemetry.start(_telemetry.SAVE, storage, record.class_name)
    with operation or _telemetry.NOTHING as op:
        await _on(storage, lambda backend: backend.write_record(record), policy, op)
        if op is not None:
            op.records = (record,)


async def _write_many(storage: Storage, records: list[Record]) -> None:
    names = {record.class_name for record in records}
    class_name = names.pop() if len(names) == 1 else None
    operation = _telemetry.start(_telemetry.SAVE_MANY, storage, class_name, len(records))
    with operation or _telemetry.NOTHING as op:
        await _on(storage, lambda backend: backend.write_records(records), DEFAULT_RETRY_POLICY, op)
        if op is not None:
            op.records = records


async def _read(storage: Storage, class_name: str, id: UUID, policy: RetryPolicy) -> Record | None:
    with _telemetry.start(_telemetry.LOAD, storage, class_name) or _telemetry.NOTHING as op:
        record = await _on(storage, lambda backend: backend.read_record(class_name, id), policy, op)
        if op is not None:
            op.records = (record,)
    return record


async def _read_many(storage: Storage, class_name: str, ids: list[UUID]) -> list[Record | None]:
    operation = _telemetry.start(_telemetry.LOAD_MANY, storage, class_name, len(ids))
    with operation or _telemetry.NOTHING as op:
        records = await _on(
            storage,
            lambda backend: backend.read_records(class_name, ids),
            DEFAULT_RETRY_POLICY,
            op,
        )
        if op is not None:
            op.records = records
    return records


# --- the batched API ---------------------------------------------------------------------------


def _context(
    storage: Storage | None, context: Mapping[str, Any] | None, session: _Session
) -> dict[str, Any]:
    merged = dict(context or {})
    merged["storage"] = storage
    merged[_SESSION_KEY] = session
    session.context = merged
    return merged


class DumpBatch:
    """One batch of writes shared by several dumps, for callers that dump many values into one
    document of their own (a message body holding several models): dump each value with
    ``context``, then `flush` writes every staged value, one batch per backend."""

    def __init__(self, storage: Storage | None) -> None:
        self._session = _Session(None, batched=True)
        self.context = _context(storage, None, self._session)

    @property
    def pending(self) -> bool:
        """Whether the dumps staged any value that `flush` must write."""
        return bool(self._session.staged)

    async def flush(self) -> None:
        await self._session.flush()


class _DumpOptions(TypedDict, total=False):
    """The keyword arguments `dump` passes on to ``model_dump`` (or a TypeAdapter's
    ``dump_python``), as Pydantic names them (the newer ones need a Pydantic that has them)."""

    include: IncEx | None
    exclude: IncEx | None
    by_alias: bool | None
    exclude_unset: bool
    exclude_defaults: bool
    exclude_none: bool
    exclude_computed_fields: bool
    round_trip: bool
    warnings: bool | Literal["none", "warn", "error"]
    fallback: Callable[[Any], Any] | None
    serialize_as_any: bool


class _DumpJsonOptions(_DumpOptions, total=False):
    """`dump_json`'s: ``model_dump_json``'s, which has ``indent`` and no ``mode``."""

    indent: int | None


@overload
async def dump(
    value: BaseModel,
    *,
    storage: Storage | None = ...,
    as_type: Any = ...,
    mode: Literal["json", "python"] = ...,
    context: Mapping[str, Any] | None = ...,
    **kwargs: Unpack[_DumpOptions],
) -> dict[str, Any]: ...


@overload
async def dump(
    value: Any,
    *,
    storage: Storage | None = ...,
    as_type: Any = ...,
    mode: Literal["json", "python"] = ...,
    context: Mapping[str, Any] | None = ...,
    **kwargs: Unpack[_DumpOptions],
) -> Any: ...


async def dump(
    value: Any,
    *,
    storage: Storage | None = None,
    as_type: Any = None,
    mode: Literal["json", "python"] = "python",
    context: Mapping[str, Any] | None = None,
    **kwargs: Unpack[_DumpOptions],
) -> Any:
    """Dump ``value`` with every `External` value stored and replaced by its reference.

    All writes of the dump go out together, one batch per backend, before this returns.
    ``storage`` (a URL or a connected `StorageBackend`) serves every External value; without
    it, `ExternalBaseModel` values go to their own storage and other values stay inline.
    ``as_type`` says how to dump a value that is not a model (``list[External[Line]]``).
    Other keyword arguments go to ``model_dump`` (``by_alias``, ``exclude`` ...).
    """
    session = _Session(None, batched=True)
    merged = _context(storage, context, session)
    root = as_type or type(value)
    with _telemetry.start(_telemetry.DUMP, storage, _name(root)) or _telemetry.NOTHING as op:
        with _own_errors(session):
            if isinstance(value, BaseModel):
                result = value.model_dump(mode=mode, context=merged, **kwargs)
            else:
                result = _adapter(root).dump_python(value, mode=mode, context=merged, **kwargs)
        await session.flush()
        _observe(op, [record for _, record in session.stored.values()])
    return result


async def dump_json(
    value: Any,
    *,
    storage: Storage | None = None,
    as_type: Any = None,
    context: Mapping[str, Any] | None = None,
    **kwargs: Unpack[_DumpJsonOptions],
) -> str:
    """`dump` as JSON text, like ``model_dump_json``."""
    session = _Session(None, batched=True)
    merged = _context(storage, context, session)
    root = as_type or type(value)
    with _telemetry.start(_telemetry.DUMP, storage, _name(root)) or _telemetry.NOTHING as op:
        with _own_errors(session):
            if isinstance(value, BaseModel):
                result = value.model_dump_json(context=merged, **kwargs)
            else:
                result = _adapter(root).dump_json(value, context=merged, **kwargs).decode()
        await session.flush()
        _observe(op, [record for _, record in session.stored.values()])
    return result


@overload
async def validate(
    type_: type[M],
    data: Any,
    *,
    storage: Storage | None = ...,
    context: Mapping[str, Any] | None = ...,
    max_depth: int = ...,
) -> M: ...


@overload
async def validate(
    type_: Any,
    data: Any,
    *,
    storage: Storage | None = ...,
    context: Mapping[str, Any] | None = ...,
    max_depth: int = ...,
) -> Any: ...


async def validate(
    type_: Any,
    data: Any,
    *,
    storage: Storage | None = None,
    context: Mapping[str, Any] | None = None,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> Any:
    """Validate ``data`` (a dict, or JSON text) as ``type_``, resolving every reference.

    References are read before validation, level by level, one batch per backend and class,
    each record once however often it is referenced. ``storage`` resolves every reference;
    without it, references to `ExternalBaseModel` classes resolve through their own storage.
    References nested deeper than ``max_depth`` or forming a cycle are validation errors.
    """
    session = _Session(None, batched=True, max_depth=max_depth)
    merged = _context(storage, context, session)
    is_json = isinstance(data, str | bytes | bytearray)
    with _telemetry.start(_telemetry.VALIDATE, storage, _name(type_)) or _telemetry.NOTHING as op:
        await session.prefetch(_parse_json(data) if is_json else data, storage)
        _observe(op, list(session.fetched.values()))
        if isinstance(type_, type) and issubclass(type_, BaseModel):
            if is_json:
                return type_.model_validate_json(data, context=merged)
            return type_.model_validate(data, context=merged)
        adapter = _adapter(type_)
        if is_json:
            return adapter.validate_json(data, context=merged)
        return adapter.validate_python(data, context=merged)


@contextlib.contextmanager
def _own_errors(session: _Session) -> Iterator[None]:
    """Pydantic turns what an `External` serializer raises (a value that cannot be stored, a
    failed write) into a PydanticSerializationError; a dump raises the library's own error."""
    try:
        yield
    except PydanticSerializationError:
        failure = session.failure
        if failure is None:
            raise
        raise failure from failure.__cause__


def _name(type_: Any) -> str:
    """The dumped or validated type, for its span."""
    return getattr(type_, "__name__", None) or repr(type_)


def _observe(op: _telemetry.Operation | None, records: list[Record | None]) -> None:
    """What one dump or validate moved: its batch size and, when it ends, its bytes."""
    if op is not None:
        op.set_batch_size(len(records))
        op.records = records


_adapters: dict[Any, TypeAdapter[Any]] = {}


def _adapter(type_: Any) -> TypeAdapter[Any]:
    """A cached TypeAdapter: building one costs far more than using it."""
    adapter = _adapters.get(type_)
    if adapter is None:
        adapter = _adapters[type_] = TypeAdapter(type_)
    return adapter


class _DumpArguments(_DumpOptions, total=False):
    """`dump`'s keyword arguments, for `dump_sync`."""

    storage: Storage | None
    as_type: Any
    mode: Literal["json", "python"]
    context: Mapping[str, Any] | None


class _DumpJsonArguments(_DumpJsonOptions, total=False):
    """`dump_json`'s keyword arguments, for `dump_json_sync`."""

    storage: Storage | None
    as_type: Any
    context: Mapping[str, Any] | None


class _ValidateArguments(TypedDict, total=False):
    """`validate`'s keyword arguments, for `validate_sync`."""

    storage: Storage | None
    context: Mapping[str, Any] | None
    max_depth: int


@overload
def dump_sync(value: BaseModel, **kwargs: Unpack[_DumpArguments]) -> dict[str, Any]: ...


@overload
def dump_sync(value: Any, **kwargs: Unpack[_DumpArguments]) -> Any: ...


def dump_sync(value: Any, **kwargs: Unpack[_DumpArguments]) -> Any:
    """`dump` for synchronous code, with the same keyword arguments."""
    return run_sync(dump(value, **kwargs))


def dump_json_sync(value: Any, **kwargs: Unpack[_DumpJsonArguments]) -> str:
    """`dump_json` for synchronous code, with the same keyword arguments."""
    return run_sync(dump_json(value, **kwargs))


@overload
def validate_sync(type_: type[M], data: Any, **kwargs: Unpack[_ValidateArguments]) -> M: ...


@overload
def validate_sync(type_: Any, data: Any, **kwargs: Unpack[_ValidateArguments]) -> Any: ...


def validate_sync(type_: Any, data: Any, **kwargs: Unpack[_ValidateArguments]) -> Any:
    """`validate` for synchronous code, with the same keyword arguments."""
    return run_sync(validate(type_, data, **kwargs))
