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

`canonical_json` is that definition, and it is slow: a Python hook per number. `content_id`
takes a fast road to the same bytes where it can prove them the same: pydantic-core parses
the text, and numbers are spelled from the parsed ``int`` or ``float``. A parsed ``float``
is its text's exact number when the text has at most 15 significant digits and a value in
the normal range (``DBL_DIG``: two such decimals never round to one double, so the float's
shortest repr is that number). A record with a float and a run of 16 digits anywhere, a
zero float and a three-digit exponent, a float near the ends of the range, ``NaN`` or an
infinity, or JSON that pydantic-core refuses takes the definition.
"""

from __future__ import annotations

import decimal
import hashlib
import hmac
import json
import re
from collections.abc import Callable
from decimal import Decimal
from typing import Any
from uuid import UUID

from pydantic_core import from_json

from pydantic_toast._errors import StorageValidationError

__all__ = ["CONTENT_VERSION", "canonical_json", "content_id", "verify_content"]

#: The UUID version of content-addressed ids.
CONTENT_VERSION = 8


def canonical_json(data: bytes) -> bytes:
    """``data`` (JSON text) in the canonical form the digest is taken over."""
    value = _DECODER.decode(data.decode())
    return _text(value, _EXACT).encode()


# Numbers are spelled exactly, whatever the caller's decimal context: two values that differ
# only in a far digit are two values, with two ids.
_EXACT = decimal.Context(prec=decimal.MAX_PREC, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN)
# Ids were once spelled under the default context, which rounds numbers to 28 significant
# digits; a record stored under such an id still verifies (see `verify_content`).
_ROUNDED = decimal.Context()


# One decoder for every digest: `json.loads` with options builds a new one per call.
_DECODER = json.JSONDecoder(parse_float=Decimal, parse_int=Decimal)


def _text(value: Any, context: decimal.Context) -> str:
    """``value``'s canonical JSON, its numbers spelled under ``context`` (recursively: stored
    JSON is bounded by the size limits, and a record nested deeper than Python's recursion
    limit is refused as corrupt)."""
    kind = type(value)
    if kind is str:
        return _string(value)
    if kind is Decimal:
        return _number(value, context)
    if kind is dict:
        items = (_string(key) + ":" + _text(value[key], context) for key in sorted(value))
        return "{" + ",".join(items) + "}"
    if kind is list:
        return "[" + ",".join(_text(item, context) for item in value) + "]"
    return "true" if value is True else "false" if value is False else "null"


# The standard library's C string encoder (what json.dumps uses, without its call overhead).
_string: Callable[[str], str] = json.encoder.encode_basestring


def _number(value: Decimal, context: decimal.Context = _EXACT) -> str:
    """A number's one spelling: ``100``, ``1e2`` and ``100.0`` are all ``1E+2``."""
    normalized = value.normalize(context)
    if normalized.is_zero():
        return "0"  # -0, 0.0 and 0E+3 are one number to JSON readers
    return format(normalized, "E")


class _Unsure(Exception):
    """The fast road cannot promise the definition's bytes for this record."""


# Sixteen digits or dots in a row, anywhere (strings too): a float's mantissa may have more
# than 15 significant digits. Looked for as sixteen 1s once digits and dots are 1s and all
# else 0s (two C calls; a regular expression scans slower).
_DIGITS_AS_ONES = bytes(0x31 if chr(byte) in "0123456789." else 0x30 for byte in range(256))
_LONG_MANTISSA = b"1" * 16
# A three-digit exponent: a parsed zero may be a tiny number's underflow.
_LONG_EXPONENT = re.compile(rb"[eE][+-]?[0-9]{3}")


def _fast_canonical(data: bytes) -> bytes | None:
    """`canonical_json(data)`, or ``None`` where only the definition may answer."""
    try:
        value = from_json(data)
    except ValueError:
        return None  # what such text makes (or how it fails) is the definition's to say
    floats: list[float] = []
    try:
        text = _fast_text(value, floats)
    except (_Unsure, RecursionError, ArithmeticError):
        return None
    if floats:
        if _LONG_MANTISSA in data.translate(_DIGITS_AS_ONES):
            return None
        if 0.0 in floats and _LONG_EXPONENT.search(data):
            return None
    return text.encode()


