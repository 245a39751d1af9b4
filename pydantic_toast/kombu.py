"""Celery and kombu: a serializer that carries Pydantic models and claim-checks large bodies.

`register_claim_check` registers a kombu serializer (``task_serializer="toast"``). It writes
JSON exactly as kombu's ``json`` serializer does (datetimes, UUIDs, decimals and bytes
included), and also:

* Pydantic models, anywhere in the body, travel as their JSON with their class, and come out
  on the consumer as the same model. Their `External` fields travel as references, written to
  the claim check's storage (in one batch per message) before the body is handed to kombu.
* A body longer than ``threshold`` bytes is stored as one record and the message carries only
  its reference (about 120 bytes); the consumer reads the record back transparently.

Payloads outlive their messages. A stored body is content-addressed (its id is the digest of
what it holds), written before the message is published and never deleted when a consumer
reads it: a retry, a redelivery after a worker died before acknowledging, and every consumer
of a fanned-out message all read the same record. A record goes only when its ``ttl`` runs
out (Redis expires it; other stores hide it from then on and ``purge`` removes it) or when
garbage collection, with its grace period, removes what nothing refers to. Sending the same
body again rewrites the record, which renews its ttl.

Which classes a message may name: only Pydantic model classes of modules this process has
already imported, looked up by module and qualified name, and only where the class found is
defined under exactly that name. A message never makes the consumer import a module, and a
name that leads to anything but a ``BaseModel`` subclass is refused, so a forged message can
at most build a model that the consumer's own code defines and validates.

Kombu calls serializers synchronously, in whatever thread or process does the sending or
receiving; the storage I/O goes through the library's sync bridge, which gives a forked
prefork child backends of its own instead of its parent's connections.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from pydantic import BaseModel, ValidationError

from pydantic_toast import _telemetry
from pydantic_toast._bridge import run_sync
from pydantic_toast._config import as_duration
from pydantic_toast._content import CONTENT_VERSION, content_id, verify_content
from pydantic_toast._errors import (
    CorruptRecordError,
    RecordNotFoundError,
    StorageValidationError,
    invalid_data,
    mask_url,
)
from pydantic_toast._external import DumpBatch, validate
from pydantic_toast._model import ExternalBaseModel
from pydantic_toast._records import expired
from pydantic_toast._references import reference_id, short
from pydantic_toast._registry import check_storage_url
from pydantic_toast._retry import with_backend
from pydantic_toast.backends.records import MAX_DECOMPRESSED_SIZE, Record

try:
    from kombu.serialization import register as _register_serializer
    from kombu.utils.json import JSONEncoder as _KombuJSONEncoder
    from kombu.utils.json import object_hook as _kombu_object_hook
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "pydantic_toast.kombu needs kombu (and Celery to use it with Celery): "
        "pip install 'pydantic-toast[celery]'"
    ) from exc

__all__ = ["PAYLOAD_CLASS", "register_claim_check"]

#: The class name under which stored message bodies live in the storage.
PAYLOAD_CLASS = "KombuBody"

# Markers have the shape of kombu's own (``{"__type__": ..., "__value__": ...}``).
_MODEL = "toast.model"
_CLAIM = "toast.claim"
_CLAIM_START = b'{"__type__":"toast.claim","__value__":'
# A claim-check message is about 120 bytes; anything much longer is not one.
_MAX_CLAIM_SIZE = 1024
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
_COMPACT = (",", ":")


def register_claim_check(
    storage: str,
    *,
    threshold: int = 256 * 1024,
    name: str = "toast",
    ttl: float | timedelta | None = None,
    max_size: int = MAX_DECOMPRESSED_SIZE,
) -> str:
    """Register the kombu serializer ``name`` and return its content type.

    ``storage`` (a storage URL) holds bodies longer than ``threshold`` bytes and the
    `External` values of models in messages. ``ttl`` (seconds or a timedelta) is how long a
    stored body lives after it was last sent; ``None`` keeps it until garbage collection.
    ``max_size`` bounds a body, inline or stored, on both sides: longer ones are refused
    before they are parsed. Register in every process that sends or receives (the module
    that defines the Celery app), with the same arguments, then set ``task_serializer``,
    ``result_serializer``, ``accept_content`` and ``result_accept_content`` to ``name``.
    """
    if not isinstance(storage, str):
        raise StorageValidationError(
            f"register_claim_check needs a storage URL, not {type(storage).__name__}"
        )
    check_storage_url(storage, "register_claim_check")
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        raise StorageValidationError(
            f"register_claim_check: invalid serializer name {short(name)}: use letters, "
            "digits, '_', '.' and '-' (at most 64 characters)"
        )
    for option, value in (("threshold", threshold), ("max_size", max_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise StorageValidationError(
                f"register_claim_check: {option} must be a byte count, not {short(value)}"
            )
    lifetime = as_duration(ttl)
    if lifetime is not None and (not isinstance(lifetime, timedelta) or lifetime <= timedelta(0)):
        raise StorageValidationError(
            f"register_claim_check: ttl must be a positive duration, not {short(lifetime)}"
        )
    content_type = f"application/x-{name}+json"
    codec = _ClaimCheck(storage, threshold, lifetime, max_size)
    # kombu's registry is untyped.
    _register_serializer(  # type: ignore[no-untyped-call]
        name, codec.encode, codec.decode, content_type, "utf-8"
    )
    return content_type


@dataclass(frozen=True)
class _ClaimCheck:
    """The encoder and decoder of one registered serializer. Holds no connection: every
    storage operation asks the registry for the live backend of the calling thread's loop."""

    storage: str
    threshold: int
    ttl: timedelta | None
    max_size: int

    # --- sending ---------------------------------------------------------------------------

    def encode(self, value: Any) -> bytes:
        if _is_marker(value, _CLAIM):
            raise StorageValidationError(
                f"a message body shaped like a claim-check reference ({_CLAIM!r}) cannot be "
                "sent: the consumer would read it as one"
            )
        batch = DumpBatch(self.storage)
        body = _Encoder(batch.context).encode(value).encode()
        if len(body) > self.max_size:
            raise StorageValidationError(
                f"the message body is {len(body)} bytes, more than max_size={self.max_size}"
            )
        if len(body) <= self.threshold:
            if batch.pending:
                run_sync(batch.flush())
            return body
        record = self._record(body)
        run_sync(self._write(batch, record))
        reference = {"class_name": record.class_name, "id": str(record.id)}
        return _CLAIM_START + json.dumps(reference, separators=_COMPACT).encode() + b"}"

    def _record(self, body: bytes) -> Record:
        data = b'{"body":' + body + b"}"
        now = datetime.now(UTC)
        return Record(
            id=content_id(PAYLOAD_CLASS, data),
            class_name=PAYLOAD_CLASS,
            data=data,
            schema_version=1,
            created_at=now,
            updated_at=now,
            ttl=self.ttl,
        )

    async def _write(self, batch: DumpBatch, record: Record) -> None:
        await asyncio.gather(batch.flush(), self._write_body(record))

    async def _write_body(self, record: Record) -> None:
        with (
            _telemetry.start(_telemetry.SAVE, self.storage, PAYLOAD_CLASS)
            or _telemetry.NOTHING as op
        ):
            await with_backend(
                self.storage, lambda backend: backend.write_record(record), observed=op
            )
            if op is not None:
                op.records = (record,)

    async def _read_body(self, id: UUID) -> Record | None:
        with (
            _telemetry.start(_telemetry.LOAD, self.storage, PAYLOAD_CLASS)
            or _telemetry.NOTHING as op
        ):
            record = await with_backend(
                self.storage, lambda backend: backend.read_record(PAYLOAD_CLASS, id), observed=op
            )
            if op is not None:
                op.records = (record,)
        return record

    # --- receiving -------------------------------------------------------------------------

    def decode(self, body: bytes | bytearray | memoryview | str) -> Any:
        raw = body.encode() if isinstance(body, str) else bytes(body)
        if len(raw) > self.max_size:
            raise StorageValidationError(
                f"the message body is {len(raw)} bytes, more than max_size={self.max_size}: "
                "refused unread"
            )
        if raw.startswith(_CLAIM_START):
            return self._claimed(raw)
        return self._parse(raw, "the message body")

    def _claimed(self, raw: bytes) -> Any:
        if len(raw) > _MAX_CLAIM_SIZE:
            raise StorageValidationError(
                f"the claim-check reference is {len(raw)} bytes, more than a reference "
                f"ever is ({_MAX_CLAIM_SIZE})"
            )
        try:
            marker = json.loads(raw)
        except ValueError as exc:
            raise StorageValidationError(f"malformed claim-check reference: {exc}") from None
        if not isinstance(marker, dict) or marker.keys() != {"__type__", "__value__"}:
            raise StorageValidationError("malformed claim-check reference: unexpected keys")
        id = reference_id(marker["__value__"], PAYLOAD_CLASS)
        if id.version != CONTENT_VERSION:
            raise StorageValidationError(
                f"claim-check reference {id} is not a content id: this serializer never issued it"
            )
        record = run_sync(self._read_body(id))
        if record is None or (self.ttl is not None and expired(record.updated_at, self.ttl)):
            raise RecordNotFoundError(PAYLOAD_CLASS, [str(id)], self.storage)
        if len(record.data) > self.max_size + len(b'{"body":}'):
            raise CorruptRecordError(
                PAYLOAD_CLASS, id, f"{len(record.data)} bytes, more than max_size={self.max_size}"
            )
        verify_content(PAYLOAD_CLASS, id, record.data)
        stored = self._parse(record.data, f"stored {PAYLOAD_CLASS} record {id}")
        if not isinstance(stored, dict) or stored.keys() != {"body"}:
            raise CorruptRecordError(PAYLOAD_CLASS, id, "it does not hold a message body")
        return stored["body"]

    def _parse(self, raw: bytes, what: str) -> Any:
        slots: list[_ModelSlot] = []

        def object_hook(item: dict[str, Any]) -> Any:
            if len(item) == 2 and "__type__" in item and "__value__" in item:
                kind = item["__type__"]
                if kind == _MODEL:
                    slot = _ModelSlot.of(item["__value__"])
                    slots.append(slot)
                    return slot
                if kind == _CLAIM:
                    raise StorageValidationError(
                        f"{what} holds a claim-check reference inside it: a reference is "
                        "only ever a whole message"
                    )
            return _kombu_object_hook(item)

        try:
            value = json.loads(raw, object_hook=object_hook)
        except StorageValidationError:
            raise
        except (ValueError, RecursionError) as exc:
            raise StorageValidationError(f"{what} is not JSON: {exc}") from None
        if slots:
            self._resolve(slots)
            value = _fill(value)
        return value

    def _resolve(self, slots: list[_ModelSlot]) -> None:
        """Validate the models of one message; those holding references resolve together."""
        referring = [slot for slot in slots if '"class_name"' in slot.json]
        for slot in slots:
            if '"class_name"' not in slot.json:
                slot.model = _validated(slot)
        if referring:
            models = run_sync(_validate_all(referring, self.storage))
            for slot, model in zip(referring, models, strict=True):
                slot.model = model


