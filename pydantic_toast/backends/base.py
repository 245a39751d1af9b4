"""The backend contract: `StorageBackend`, the `Record` it moves, and the envelope codec.

Backends know nothing of models. They move *records*: an id, a class name, the model's fields
as JSON bytes (produced once by Pydantic's serializer) and the record's metadata.

A custom backend implements four methods on plain dicts (`connect`, `disconnect`, `save`,
`load`); every other operation has a default built from those. Built-in backends override the
record methods (`write_record`, `read_record` and their batch forms) so that the JSON bytes
reach the driver untouched: no dict round trip, no second encoding.
"""

from __future__ import annotations

import asyncio
import json
import re
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any, ClassVar, TypeVar
from uuid import UUID

from pydantic_toast.errors import (
    ExternalStorageError,
    StorageConnectionError,
    StorageValidationError,
    mask_url,
)

__all__ = [
    "MAX_DECOMPRESSED_SIZE",
    "Record",
    "RecordInfo",
    "StorageBackend",
    "check_class_name",
    "decode_envelope",
    "decode_envelope_info",
    "encode_envelope",
]

A = TypeVar("A")
T = TypeVar("T")

# Class names become parts of keys, object names and file paths: letters, digits, "_", "." and
# "-" only, starting with a letter or "_". That excludes "/", "..", ":", "*", spaces and
# control characters, so no name can leave its backend's namespace.
_CLASS_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,199}")

# How many single operations a default batch runs at once.
DEFAULT_BATCH_CONCURRENCY = 16


def check_class_name(class_name: object) -> str:
    """Return ``class_name`` if it is safe to put in a key or path, else raise."""
    if not isinstance(class_name, str) or _CLASS_NAME.fullmatch(class_name) is None:
        shown = repr(class_name)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        raise StorageValidationError(
            f"invalid class name {shown}: use letters, digits, '_', '.' and '-' "
            "(at most 200 characters, starting with a letter or '_')"
        )
    return class_name


@dataclass(slots=True)
class Record:
    """One stored model: its id, class name, JSON fields and metadata.

    ``data`` is the JSON text of the model's fields, exactly as Pydantic wrote it.
    ``created_at`` and ``updated_at`` are timezone-aware UTC datetimes.
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

    def to_dict(self) -> dict[str, Any]:
        """The record as the JSON-ready dict a four-method backend stores."""
        try:
            data = json.loads(self.data)
        except (ValueError, RecursionError) as exc:
            raise StorageValidationError(
                f"{self.class_name} record {self.id} does not hold a JSON object: {exc}"
            ) from exc
        return {
            "class_name": self.class_name,
            "schema_version": self.schema_version,
            "created_at": _timestamp(self.created_at),
            "updated_at": _timestamp(self.updated_at),
            "data": data,
        }

    @classmethod
    def from_dict(cls, id: UUID, class_name: str, stored: object) -> Record:
        """Rebuild a record from what a four-method backend's `load` returned."""
        try:
            if not isinstance(stored, dict):
                raise TypeError(f"expected a dict, got {type(stored).__name__}")
            return cls(
                id=id,
                class_name=_expect(stored, "class_name", str),
                data=json.dumps(_expect(stored, "data", dict), separators=(",", ":")).encode(),
                schema_version=_expect(stored, "schema_version", int),
                created_at=_parse_timestamp(_expect(stored, "created_at", str)),
                updated_at=_parse_timestamp(_expect(stored, "updated_at", str)),
            )
        except (TypeError, ValueError) as exc:
            raise StorageValidationError(
                f"stored {class_name} record {id} is not a pydantic-toast record: {exc}"
            ) from exc


def _expect(stored: dict[str, Any], key: str, kind: type[T]) -> T:
    value = stored.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"{key!r} must be {kind.__name__}")
    return value


def _timestamp(moment: datetime) -> str:
    """Fixed-width ISO 8601 (32 characters for UTC), so it can be found by offset."""
    return moment.isoformat(timespec="microseconds")


def _parse_timestamp(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"timestamp {text!r} has no timezone")
    return moment


@dataclass(frozen=True, slots=True)
class RecordInfo:
    """What a listing shows of a record: no data, only its size in bytes."""

    class_name: str
    id: UUID
    size: int
    updated_at: datetime


# The envelope: how byte-oriented backends (Redis, S3, files) store a record. The metadata
# comes first, in a fixed order and width, and the model's JSON last, so that reading a record
# slices the model's bytes out instead of parsing and re-encoding them, and Redis can keep
# `created_at` atomically by overwriting a fixed byte range.
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
            _timestamp(record.created_at).encode(),
            b'","updated_at":"',
            _timestamp(record.updated_at).encode(),
            b'","schema_version":',
            str(record.schema_version).encode(),
            b',"class_name":"',
            record.class_name.encode(),
            b'"',
        )
    )
    limit = record.compress_above
    if limit is not None and len(record.data) > limit:
        frame = require_zstd().ZstdCompressor(level=3).compress(record.data)
        return b"".join((header, _CODEC_MARKER, str(len(record.data)).encode(), b"}\n", frame))
    return b"".join((header, _DATA_MARKER, record.data, b"}"))


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