def _fast_text(value: Any, floats: list[float]) -> str:
    """`_text` of pydantic-core's parse (a dict's scalars spelled in line: most records are
    one flat object); every float met is added to ``floats``."""
    kind = type(value)
    if kind is dict:
        parts = []
        shape = tuple(value)  # the keys in the text's order: one class's records share it
        order = _SHAPES.get(shape)
        if order is None:
            order = [(key, _string(key) + ":") for key in sorted(value)]
            if len(shape) <= 64:
                _remember(_SHAPES, shape, order)
        for key, prefix in order:
            item = value[key]
            kind = type(item)
            if kind is str:
                spelled = _string(item)
            elif kind is int:
                spelled = _INTS.get(item) or _int_text(item)
            elif kind is float:
                floats.append(item)
                spelled = _FLOATS.get(item) or _float_text(item)
            else:
                spelled = _fast_text(item, floats)
            parts.append(prefix + spelled)
        return "{" + ",".join(parts) + "}"
    if kind is list:
        return "[" + ",".join([_fast_text(item, floats) for item in value]) + "]"
    if kind is str:
        return _string(value)
    if kind is int:
        return _INTS.get(value) or _int_text(value)
    if kind is float:
        floats.append(value)
        return _FLOATS.get(value) or _float_text(value)
    return "true" if value is True else "false" if value is False else "null"


# Spellings met before, of the numbers that every context of 17 digits or more spells alike
# (the float repr has at most 17): integers of at most 15 digits, and floats.
_INTS: dict[int, str] = {}
_FLOATS: dict[float, str] = {}
# An object's keys as they came -> its keys sorted, each with its spelling and colon.
_SHAPES: dict[tuple[str, ...], list[tuple[str, str]]] = {}
_SMALL = 10**15


def _int_text(value: int) -> str:
    spelled = _number(Decimal(value))  # exact: the definition's own steps
    if -_SMALL < value < _SMALL:
        _remember(_INTS, value, spelled)
    return spelled


def _float_text(value: float) -> str:
    if value != 0.0 and not 1e-300 < abs(value) < 1e300:
        raise _Unsure  # subnormal, infinite, NaN, or too near the edge to trust
    spelled = _number(Decimal(repr(value)))  # ``-0.0 == 0.0``, and both spell ``0``
    _remember(_FLOATS, value, spelled)
    return spelled


def _remember(spellings: dict[Any, Any], value: Any, spelled: Any) -> None:
    if len(spellings) >= 4096:
        spellings.clear()  # bounded: a record's numbers are as many as its values
    spellings[value] = spelled


def content_id(class_name: str, data: bytes, key: bytes | None = None) -> UUID:
    """The version-8 UUID of a value of ``class_name`` whose JSON is ``data``; with ``key``
    (an encrypted record's), HMAC-SHA256 under it, so the id reveals nothing of a value to
    whoever could guess it and compute its digest."""
    return UUID(int=_content_int(class_name, data, key))


# The version and variant bits of a content id (RFC 9562), set over the digest's first 128.
_KEEP = ~((0xF << 76) | (0x3 << 62)) & ((1 << 128) - 1)
_MARKS = (CONTENT_VERSION << 76) | (0x2 << 62)


def _content_int(class_name: str, data: bytes, key: bytes | None = None) -> int:
    """`content_id` as an integer (a load compares it with the id's, building no UUID)."""
    canonical = _fast_canonical(data)
    if canonical is None:
        canonical = canonical_json(data)
    message = class_name.encode() + b"\0" + canonical
    if key is None:
        digest = hashlib.sha256(message).digest()
    else:
        digest = hmac.new(key, message, hashlib.sha256).digest()
    return (int.from_bytes(digest[:16]) & _KEEP) | _MARKS


def _rounded_int(class_name: str, data: bytes) -> int:
    """The id ``data`` had when numbers were rounded to 28 digits (`_ROUNDED`), which
    differs from its exact id only when one of its numbers has more digits than that."""
    value = _DECODER.decode(data.decode())
    canonical = _text(value, _ROUNDED).encode()
    digest = hashlib.sha256(class_name.encode() + b"\0" + canonical).digest()
    return (int.from_bytes(digest[:16]) & _KEEP) | _MARKS


def verify_content(class_name: str, id: UUID, data: bytes) -> None:
    """Refuse a content-addressed record whose content is not what its id names."""
    number = id.int
    if (number >> 76) & 0xF != CONTENT_VERSION or (number >> 62) & 0x3 != 0x2:
        return  # not version 8 of RFC 9562's variant (`UUID.version`, without its property)
    try:
        matches = (
            _content_int(class_name, data) == number or _rounded_int(class_name, data) == number
        )
    except (ValueError, RecursionError, ArithmeticError):
        matches = False
    if not matches:
        raise StorageValidationError(
            f"stored {class_name} record {id} does not hold the content its id names: "
            "it was corrupted or tampered with"
        )
