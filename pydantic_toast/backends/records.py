"""What backends move: the `Record`, the envelope codec, and the one decoder of stored data.

Backends know nothing of models. They move *records*: an id, a class name, the model's fields
as JSON bytes (produced once by Pydantic's serializer) and the record's metadata. Whatever
shape a store hands back (an envelope of bytes, a table row, a four-method backend's dict) is
decoded and checked here, by `decode_stored`, so that every backend refuses the same corrupt
data with the same `CorruptRecordError`, naming class and id.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, NamedTuple
from uuid import UUID

from pydantic import TypeAdapter

from pydantic_toast._errors import CorruptRecordError, StorageValidationError

__all__ = [
    "HEAD_BYTES",
    "MAX_DECOMPRESSED_SIZE",
    "UPDATED_AT_OFFSET",
    "Record",
    "RecordInfo",
    "StoredInfo",
    "StoredRow",
    "check_class_name",
    "compress",
    "decode_envelope",
    "decode_info",
    "decode_stored",
    "decompress",
    "encode_envelope",
    "holds_unchanged",
    "id_text",
    "id_texts",
    "require_zstd",
    "timestamp_text",
]

# Class names become parts of keys, object names and file paths: letters, digits, "_", "." and
# "-" only, starting with a letter or "_". That excludes "/", "..", ":", "*", spaces and
# control characters, so no name can leave its backend's namespace.
_CLASS_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,199}")


# Names already found safe: every operation checks its class name, and a set lookup costs a
# tenth of the pattern match. Bounded, since names may come from outside (references).
_SAFE_NAMES: set[str] = set()


def check_class_name(class_name: object) -> str:
    """Return ``class_name`` if it is safe to put in a key or path, else raise."""
    if type(class_name) is str and class_name in _SAFE_NAMES:
        return class_name
    if not isinstance(class_name, str) or _CLASS_NAME.fullmatch(class_name) is None:
        shown = repr(class_name)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        raise StorageValidationError(
            f"invalid class name {shown}: use letters, digits, '_', '.' and '-' "
            "(at most 200 characters, starting with a letter or '_')"
        )
    if len(_SAFE_NAMES) < 4096:
        _SAFE_NAMES.add(class_name)
    return class_name


# Pydantic's serializer spells a UUID at a quarter of what `str` costs, and a list of them at
# a seventh each: ids become keys and references through it.
_ID = TypeAdapter(UUID).serializer
_ID_LIST = TypeAdapter(list[UUID]).serializer


def id_text(id: UUID) -> str:
    """The id's canonical text, as `str` spells it (lowercase, hyphenated)."""
    text: str = _ID.to_python(id, mode="json")
    return text


def id_texts(ids: Sequence[UUID]) -> list[str]:
    """Each id's canonical text, as `str` spells it (lowercase, hyphenated)."""
    texts: list[str] = _ID_LIST.to_python(ids if type(ids) is list else list(ids), mode="json")
    return texts


@dataclass(slots=True)
class Record:
    """One stored model: its id, class name, JSON fields and metadata.

    ``data`` is the JSON text of the model's fields, exactly as Pydantic wrote it.
    ``created_at`` and ``updated_at`` are timezone-aware datetimes.
    """

    id: UUID
    class_name: str
    data: bytes
    schema_version: int
    created_at: datetime
    updated_at: datetime
    #: Compress ``data`` with zstd when it is longer than this many bytes (on the backends
    #: that store bytes: Redis, S3, files); ``None`` never compresses.
    compress_above: int | None = None
    #: How long the record lives after this write, for backends that expire records
    #: themselves (Redis); ``None`` for the backend's own default. Others ignore it: the model
    #: layer hides expired records and purges them.
    ttl: timedelta | None = None

    def copy(self) -> Record:
        """A shallow copy (what `dataclasses.replace` makes, at a third of its cost: a copy is
        made on every read of a record kept in memory)."""
        return Record(
            self.id,
            self.class_name,
            self.data,
            self.schema_version,
            self.created_at,
            self.updated_at,
            self.compress_above,
            self.ttl,
        )

    def to_dict(self) -> dict[str, Any]:
        """The record as the JSON-ready dict a four-method backend stores."""
        try:
            data = json.loads(self.data)
        except (ValueError, RecursionError) as exc:
            raise StorageValidationError(
                f"{self.class_name} record {self.id} does not hold a JSON object: {exc}"
            ) from None
        return {
            "class_name": self.class_name,
            "schema_version": self.schema_version,
            "created_at": timestamp_text(self.created_at),
            "updated_at": timestamp_text(self.updated_at),
            "data": data,
        }