def decode_envelope_info(head: bytes, id: UUID, size: int) -> RecordInfo:
    """The listing view of an envelope of ``size`` bytes, from its first `HEAD_BYTES`."""
    try:
        end, compressed = _layout(head)
        if compressed:
            header, _ = _compressed_header(head, end)
            data_size = _expect(header, "size", int)
        else:
            header = json.loads(head[:end] + b"}")
            data_size = size - end - len(_DATA_MARKER) - 1
        return RecordInfo(
            _expect(header, "class_name", str),
            id,
            data_size,
            _parse_timestamp(_expect(header, "updated_at", str)),
        )
    except (TypeError, ValueError) as exc:
        raise StorageValidationError(f"stored record {id} is corrupt: {exc}") from exc


def decode_envelope(raw: bytes, id: UUID, class_name: str) -> Record:
    """Decode what `encode_envelope` wrote; anything else is a `StorageValidationError`.

    Only the small metadata header is parsed here; the model's JSON is validated later by the
    model itself, so a corrupt payload still ends as a clear error naming class and id.
    A compressed record is expanded only up to the size its header declares, and never past
    `MAX_DECOMPRESSED_SIZE`.
    """
    try:
        end, compressed = _layout(raw)
        if compressed:
            header, frame = _compressed_header(raw, end)
            data = _decompress(raw[frame:], _expect(header, "size", int))
        else:
            if not raw.endswith(b"}"):
                raise ValueError("not a pydantic-toast envelope")
            data = raw[end + len(_DATA_MARKER) : -1]
            fast = _fixed_header(raw, end)
            if fast is not None:
                return Record(id, fast[0], data, fast[1], fast[2], fast[3])
            header = json.loads(raw[:end] + b"}")
        return Record(
            id=id,
            class_name=_expect(header, "class_name", str),
            data=data,
            schema_version=_expect(header, "schema_version", int),
            created_at=_parse_timestamp(_expect(header, "created_at", str)),
            updated_at=_parse_timestamp(_expect(header, "updated_at", str)),
        )
    except (TypeError, ValueError) as exc:
        raise StorageValidationError(f"stored {class_name} record {id} is corrupt: {exc}") from exc


_UPDATED_AT_AT = CREATED_AT_OFFSET + CREATED_AT_WIDTH + len(b'","updated_at":"')
_VERSION_AT = _UPDATED_AT_AT + CREATED_AT_WIDTH + len(b'","schema_version":')
_FIXED_HEADER = re.compile(rb'(\d{1,9}),"class_name":"([A-Za-z_][A-Za-z0-9_.\-]{0,199})"')


def _fixed_header(raw: bytes, marker: int) -> tuple[str, int, datetime, datetime] | None:
    """Read the header `encode_envelope` writes by position, without a JSON parser (the
    common case); ``None`` sends anything unusual to the general path."""
    if raw[_UPDATED_AT_AT - 16 : _UPDATED_AT_AT] != b'","updated_at":"':
        return None
    match = _FIXED_HEADER.fullmatch(raw, _VERSION_AT, marker)
    if match is None or raw[_VERSION_AT - 19 : _VERSION_AT] != b'","schema_version":':
        return None
    try:
        created = _parse_timestamp(raw[CREATED_AT_OFFSET : _UPDATED_AT_AT - 16].decode())
        updated = _parse_timestamp(raw[_UPDATED_AT_AT : _VERSION_AT - 19].decode())
    except ValueError:
        return None
    return match[2].decode(), int(match[1]), created, updated


def _decompress(frame: bytes, size: int) -> bytes:
    if not 0 <= size <= MAX_DECOMPRESSED_SIZE:
        raise ValueError(f"declared size {size} is beyond the {MAX_DECOMPRESSED_SIZE} byte limit")
    zstandard = require_zstd()
    try:
        # The frame's own content size is the writer's word too: never allocate by it. Read
        # at most one byte more than declared, so a larger frame is caught, not expanded.
        with zstandard.ZstdDecompressor().stream_reader(frame) as reader:
            data: bytes = reader.read(size + 1)
    except zstandard.ZstdError as exc:
        raise ValueError(f"zstd frame does not decompress: {exc}") from exc
    if len(data) != size:
        raise ValueError(f"zstd frame holds {len(data)} bytes, not the declared {size}")
    return data