@dataclass(eq=False)
class _ModelSlot:
    """Where a model stands in a parsed body until it is validated (after the parse, so that
    the models of one message resolve their references together)."""

    cls: type[BaseModel]
    json: str
    model: BaseModel | None = field(default=None)

    @classmethod
    def of(cls, value: object) -> _ModelSlot:
        if (
            not isinstance(value, dict)
            or value.keys() != {"class", "json"}
            or not isinstance(value["json"], str)
        ):
            raise StorageValidationError("malformed model in the message: expected class and json")
        return cls(_model_class(value["class"]), value["json"])


def _validated(slot: _ModelSlot) -> BaseModel:
    try:
        return slot.cls.model_validate_json(slot.json)
    except ValidationError as exc:
        raise StorageValidationError(
            f"the {slot.cls.__qualname__} in the message does not validate: {invalid_data(exc)}"
        ) from None


async def _validate_all(slots: list[_ModelSlot], storage: str) -> list[BaseModel]:
    async def one(slot: _ModelSlot) -> BaseModel:
        try:
            model: BaseModel = await validate(slot.cls, slot.json, storage=storage)
        except ValidationError as exc:
            raise StorageValidationError(
                f"the {slot.cls.__qualname__} in the message does not validate "
                f"(storage {mask_url(storage)}): {invalid_data(exc)}"
            ) from None
        return model

    return list(await asyncio.gather(*(one(slot) for slot in slots)))


