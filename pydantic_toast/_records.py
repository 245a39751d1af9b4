"""Records and migration: how a model becomes a record and a record a model again.

Pure functions on a class's settings: what to store for a model (refusing values that would
not load back), whether a stored record has expired, and how an older record's JSON is
upgraded by the registered migration steps before it is validated.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from functools import partial
from itertools import chain
from operator import attrgetter
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
    # By position: a third cheaper than by keyword, on every save.
    record = Record(
        id,
        settings.class_name,
        data,
        settings.schema_version,
        created_at,
        now,
        settings.compress_above,
        settings.ttl,
    )
    return sealed(settings, record)


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


def check_storable(value: object, data: bytes, class_name: str) -> None:
    """Refuse to store what cannot be read back: ``value`` (a model, or any value an
    `External` field stores) whose JSON is ``data``.

    Pydantic writes NaN and infinity as null by default, which never loads back into a float
    field; a model or dataclass whose config writes them in a form that loads back
    (``ser_json_inf_nan="strings"`` or ``"constants"``) may store them.
    """
    if isinstance(value, BaseModel):
        cls = type(value)
        # `getattr` answers from the type's attribute cache (`cls.__dict__` builds a proxy
        # per call); a plan found on a base class is the base's, so it is kept with its class.
        planned = getattr(cls, "__external_floats__", None)
        if planned is None or planned[0] is not cls:
            planned = (cls, _float_plan(cls))
            type.__setattr__(cls, "__external_floats__", planned)
        floats = planned[1]
        if floats is False:
            return
        if floats is not True:
            # Short JSON without null holds no NaN, and is scanned faster than the floats are
            # summed; otherwise the sum (a C loop) is finite unless a float is NaN or infinite.
            if len(data) <= _SUM_ABOVE and _NULL.search(data) is None:
                return
            try:
                if math.isfinite(sum(floats(value), 0.0)):
                    return
            except (TypeError, AttributeError, OverflowError):  # a None, a huge int: look closer
                pass
        elif _NULL.search(data) is None:
            return
    else:
        if _NULL.search(data) is None:
            return  # no null in the JSON: no NaN either
        try:  # plain JSON data (a dict of an `Any` field) is checked in C
            json.dumps(value, allow_nan=False)
            return
        except (TypeError, ValueError, RecursionError):  # other objects, or a NaN: look closer
            pass
    where = _non_finite_float(value)
    if where is not None:
        raise StorageValidationError(
            f"{class_name} {f'field {where}' if where else 'value'} is not a finite number: it "
            "would be stored as null and never load back (a model or dataclass config with "
            "ser_json_inf_nan='strings' stores it)"
        )


#: Every float a model's values hold, found by a plan read once from its class's core schema.
_FloatsOf = Callable[[Any], Iterable[float]]

# A class's plan is kept as its ``__external_floats__`` (with the class, as ``(cls, plan)``):
# False when its schema can hold no float (most models); True when it holds some the plan
# cannot follow (then the JSON is scanned for null and the values walked, which finds any NaN
# but costs more).
# Below this size, scanning the JSON for null costs less than summing the floats.
_SUM_ABOVE = 2048
# `re` finds a literal about twice as fast as `bytes.__contains__` in long JSON.
_NULL = re.compile(rb"null")

# Core-schema types whose values may serialize as a float: floats, and anything the schema
# does not describe (Any, a custom serializer function).
_FLOATING = frozenset({"float", "any", "function-plain", "function-wrap"})


class _Unplanned(Exception):
    """A part of a schema the float plan does not follow."""


def _float_plan(cls: type[BaseModel]) -> _FloatsOf | bool:
    """How to find every float of a model class's values (kept as the class's
    ``__external_floats__``); False also when its config writes NaN in a form that loads
    back."""
    if _loads_back_non_finite(cls.model_config):
        return False
    try:
        plan = _plan(cls.__pydantic_core_schema__, {}, frozenset())
    except _Unplanned:  # unions, Any, custom serializers, recursion
        return True
    return False if plan is None else _floats_of(plan)


# A plan for one part of a schema: ``(path, None)`` when the part holds exactly one float, at
# that attribute path from its value ("" for the value itself); ``("", floats)`` when it holds
# any number, ``floats(value)`` yielding them; ``None`` when it holds no float.
_Plan = tuple[str, _FloatsOf | None] | None

_WRAPPERS = frozenset({"default", "nullable", "model-field", "function-before", "function-after"})


def _plan(node: Any, defs: dict[str, Any], seen: frozenset[str]) -> _Plan:
    """The plan of one schema node; `_Unplanned` for a part that may hold floats the plan
    cannot follow. ``defs`` resolves references; ``seen`` are those being followed."""
    if not isinstance(node, dict) or _holds(node.get("serialization"), defs):
        raise _Unplanned
    kind = node.get("type")
    if kind == "float":
        return "", None
    if kind in _WRAPPERS:
        return _plan(node["schema"], defs, seen)
    if kind == "definitions":
        defs = {**defs, **{d["ref"]: d for d in node["definitions"]}}
        return _plan(node["schema"], defs, seen)
    if kind == "definition-ref" and node.get("schema_ref") in defs:
        ref = node["schema_ref"]
        if ref in seen:  # recursive: no finite plan, unless it holds no float at all
            if _holds(defs[ref], defs):
                raise _Unplanned
            return None
        return _plan(defs[ref], defs, seen | {ref})
    if kind == "model":
        return _model_plan(node, defs, seen)
    if kind in {"list", "set", "frozenset"}:
        plan = _plan(node.get("items_schema", {"type": "any"}), defs, seen)
        return None if plan is None else ("", _each(plan))
    if kind == "dict" and not _holds(node.get("keys_schema", {"type": "any"}), defs):
        plan = _plan(node.get("values_schema", {"type": "any"}), defs, seen)
        return None if plan is None else ("", _values(_each(plan)))
    if _holds(node, defs):
        raise _Unplanned
    return None


def _model_plan(node: dict[str, Any], defs: dict[str, Any], seen: frozenset[str]) -> _Plan:
    fields = node["schema"]
    if (
        node.get("root_model")
        or fields.get("type") != "model-fields"
        or fields.get("extra_behavior") == "allow"
        or node["cls"].model_config.get("extra") == "allow"
        or _holds(fields.get("computed_fields"), defs)
    ):
        raise _Unplanned
    parts = []
    for name, field in fields["fields"].items():
        plan = _plan(field, defs, seen)
        if plan is not None:
            parts.append((name, plan))
    if not parts:
        return None
    if len(parts) == 1:  # the common shape: one field holds the floats
        ((name, (path, many)),) = parts
        if many is None:
            return f"{name}.{path}" if path else name, None
        return "", _field(attrgetter(name), many)
    return "", _fields(parts)


def _holds(schema: object, defs: dict[str, Any]) -> bool:
    """Whether a schema part may serialize a float, following references (an unknown one
    may hold anything)."""
    stack, followed = [schema], set()
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            kind, ref = node.get("type"), node.get("schema_ref")
            if kind in _FLOATING:
                return True
            if kind == "definition-ref" and ref not in followed:
                followed.add(ref)
                stack.append(defs.get(str(ref), {"type": "any"}))
            stack.extend(node.values())
        elif isinstance(node, list | tuple):
            stack.extend(node)
    return False


def _floats_of(plan: tuple[str, _FloatsOf | None]) -> _FloatsOf:
    path, many = plan
    if many is not None:
        return many
    if path:
        one = attrgetter(path)
        return lambda value: (one(value),)
    return lambda value: (value,)


def _each(plan: tuple[str, _FloatsOf | None]) -> _FloatsOf:
    path, many = plan
    if many is not None:
        return lambda values: chain.from_iterable(map(many, values))
    if path:
        return partial(map, attrgetter(path))
    return lambda values: values


def _values(floats: _FloatsOf) -> _FloatsOf:
    return lambda mapping: floats(mapping.values())


def _field(get: Callable[[Any], Any], floats: _FloatsOf) -> _FloatsOf:
    return lambda model: floats(get(model))


def _fields(parts: list[tuple[str, tuple[str, _FloatsOf | None]]]) -> _FloatsOf:
    getters = [(attrgetter(name), _floats_of(plan)) for name, plan in parts]
    return lambda model: chain.from_iterable(floats(get(model)) for get, floats in getters)


def _loads_back_non_finite(config: Mapping[str, Any]) -> bool:
    """Whether a model's or dataclass's config writes NaN and infinity in a form that loads
    back (``ser_json_inf_nan`` ``"strings"`` or ``"constants"``), not as null."""
    return bool(config.get("ser_json_inf_nan", "null") != "null")


def _non_finite_float(value: object, path: str = "") -> str | None:
    """The path of the first NaN or infinity in a value (``""``: the value itself), or
    ``None``. Models (their extra fields too), dataclasses, mappings and collections are
    walked: what Pydantic serializes as JSON objects and arrays."""
    if isinstance(value, float):
        return None if math.isfinite(value) else path
    items: Iterable[tuple[object, object]]
    if isinstance(value, BaseModel):
        if _loads_back_non_finite(value.model_config):
            return None
        extra = value.__pydantic_extra__ or {}
        items = chain(
            ((name, getattr(value, name)) for name in type(value).model_fields), extra.items()
        )
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        if _loads_back_non_finite(getattr(value, "__pydantic_config__", None) or {}):
            return None
        items = ((field.name, getattr(value, field.name)) for field in dataclasses.fields(value))
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


def time_left(updated_at: datetime, ttl: timedelta | None) -> timedelta | None:
    """How long a record last updated at ``updated_at`` has left under ``ttl`` (``None``
    without one): the ttl of a rewrite that keeps the record's timestamps (a migrated
    write-back, a rekey), so that the store expires it when it would have anyway."""
    if ttl is None:
        return None
    try:
        return ttl - (datetime.now(UTC) - updated_at)
    except OverflowError:  # a record at the edge of time: it has all of its ttl left
        return ttl


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
