"""Content addressing: ids derived from what a record holds.

A content-addressed record's id is a UUID version 8 (RFC 9562) made of the first 122 bits of
SHA-256 over the stored class name and the canonical JSON of the value, so the same value gets
the same id in every process, and a reader can prove that what it loaded is what the id
names. The version makes the id self-describing: a loader verifies every version-8 id, and
only those.

The canonical form is the value's JSON parsed and written again with sorted keys, no
whitespace, and numbers in their shortest exact decimal form, because stores rewrite JSON
(PostgreSQL's JSONB reorders keys, drops whitespace and writes ``1e2`` as ``100``): the
digest must not depend on how a store spells the same value.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable
from decimal import Decimal
from typing import Any
from uuid import UUID

from pydantic_toast._errors import StorageValidationError

__all__ = ["CONTENT_VERSION", "canonical_json", "content_id", "verify_content"]

#: The UUID version of content-addressed ids.
CONTENT_VERSION = 8


def canonical_json(data: bytes) -> bytes:
    """``data`` (JSON text) in the canonical form the digest is taken over."""
    value = _DECODER.decode(data.decode())
    return _text(value).encode()


# One decoder for every digest: `json.loads` with options builds a new one per call.
_DECODER = json.JSONDecoder(parse_float=Decimal, parse_int=Decimal)


def _text(value: Any) -> str:
    """``value``'s canonical JSON (recursively: stored JSON is bounded by the size limits,
    and a record nested deeper than Python's recursion limit is refused as corrupt)."""
    kind = type(value)
    if kind is str:
        return _string(value)
    if kind is Decimal:
        return _number(value)
    if kind is dict:
        return "{" + ",".join(_string(key) + ":" + _text(value[key]) for key in sorted(value)) + "}"
    if kind is list:
        return "[" + ",".join(_text(item) for item in value) + "]"
    return "true" if value is True else "false" if value is False else "null"


# The standard library's C string encoder (what json.dumps uses, without its call overhead).
_string: Callable[[str], str] = json.encoder.encode_basestring


def _number(value: Decimal) -> str:
    """A number's one spelling: ``100``, ``1e2`` and ``100.0`` are all ``1E+2``."""
    normalized = value.normalize()
    if normalized.is_zero():
        return "0"  # -0, 0.0 and 0E+3 are one number to JSON readers
    return format(normalized, "E")


def content_id(class_name: str, data: bytes, key: bytes | None = None) -> UUID:
    """The version-8 UUID of a value of ``class_name`` whose JSON is ``data``; with ``key``
    (an encrypted record's), HMAC-SHA256 under it, so the id reveals nothing of a value to
    whoever could guess it and compute its digest."""
    message = class_name.encode() + b"\0" + canonical_json(data)
    if key is None:
        digest = hashlib.sha256(message).digest()
    else:
        digest = hmac.new(key, message, hashlib.sha256).digest()
    raw = bytearray(digest[:16])
    raw[6] = (raw[6] & 0x0F) | (CONTENT_VERSION << 4)
    raw[8] = (raw[8] & 0x3F) | 0x80  # the RFC 9562 variant
    return UUID(bytes=bytes(raw))


def verify_content(class_name: str, id: UUID, data: bytes) -> None:
    """Refuse a content-addressed record whose content is not what its id names."""
    if (id.int >> 76) & 0xF != CONTENT_VERSION or id.version != CONTENT_VERSION:
        return  # the version nibble first: `UUID.version` costs a property and a variant
    try:
        matches = content_id(class_name, data) == id
    except (ValueError, RecursionError):
        matches = False
    if not matches:
        raise StorageValidationError(
            f"stored {class_name} record {id} does not hold the content its id names: "
            "it was corrupted or tampered with"
        )