def _fill(value: Any) -> Any:
    """``value`` with every `_ModelSlot` replaced by its model (iteratively: no depth limit
    beyond the parser's)."""
    if isinstance(value, _ModelSlot):
        return value.model
    stack = [value]
    while stack:
        container = stack.pop()
        keys = container.keys() if isinstance(container, dict) else range(len(container))
        for key in keys:
            item = container[key]
            if isinstance(item, _ModelSlot):
                container[key] = item.model
            elif isinstance(item, dict | list):
                stack.append(item)
    return value


def _is_marker(value: object, kind: str) -> bool:
    return (
        isinstance(value, dict)
        and len(value) == 2
        and value.get("__type__") == kind
        and "__value__" in value
    )


class _Encoder(_KombuJSONEncoder):
    """kombu's JSON encoder, plus Pydantic models dumped under the batch's context."""

    def __init__(self, context: dict[str, Any]) -> None:
        super().__init__(separators=_COMPACT)
        self.context = context

    def default(self, o: Any) -> Any:
        if isinstance(o, BaseModel):
            if isinstance(o, ExternalBaseModel) and type(o).__external_settings__.encrypt:
                name = type(o).__name__
                raise StorageValidationError(
                    f"{name} is encrypted at rest (ExternalConfigDict(encrypt=True)): in a "
                    "message its fields would travel in the clear, on the broker and in the "
                    f"result backend; send the reference {name}.save_external() returns, or a "
                    f"model with an External[{name}] field"
                )
            text = o.model_dump_json(context=self.context, round_trip=True)
            return {"__type__": _MODEL, "__value__": {"class": _class_path(type(o)), "json": text}}
        return super().default(o)  # type: ignore[no-untyped-call]  # kombu is untyped