@dataclass(frozen=True, slots=True)
class RecordInfo:
    """What a listing shows of a record: no data, only its size in bytes."""

    class_name: str
    id: UUID
    size: int
    updated_at: datetime


class StoredRow(NamedTuple):
    """A record as a table holds it; each column as the driver returned it, unchecked. Any
    sequence with these five columns first (an asyncpg Record, a sqlite3 row) will do."""

    class_name: Any
    data: Any
    schema_version: Any
    created_at: Any
    updated_at: Any


class StoredInfo(NamedTuple):
    """A listing entry as a store returns it, unchecked: ``head`` is either an envelope's
    first `HEAD_BYTES` (with ``size`` the whole envelope's) or ``None`` when the store gave
    ``class_name``, ``size`` (of the JSON data) and ``updated_at`` directly."""

    id: UUID
    class_name: Any
    size: Any
    updated_at: Any
    head: bytes | None = None
    #: A table's ``schema_version`` column, checked like a read would check it.
    schema_version: Any = 1


def timestamp_text(moment: datetime) -> str:
    """Fixed-width ISO 8601 (32 characters for UTC), so it can be found by offset."""
    return moment.isoformat(timespec="microseconds")


# The edges of time as drivers return them without a zone (PostgreSQL's ``infinity`` and
# ``-infinity`` arrive as naive `datetime.max` / `datetime.min`).
_EDGES = {
    datetime.max: datetime.max.replace(tzinfo=UTC),
    datetime.min: datetime.min.replace(tzinfo=UTC),
}


def _moment(value: object, what: str) -> datetime:
    """A stored timestamp as an aware datetime; anything else raises `ValueError`."""
    if isinstance(value, str):
        if len(value) > 40:
            raise ValueError(f"{what} is not a timestamp")
        value = datetime.fromisoformat(value)
    if not isinstance(value, datetime):
        raise ValueError(f"{what} is a {type(value).__name__}, not a timestamp")
    if value.tzinfo is None:
        edge = _EDGES.get(value)
        if edge is None:
            raise ValueError(f"{what} {value.isoformat()} has no timezone")
        return edge
    return value


def _version(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value < 2**31:
        raise ValueError(f"schema_version {_short(value)} is not a positive integer")
    return value


def _short(value: object) -> str:
    shown = repr(value)
    return shown if len(shown) <= 40 else shown[:37] + "..."


def _name(value: object) -> str:
    if not isinstance(value, str) or _CLASS_NAME.fullmatch(value) is None:
        raise ValueError(f"class_name {_short(value)} is not a class name")
    return value


def _json_bytes(value: object) -> bytes:
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bytes):
        return value
    raise ValueError(f"data is a {type(value).__name__}, not JSON text")


def decode_stored(stored: object, id: UUID, class_name: str) -> Record:
    """Decode what a store returned for ``id``: an envelope (bytes), a `StoredRow`, a
    four-method backend's dict or a `Record`. Anything wrong is a `CorruptRecordError`."""
    if type(stored) is bytes:  # the common envelope, read by position (it never raises)
        record = _fixed_envelope(stored, id)
        if record is not None:
            return record
    try:
        return _decode(stored, id)
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        problem = str(exc)
    # Raised outside the handler, so the error holds no traceback of the decoding and none
    # of its buffers (a failed decompression may have held hundreds of MB).
    raise CorruptRecordError(class_name, id, problem)


