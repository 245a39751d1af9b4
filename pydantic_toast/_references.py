"""The one reference parser: what a reference is, for the model, `External` and the CLI.

A reference is exactly ``{"class_name": ..., "id": ...}`` with a UUID id. Everything that
accepts one from outside (a message, a request body, a command line) checks it here, before
any I/O, so hostile input is refused the same way everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypedDict
from uuid import UUID

from pydantic_toast._errors import StorageValidationError

__all__ = ["ExternalReference", "ReferenceLike", "parse_id", "reference_id", "short"]

# The longest id string worth parsing: a UUID is 36 characters, 38 with braces, 45 as a URN.
_MAX_ID_LENGTH = 64


class ExternalReference(TypedDict):
    """What travels in place of a stored model."""

    class_name: str
    id: str


#: What the load methods accept: a reference, or any mapping shaped like one (checked).
ReferenceLike = ExternalReference | Mapping[str, Any]


def parse_id(value: object) -> UUID | None:
    """The UUID ``value`` spells, or ``None`` (a bounded parse: ids come from outside)."""
    if isinstance(value, UUID):
        return value
    if not isinstance(value, str) or len(value) > _MAX_ID_LENGTH:
        return None
    try:
        return UUID(value)
    except ValueError:
        return None


def is_reference(data: object, class_name: str | None = None) -> bool:
    """Whether ``data`` is a reference (of ``class_name``, when given)."""
    if not isinstance(data, Mapping) or len(data) != 2:
        return False
    name, id = data.get("class_name"), data.get("id")
    if not isinstance(name, str) or parse_id(id) is None:
        return False
    return class_name is None or name == class_name


def reference_id(reference: object, expected: str) -> UUID:
    """Check a reference to a record of class ``expected`` and return its id."""
    if type(reference) is not dict and not isinstance(reference, Mapping):
        raise StorageValidationError(
            f"{expected}: a reference must be a mapping with 'class_name' and 'id', "
            f"not {type(reference).__name__}"
        )
    if len(reference) > 2 and (extra := set(reference) - {"class_name", "id"}):
        raise StorageValidationError(
            f"{expected}: a reference has only 'class_name' and 'id', "
            f"not {short(sorted(map(str, extra)))}"
        )
    class_name = reference.get("class_name")
    if class_name != expected:
        raise StorageValidationError(f"reference is for class {short(class_name)}, not {expected}")
    raw_id = reference.get("id")
    id = parse_id(raw_id)
    if id is None:
        raise StorageValidationError(f"{expected}: invalid id {short(raw_id)}: not a UUID")
    return id


def short(value: object) -> str:
    """A value for an error message: its repr, cut short so hostile input stays small."""
    shown = repr(value)
    return shown if len(shown) <= 80 else shown[:77] + "..."