def _class_path(cls: type[BaseModel]) -> str:
    qualname = cls.__qualname__
    if not all(part.isidentifier() for part in qualname.split(".")):
        raise StorageValidationError(
            f"{qualname} cannot travel in a message: the consumer finds a model class by its "
            "module and name, so it must be defined at module level (not in a function, and "
            "not a parametrized generic)"
        )
    return f"{cls.__module__}:{qualname}"


def _model_class(path: object) -> type[BaseModel]:
    """The model class a message names, if this process has it (see the module docstring)."""
    if not isinstance(path, str) or len(path) > 300:
        raise StorageValidationError(f"invalid model class {short(path)} in the message")
    module_name, colon, qualname = path.partition(":")
    if not colon or not all(
        part.isidentifier() for part in (*module_name.split("."), *qualname.split("."))
    ):
        raise StorageValidationError(f"invalid model class {short(path)} in the message")
    module = sys.modules.get(module_name)
    if module is None:
        raise StorageValidationError(
            f"the message holds a {path} model, but this process has not imported "
            f"{module_name}: import it before receiving (messages never import modules)"
        )
    found: object = module
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if not (
        isinstance(found, type)
        and issubclass(found, BaseModel)
        and found.__module__ == module_name
        and found.__qualname__ == qualname
    ):
        raise StorageValidationError(f"{short(path)} in the message is not a Pydantic model class")
    return found