def _decode(stored: object, id: UUID) -> Record:
    kind = type(stored)
    if kind is bytes:
        return _decode_envelope(stored, id)  # type: ignore[arg-type]  # not read by position
    if kind not in _ROW_TYPES:
        if isinstance(stored, bytes | bytearray | memoryview):
            raw = bytes(stored)
            return _fixed_envelope(raw, id) or _decode_envelope(raw, id)
        if isinstance(stored, Record):
            return stored.copy()  # the caller may change its copy
        if isinstance(stored, dict):
            return _from_dict(stored, id)
        if isinstance(stored, str) or not hasattr(stored, "__getitem__"):
            raise ValueError(f"the backend returned a {type(stored).__name__}")
        if len(_ROW_TYPES) < 64:
            _ROW_TYPES.add(kind)
    return _decode_row(stored, id)


# Types found to be rows (the checks above depend on the type alone), so that the next row of
# a batch goes straight to `_decode_row`.
_ROW_TYPES: set[type] = set()


def _decode_row(stored: Any, id: UUID) -> Record:
    # A row: a `StoredRow`, or any sequence whose first five columns are the same (an
    # asyncpg Record, a sqlite3 tuple), so that engines hand rows over without copying.
    try:
        name, data, version, created, updated = (
            stored[0],
            stored[1],
            stored[2],
            stored[3],
            stored[4],
        )
    except (IndexError, KeyError):
        raise ValueError(
            "a row needs class_name, data, schema_version, created_at, updated_at"
        ) from None
    # The common case, checked by type alone (the spine compares the class name with the one
    # asked for, which is checked already); anything unusual takes the long way.
    if (
        type(name) is str
        and type(data) is str
        and type(version) is int
        and 0 < version < 2**31
        and type(created) is datetime
        and created.tzinfo is not None
        and type(updated) is datetime
        and updated.tzinfo is not None
    ):
        return Record(id, name, data.encode(), version, created, updated)
    return Record(
        id,
        _name(name),
        _json_bytes(data),
        _version(version),
        _moment(created, "created_at"),
        _moment(updated, "updated_at"),
    )


def _from_dict(stored: dict[str, Any], id: UUID) -> Record:
    data = stored.get("data")
    if not isinstance(data, dict):
        raise ValueError("'data' is not a JSON object")
    return Record(
        id,
        _name(stored.get("class_name")),
        json.dumps(data, separators=(",", ":"), allow_nan=False).encode(),
        _version(stored.get("schema_version")),
        _moment(stored.get("created_at"), "created_at"),
        _moment(stored.get("updated_at"), "updated_at"),
    )


def holds_unchanged(stored: object, record: Record, updated_at: datetime) -> bool:
    """Whether ``stored`` (what a store holds under ``record``'s id) is a record of its class
    last updated at ``updated_at`` exactly: the check of a conditional write. A record that
    cannot be decoded is never taken for it."""
    if stored is None:
        return False
    try:
        found = decode_stored(stored, record.id, record.class_name)
    except CorruptRecordError:
        return False
    return found.class_name == record.class_name and found.updated_at == updated_at


def decode_info(stored: StoredInfo, class_name: str | None) -> RecordInfo:
    """Decode a listing entry; anything wrong is a `CorruptRecordError`."""
    try:
        return _decode_info(stored)
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        problem = str(exc)
    if class_name is None:  # the class its key names, when that is a class name
        with contextlib.suppress(ValueError):
            class_name = _name(stored.class_name)
    raise CorruptRecordError(class_name or "", stored.id, problem)


def _decode_info(stored: StoredInfo) -> RecordInfo:
    if stored.head is not None:
        info = _envelope_info(stored.head, stored.id, stored.size)
        # Listed under the class its key names, when the key names one: that is the class
        # that reads and deletes it.
        name = info.class_name if stored.class_name is None else _name(stored.class_name)
        return RecordInfo(name, stored.id, info.size, info.updated_at)
    size = stored.size
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError(f"size {_short(size)} is not a byte count")
    _version(stored.schema_version)
    return RecordInfo(
        _name(stored.class_name), stored.id, size, _moment(stored.updated_at, "updated_at")
    )


# --- the envelope --------------------------------------------------------------------------

