"""Records and migration: how a model becomes a record and a record a model again.

Pure functions on a class's settings: what to store for a model (refusing values that would
not load back), whether a stored record has expired, and how an older record's JSON is
upgraded by the registered migration steps before it is validated.
"""

from __future__ import annotations

import json
import math
import re
import weakref
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from pydantic import BaseModel

from pydantic_toast._config import ModelSettings
from pydantic_toast._crypto import Keyring, current_keyring, open_data, seal_data
from pydantic_toast._errors import StorageValidationError
from pydantic_toast.backends.records import Record

__all__ = [
    "Migration",
    "check_storable",
    "expired",
    "keyring_of",
    "migrate",
    "new_record",
    "plain_data",
    "sealed",
]

#: A step that upgrades a stored dict from one schema version to the next.
Migration = Callable[[dict[str, Any]], dict[str, Any]]


def new_record(
    settings: ModelSettings, data: bytes, id: UUID, created_at: datetime, now: datetime
) -> Record:
    return sealed(
        settings,
        Record(
            id=id,
            class_name=settings.class_name,
            data=data,
            schema_version=settings.schema_version,
            created_at=created_at,
            updated_at=now,
            compress_above=settings.compress_above,
            ttl=settings.ttl,
        ),
    )


def keyring_of(settings: ModelSettings) -> Keyring:
    """The keyring a class encrypts and signs with."""
    return current_keyring(settings.keyring, settings.class_name)


def sealed(settings: ModelSettings, record: Record) -> Record:
    """The codec step of the model layer: a record of an encrypted class leaves sealed (its
    JSON compressed, then encrypted); any other record leaves as it is, byte for byte."""
    if settings.encrypt:
        return seal_data(record, keyring_of(settings))
    return record


def plain_data(settings: ModelSettings, record: Record) -> bytes:
    """A loaded record's JSON: opened (decrypted and checked) for an encrypted class."""
    if settings.encrypt:
        return open_data(record, keyring_of(settings))
    return record.data


def check_storable(model: BaseModel, data: bytes, class_name: str) -> None:
    """Refuse to store what cannot be read back.

    Pydantic writes NaN and infinity as null by default, which never loads back into a float
    field; a model whose config writes them in a form that loads back
    (``ser_json_inf_nan="strings"`` or ``"constants"``) may store them.
    """
    if model.model_config.get("ser_json_inf_nan", "null") != "null":
        return
    if not _may_hold_floats(type(model)) or _NULL.search(data) is None:
        return  # no float anywhere in the schema, or no null in the JSON: no NaN either
    where = _non_finite_float(model)
    if where is not None:
        raise StorageValidationError(
            f"{class_name} field {where} is not a finite number: it would be stored as null "
            "and never load back (set ser_json_inf_nan='strings' in the model's config to "
            "store it)"
        )


_floats: weakref.WeakKeyDictionary[type, bool] = weakref.WeakKeyDictionary()
# `re` finds a literal about twice as fast as `bytes.__contains__` in long JSON.
_NULL = re.compile(rb"null")

# Core-schema types whose values may serialize as a float: floats, and anything the schema
# does not describe (Any, a custom serializer function).
_FLOATING = frozenset({"float", "any", "function-plain", "function-wrap"})


def _may_hold_floats(cls: type[BaseModel]) -> bool:
    """Whether a model class's values can hold a float anywhere, from its core schema (read
    once per class): most models cannot, and then nothing needs checking."""
    known = _floats.get(cls)
    if known is None:
        known = _floats[cls] = _schema_has(cls.__pydantic_core_schema__, _FLOATING)
    return known


def _schema_has(schema: object, kinds: frozenset[str]) -> bool:
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("type") in kinds:
                return True
            stack.extend(node.values())
        elif isinstance(node, list | tuple):
            stack.extend(node)
    return False


def _non_finite_float(value: object, path: str = "") -> str | None:
    """The path of the first NaN or infinity in a model's values, or ``None``."""
    if isinstance(value, float):
        return None if math.isfinite(value) else path or "the value"
    items: Iterable[tuple[object, object]]
    if isinstance(value, BaseModel):
        items = ((name, getattr(value, name)) for name in type(value).model_fields)
    elif isinstance(value, Mapping):
        items = value.items()
    elif isinstance(value, list | tuple | set | frozenset):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _non_finite_float(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def expired(updated_at: datetime, ttl: timedelta) -> bool:
    """Whether a record last updated at ``updated_at`` outlived ``ttl``. Computed from now
    backwards, so a record at the edge of time (year 9999, PostgreSQL's ``infinity``) never
    overflows: it simply has not expired."""
    try:
        return updated_at < datetime.now(UTC) - ttl
    except OverflowError:  # a ttl reaching before year 1: nothing is that old
        return False


def migrate(settings: ModelSettings, migrations: Mapping[int, Migration], record: Record) -> bytes:
    """The JSON of an older record, upgraded step by step to the current schema version."""
    current, name = settings.schema_version, settings.class_name
    if record.schema_version > current:
        raise StorageValidationError(
            f"stored {name} record {record.id} has schema version {record.schema_version}, "
            f"newer than this code's {current}: deploy the newer model first"
        )
    try:
        data = json.loads(record.data)
    except (ValueError, RecursionError) as exc:
        raise StorageValidationError(f"stored {name} record {record.id} is corrupt: {exc}") from exc
    for version in range(record.schema_version, current):
        step = migrations.get(version)
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
