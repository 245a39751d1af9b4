"""The one reference parser: what a reference is, for the model, `External` and the CLI.

A reference is exactly ``{"class_name": ..., "id": ...}`` with a UUID id. Everything that
accepts one from outside (a message, a request body, a command line) checks it here, before
any I/O, so hostile input is refused the same way everywhere.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any, NotRequired, TypedDict
from uuid import UUID

from pydantic import TypeAdapter, ValidationError

from pydantic_toast._crypto import Keyring, verify_reference
from pydantic_toast._errors import StorageValidationError

__all__ = [
    "ExternalReference",
    "ReferenceLike",
    "parse_id",
    "parse_ids",
    "reference_id",
    "reference_ids",
    "short",
]

# The longest id string worth parsing: a UUID is 36 characters, 38 with braces, 45 as a URN.
_MAX_ID_LENGTH = 64

# Pydantic's UUID parser: a third of the cost of `UUID(text)` (every loaded reference pays it),
# and stricter: it takes the hyphenated and plain-hex spellings and the hyphenated one in
# braces or after "urn:uuid:", and refuses what else `UUID` lets through (plain hex in braces
# or in a URN, hyphens out of place, spaces, non-ASCII digits).
_UUID_TEXT = TypeAdapter(UUID).validator
# The same parser over a list: a batch of ids in one call, a tenth of `UUID(text)` each.
_UUID_TEXTS = TypeAdapter(list[UUID]).validator


class ExternalReference(TypedDict):
    """What travels in place of a stored model; a class with ``signed_references`` adds
    ``sig`` (its HMAC-SHA256, base64url) and, with a ``reference_ttl``, ``exp`` (Unix
    seconds)."""

    class_name: str
    id: str
    sig: NotRequired[str]
    exp: NotRequired[int]


#: What the load methods accept: a reference, or any mapping shaped like one (checked).
ReferenceLike = ExternalReference | Mapping[str, Any]


def parse_id(value: object) -> UUID | None:
    """The UUID ``value`` spells, or ``None`` (a bounded parse: ids come from outside)."""
    if isinstance(value, UUID):
        return value
    if not isinstance(value, str) or len(value) > _MAX_ID_LENGTH:
        return None
    try:
        parsed: UUID = _UUID_TEXT.validate_python(value)
    except ValidationError:
        return None
    return parsed


def parse_ids(values: Sequence[object]) -> list[UUID | None]:
    """`parse_id` of each value, in order: when all are id strings (a batch of references
    read from one document), they are parsed in one call."""
    if all(type(value) is str and len(value) <= _MAX_ID_LENGTH for value in values):
        try:
            ids: list[UUID | None] = _UUID_TEXTS.validate_python(values)
        except ValidationError:
            pass  # one of them is no UUID: each answers for itself below
        else:
            return ids
    return [parse_id(value) for value in values]


_PLAIN_KEYS = frozenset({"class_name", "id"})
_SIGNED_KEYS = frozenset({"class_name", "id", "sig", "exp"})


def is_reference(data: object, class_name: str | None = None, *, signed: bool = False) -> bool:
    """Whether ``data`` is a reference (of ``class_name``, when given); ``signed`` accepts
    the signed shape too (a ``sig`` string, an ``exp`` integer)."""
    if not isinstance(data, Mapping):
        return False
    if len(data) != 2:
        if not signed or len(data) > 4 or not set(data) <= _SIGNED_KEYS:
            return False
        exp = data.get("exp")
        if not isinstance(data.get("sig"), str) or (
            "exp" in data and (not isinstance(exp, int) or isinstance(exp, bool))
        ):
            return False
    name, id = data.get("class_name"), data.get("id")
    if not isinstance(name, str) or parse_id(id) is None:
        return False
    return class_name is None or name == class_name


def reference_id(
    reference: object, expected: str, signer: Keyring | None = None, *, expiring: bool = False
) -> UUID:
    """Check a reference to a record of class ``expected`` and return its id; with a
    ``signer`` (the keyring of a class with signed references), its signature and expiry
    (required when ``expiring``: the class has a ``reference_ttl``)."""
    if type(reference) is not dict and not isinstance(reference, Mapping):
        hint = " (a coroutine: is an await missing?)" if inspect.iscoroutine(reference) else ""
        raise StorageValidationError(
            f"{expected}: a reference must be a mapping with 'class_name' and 'id', "
            f"not {type(reference).__name__}{hint}"
        )
    allowed = _SIGNED_KEYS if signer is not None else _PLAIN_KEYS
    if len(reference) > 2 and (extra := set(reference) - allowed):
        keys = "'class_name', 'id', 'sig' and 'exp'" if signer else "'class_name' and 'id'"
        raise StorageValidationError(
            f"{expected}: a reference has only {keys}, not {short(sorted(map(str, extra)))}"
        )
    class_name = reference.get("class_name")
    if class_name != expected:
        raise StorageValidationError(f"reference is for class {short(class_name)}, not {expected}")
    raw_id = reference.get("id")
    id = parse_id(raw_id)
    if id is None:
        raise StorageValidationError(f"{expected}: invalid id {short(raw_id)}: not a UUID")
    if signer is not None:
        verify_reference(signer, expected, id, reference, expiring=expiring)
    return id


def reference_ids(
    references: Sequence[object],
    expected: str,
    signer: Keyring | None = None,
    *,
    expiring: bool = False,
) -> list[UUID]:
    """`reference_id` of each reference, in order. The common batch (unsigned plain dicts of
    ``expected`` with string ids) is checked in one pass and its ids parsed in one call;
    anything else, or any id that does not parse, goes one by one, for its own error."""
    if signer is None:
        texts: list[str] = []
        for reference in references:
            if (
                type(reference) is not dict
                or len(reference) != 2
                or reference.get("class_name") != expected
            ):
                break
            text = reference.get("id")
            if type(text) is not str or len(text) > _MAX_ID_LENGTH:
                break
            texts.append(text)
        else:
            try:
                ids: list[UUID] = _UUID_TEXTS.validate_python(texts)
            except ValidationError:
                pass
            else:
                return ids
    return [
        reference_id(reference, expected, signer, expiring=expiring) for reference in references
    ]


def short(value: object) -> str:
    """A value for an error message: its repr, cut short so hostile input stays small."""
    shown = repr(value)
    return shown if len(shown) <= 80 else shown[:77] + "..."