# How byte-oriented backends (Redis, S3, files) store a record. The metadata comes first, in a
# fixed order and width, and the model's JSON last, so that reading a record slices the
# model's bytes out instead of parsing and re-encoding them, and Redis can keep `created_at`
# atomically by overwriting a fixed byte range.
_ENVELOPE_START = b'{"created_at":"'
_DATA_MARKER = b',"data":'
CREATED_AT_OFFSET = len(_ENVELOPE_START)
#: The envelope's metadata header always fits in this many leading bytes.
HEAD_BYTES = 512
CREATED_AT_WIDTH = 32

_CODEC_MARKER = b',"codec":"zstd","size":'

#: The largest record a compressed envelope may expand to; a header claiming more, or a frame
#: that expands past what its header claims, is refused before or while decompressing.
MAX_DECOMPRESSED_SIZE = 256 * 1024 * 1024


def encode_envelope(record: Record) -> bytes:
    """Encode a record as one JSON object holding its metadata and the model's fields.

    When ``record.compress_above`` is set and the data is longer, the data is compressed
    with zstd instead: the same header, then ``"codec":"zstd","size":N}``, a newline and the
    frame. The header keeps its layout, so readers (and Redis's atomic ``created_at``) see
    the metadata the same way.
    """
    header = b"".join(
        (
            _ENVELOPE_START,
            _timestamp_bytes(record.created_at),
            b'","updated_at":"',
            _timestamp_bytes(record.updated_at),
            _header_end(record.schema_version, record.class_name),
        )
    )
    frame = compress(record.data, record.compress_above)
    if frame is not None:
        return b"".join((header, _CODEC_MARKER, str(len(record.data)).encode(), b"}\n", frame))
    return b"".join((header, _DATA_MARKER, record.data, b"}"))


# The last two moments encoded, with their text: the records of a batch share one updated_at
# (and often one created_at), so each is formatted once per batch, not once per record.
# Replaced whole (never mutated), so threads sharing it see consistent pairs.
_recent: tuple[tuple[datetime, bytes], ...] = ()


def _timestamp_bytes(moment: datetime) -> bytes:
    global _recent
    for seen, text in _recent:
        if seen is moment:
            return text
    text = timestamp_text(moment).encode()
    _recent = ((moment, text), *_recent[:1])
    return text


@lru_cache(maxsize=1024)
def _header_end(schema_version: int, class_name: str) -> bytes:
    return b'","schema_version":%d,"class_name":"%s"' % (schema_version, class_name.encode())


# --- the compression codec ------------------------------------------------------------------
#
# One codec for every compressed form: the envelope's frame (`encode_envelope`) and the sealed
# payload's (`pydantic_toast._crypto` compresses before it encrypts). Both store the size of
# the data next to the frame, which bounds the decompression.


def compress(data: bytes, above: int | None) -> bytes | None:
    """The zstd frame of ``data`` when it is longer than ``above`` bytes; ``None`` (store it
    as it is) when it is not, or when ``above`` is ``None``."""
    if above is None or len(data) <= above:
        return None
    frame: bytes = require_zstd().ZstdCompressor(level=3).compress(data)
    return frame


def require_zstd() -> Any:
    """The zstandard module, or a clear error saying which extra installs it."""
    try:
        import zstandard
    except ImportError as exc:
        raise StorageValidationError(
            "zstd compression needs the zstandard package: pip install 'pydantic-toast[zstd]'"
        ) from exc
    return zstandard


_CLASS_NAME_KEY = b',"class_name":"'


def _layout(raw: bytes) -> tuple[int, bool]:
    """Where the header ends (the index just past the class name's closing quote) and whether
    a compressed frame follows. Decided by position: the model's own JSON may well contain
    ``"codec":"zstd"``, but it comes after the header, which holds no quote-bearing value."""
    if not raw.startswith(_ENVELOPE_START):
        raise ValueError("not a pydantic-toast envelope")
    start = raw.find(_CLASS_NAME_KEY, 0, HEAD_BYTES)
    end = raw.find(b'"', start + len(_CLASS_NAME_KEY), HEAD_BYTES) + 1 if start >= 0 else 0
    if end <= 0:
        raise ValueError("no envelope header")
    if raw.startswith(_DATA_MARKER, end):
        return end, False
    if raw.startswith(_CODEC_MARKER, end):
        return end, True
    raise ValueError("the envelope header is followed by neither data nor a codec")