class StorageBackend(ABC):
    """Base class of storage backends, built-in and custom.

    A custom backend subclasses this and implements `connect`, `disconnect`, `save` and
    `load`; it receives the storage URL in its constructor (``self.url``, also ``self._url``).
    ``save`` gets a JSON-ready dict (the record: metadata plus the model's fields under
    ``"data"``) and ``load`` returns that dict, or ``None`` when there is no record.
    The constructor must not do I/O: the library builds one when a model class is defined,
    to check its URL early; `connect` opens connections, once per backend.
    """

    #: How many records the default batch operations handle at once.
    batch_concurrency: ClassVar[int] = DEFAULT_BATCH_CONCURRENCY

    #: Whether concurrent single loads should be gathered into batches. Worth it when a read
    #: waits on the network; a backend that works in-process (memory, SQLite, files) says
    #: no, and each load then goes straight to `read_record`.
    coalesce_loads: ClassVar[bool] = True

    def __init__(self, url: str) -> None:
        self.url = url
        self._url = url
        cls = type(self)
        for dict_level, record_level in (("save", "write_record"), ("load", "read_record")):
            if getattr(cls, dict_level) is getattr(StorageBackend, dict_level) and getattr(
                cls, record_level
            ) is getattr(StorageBackend, record_level):
                raise TypeError(f"{cls.__name__} must implement {dict_level}()")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({mask_url(self.url)!r})"

    @abstractmethod
    async def connect(self) -> None:
        """Open connections or pools. Called once, before the first operation."""

    @abstractmethod
    async def disconnect(self) -> None:
        """Close what `connect` opened."""

    async def save(self, id: UUID, class_name: str, data: dict[str, Any]) -> None:
        """Store ``data`` for ``id``, replacing any record stored for it."""
        await self.write_record(Record.from_dict(id, class_name, data))

    async def load(self, id: UUID, class_name: str) -> dict[str, Any] | None:
        """Return what `save` stored for ``id``, or ``None``."""
        record = await self.read_record(class_name, id)
        return None if record is None else record.to_dict()

    # Record operations. The defaults are built from `save` and `load`; built-in backends
    # override them to hand the driver the JSON bytes directly (and `save` and `load` then
    # come from them). A backend must implement one of the two pairs.

    async def write_record(self, record: Record) -> None:
        """Store a record, keeping the stored ``created_at`` when one exists."""
        # A custom backend may build a path or key from the class name: check it first.
        check_class_name(record.class_name)
        await self._guard(
            self.save(record.id, record.class_name, record.to_dict()), "save", record.class_name
        )

    async def read_record(self, class_name: str, id: UUID) -> Record | None:
        """Return the record stored for ``id``, or ``None``."""
        check_class_name(class_name)
        stored = await self._guard(self.load(id, class_name), "load", class_name)
        return None if stored is None else Record.from_dict(id, class_name, stored)

    async def write_records(self, records: Sequence[Record]) -> None:
        """Store many records. The default runs `write_record` with bounded concurrency."""
        await self._bounded(self.write_record, records)

    async def read_records(self, class_name: str, ids: Sequence[UUID]) -> list[Record | None]:
        """Return the record for each id, in order, ``None`` where there is none."""
        return await self._bounded(partial(self.read_record, class_name), ids)

    async def delete(self, id: UUID, class_name: str) -> bool:
        """Delete the record for ``id``; return whether there was one.

        Optional for custom backends: the four required methods cannot express deletion, so
        unless the backend deletes in batches (`delete_records`), this says it cannot.
        """
        if type(self).delete_records is not StorageBackend.delete_records:
            return await self.delete_records(class_name, [id]) > 0
        raise NotImplementedError(f"{type(self).__name__} does not support deleting records")

    async def delete_records(self, class_name: str, ids: Sequence[UUID]) -> int:
        """Delete the records of ``ids``; return how many existed. Missing ids are no error."""
        check_class_name(class_name)
        deleted = await self._bounded(
            lambda id: self._guard(self.delete(id, class_name), "delete", class_name), ids
        )
        return sum(deleted)

    def scan_records(self, class_name: str | None = None) -> AsyncIterator[RecordInfo]:
        """Every record of ``class_name`` (or of every class), without its data, in no
        particular order. Used by listings and `purge`; optional for custom backends."""
        raise NotImplementedError(f"{type(self).__name__} does not support listing records")

    async def purge(self, class_name: str, before: datetime, *, batch_size: int = 500) -> int:
        """Delete ``class_name``'s records last updated before ``before``, ``batch_size`` at a
        time; return how many were deleted. The default scans, then deletes in batches."""
        deleted = 0
        doomed: list[UUID] = []
        async for info in self.scan_records(class_name):
            if info.updated_at < before:
                doomed.append(info.id)
                if len(doomed) >= batch_size:
                    deleted += await self.delete_records(class_name, doomed)
                    doomed = []
        if doomed:
            deleted += await self.delete_records(class_name, doomed)
        return deleted

    async def _bounded(self, operation: Callable[[A], Awaitable[T]], items: Sequence[A]) -> list[T]:
        """Run ``operation`` on every item, at most `batch_concurrency` at a time, in order."""
        if len(items) == 1:
            return [await operation(items[0])]
        gate = asyncio.Semaphore(self.batch_concurrency)

        async def run(item: A) -> T:
            async with gate:
                return await operation(item)

        return list(await asyncio.gather(*(run(item) for item in items)))

    async def _guard(self, operation: Awaitable[T], verb: str, class_name: str) -> T:
        """Await a custom backend's call, turning a foreign exception into ours."""
        try:
            return await operation
        except (ExternalStorageError, NotImplementedError):
            raise
        except Exception as exc:
            raise StorageConnectionError(
                f"{type(self).__name__}.{verb} failed for {class_name}: "
                f"{type(exc).__name__}: {exc}",
                self.url,
            ) from exc