def _compressed_header(raw: bytes, end: int) -> tuple[dict[str, Any], int]:
    """A compressed envelope's header (it closes right after the codec and size) and where
    its zstd frame starts."""
    close = raw.find(b"}\n", end, end + 64)
    if close < 0:
        raise ValueError("compressed envelope without a header end")
    header = json.loads(raw[: close + 1])
    if not isinstance(header, dict):
        raise ValueError("the envelope header is not an object")
    return header, close + 2


def _expect(stored: dict[str, Any], key: str, kind: type) -> Any:
    value = stored.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{key!r} must be {kind.__name__}")
    return value


def _envelope_info(head: bytes, id: UUID, size: int) -> RecordInfo:
    end, compressed = _layout(head)
    if compressed:
        header, _ = _compressed_header(head, end)
        data_size = _expect(header, "size", int)
    else:
        header = json.loads(head[:end] + b"}")
        data_size = size - end - len(_DATA_MARKER) - 1
    return RecordInfo(
        _name(header.get("class_name")),
        id,
        data_size,
        _moment(header.get("updated_at"), "updated_at"),
    )


def decode_envelope(raw: bytes, id: UUID, class_name: str) -> Record:
    """Decode what `encode_envelope` wrote; anything else is a `CorruptRecordError`."""
    return decode_stored(raw, id, class_name)


def _decode_envelope(raw: bytes, id: UUID) -> Record:
    """Only the small metadata header is parsed here; the model's JSON is validated later by
    the model itself. A compressed record is expanded only up to the size its header
    declares, and never past `MAX_DECOMPRESSED_SIZE`. (`_fixed_envelope` reads the common
    uncompressed envelope before this is asked.)"""
    end, compressed = _layout(raw)
    if compressed:
        header, frame = _compressed_header(raw, end)
        data = decompress(raw[frame:], _expect(header, "size", int))
    else:
        if not raw.endswith(b"}"):
            raise ValueError("not a pydantic-toast envelope")
        data = raw[end + len(_DATA_MARKER) : -1]
        header = json.loads(raw[:end] + b"}")
    return Record(
        id=id,
        class_name=_name(header.get("class_name")),
        data=data,
        schema_version=_version(header.get("schema_version")),
        created_at=_moment(header.get("created_at"), "created_at"),
        updated_at=_moment(header.get("updated_at"), "updated_at"),
    )


_UPDATED_KEY = b'","updated_at":"'
_VERSION_KEY = b'","schema_version":'
_UPDATED_AT_AT = CREATED_AT_OFFSET + CREATED_AT_WIDTH + len(_UPDATED_KEY)
#: Where an envelope's ``updated_at`` starts (its ``created_at`` in the fixed UTC width).
UPDATED_AT_OFFSET = _UPDATED_AT_AT
_VERSION_AT = _UPDATED_AT_AT + CREATED_AT_WIDTH + len(_VERSION_KEY)
_CREATED_END = _UPDATED_AT_AT - len(_UPDATED_KEY)
_UPDATED_END = _VERSION_AT - len(_VERSION_KEY)
_NAME_CHARACTERS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")

# Class names, timestamps and whole headers already read from envelopes, by their bytes: the
# records of a batch repeat them (a batch save gives its records one timestamp), and a lookup
# costs a fraction of a check or a parse. They hold only what the checks accepted; bounded,
# cleared when full.
_read_names: dict[bytes, str] = {}
_read_moments: dict[bytes, datetime] = {}
_read_headers: dict[bytes, tuple[str, int, datetime, datetime]] = {}
# Where the data marker of a fixed envelope can be at the latest: after a version of up to
# 10 digits and a class name of up to 200 characters.
_MARKER_BY = _VERSION_AT + 10 + len(_CLASS_NAME_KEY) + 200 + 1 + len(_DATA_MARKER)


def _fixed_envelope(raw: bytes, id: UUID) -> Record | None:
    """Read the uncompressed envelope `encode_envelope` writes by position, without a JSON
    parser (the common case); ``None`` sends anything unusual to the general path.

    The header is everything before the first data marker: a class name holds no quote, so
    that is where a well-formed one ends, and the same header bytes always read the same."""
    end = raw.find(_DATA_MARKER, _VERSION_AT, _MARKER_BY)
    if end < 0 or not raw.endswith(b"}"):
        return None
    header = raw[:end]
    known = _read_headers.get(header)
    if known is None:
        known = _read_header(header)
        if known is None:
            return None
        if len(_read_headers) >= 1024:
            _read_headers.clear()
        _read_headers[header] = known
    name, version, created, updated = known
    return Record(id, name, raw[end + len(_DATA_MARKER) : -1], version, created, updated)


def _read_header(header: bytes) -> tuple[str, int, datetime, datetime] | None:
    """The class name, schema version and timestamps of a fixed envelope's header."""
    end = len(header) - 1  # the quote that closes the class name
    if not (
        header.startswith(_ENVELOPE_START)
        and header.startswith(_UPDATED_KEY, _CREATED_END)
        and header.startswith(_VERSION_KEY, _UPDATED_END)
        and header.endswith(b'"')
    ):
        return None
    comma = header.find(b",", _VERSION_AT, _VERSION_AT + 11)
    digits = header[_VERSION_AT:comma]
    if comma < 0 or not digits.isdigit() or digits[0] == 48:  # no sign, space or leading 0
        return None
    version = int(digits)
    start = comma + len(_CLASS_NAME_KEY)
    if version >= 2**31 or not header.startswith(_CLASS_NAME_KEY, comma) or end - start > 200:
        return None
    name = _read_name(header[start:end])
    created = _read_moment(header[CREATED_AT_OFFSET:_CREATED_END])
    updated = _read_moment(header[_UPDATED_AT_AT:_UPDATED_END])
    if name is None or created is None or updated is None:
        return None
    return name, version, created, updated


def _read_name(text: bytes) -> str | None:
    name = _read_names.get(text)
    if name is None:
        if not text or text[0] in b"0123456789.-" or not _NAME_CHARACTERS.issuperset(text):
            return None
        if len(_read_names) >= 1024:
            _read_names.clear()
        name = _read_names[text] = text.decode()
    return name


def _read_moment(text: bytes) -> datetime | None:
    moment = _read_moments.get(text)
    if moment is None:
        try:
            moment = datetime.fromisoformat(text.decode())
        except ValueError:
            return None
        if moment.tzinfo is None:
            return None
        if len(_read_moments) >= 1024:
            _read_moments.clear()
        _read_moments[text] = moment
    return moment


def decompress(frame: bytes, size: int) -> bytes:
    """The data of a frame `compress` made, which the writer declared to be ``size`` bytes:
    never expanded past that, nor past `MAX_DECOMPRESSED_SIZE`. Anything else (a size out of
    bounds, a frame that does not decompress or holds another size) is a `ValueError`."""
    if not 0 <= size <= MAX_DECOMPRESSED_SIZE:
        raise ValueError(f"declared size {size} is beyond the {MAX_DECOMPRESSED_SIZE} byte limit")
    zstandard = require_zstd()
    try:
        # The frame's own content size is the writer's word too: never allocate by it. Read
        # at most one byte more than declared, so a larger frame is caught, not expanded.
        with zstandard.ZstdDecompressor().stream_reader(frame) as reader:
            data: bytes = reader.read(size + 1)
    except zstandard.ZstdError as exc:
        raise ValueError(f"zstd frame does not decompress: {exc}") from None
    if len(data) != size:
        found = len(data)
        # The buffer may be hundreds of MB: let it go before the error (whose traceback
        # keeps this frame, and its locals, alive for as long as anyone holds the error).
        del data
        raise ValueError(f"zstd frame holds {found} bytes or more, not the declared {size}")
    return data
