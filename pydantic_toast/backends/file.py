"""``file:///directory``: one JSON file per record, ``{directory}/{ClassName}/{uuid}.json``.

Each file holds the record envelope (metadata, then the model's fields). A write goes to a
temporary file in the same directory, is flushed to disk, then renamed over the old file, so a
reader sees the old record or the new one, never a torn one. File operations run inline on
the event loop's thread, like SQLite's: for records of ordinary size that is cheaper than a
hop to a worker thread.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit
from uuid import UUID, uuid4

from pydantic_toast.backends.base import (
    Record,
    RecordInfo,
    StorageBackend,
    check_class_name,
    decode_envelope,
    decode_envelope_info,
    encode_envelope,
)
from pydantic_toast.errors import StorageConnectionError, StorageValidationError

__all__ = ["FileBackend"]


class FileBackend(StorageBackend):
    """Options (URL query): ``fsync`` (default ``true``; ``false`` trades durability across a
    power loss for speed)."""

    coalesce_loads = False  # in-process: a batch would not wait on anything less

    def __init__(self, url: str) -> None:
        super().__init__(url)
        parts = urlsplit(url)
        options = dict(parse_qsl(parts.query, keep_blank_values=True))
        unknown = set(options) - {"fsync"}
        if unknown:
            raise StorageValidationError(f"unknown file option(s): {', '.join(sorted(unknown))}")
        if parts.netloc not in ("", "localhost"):
            raise StorageValidationError("file URLs name a local directory: file:///absolute/path")
        path = unquote(parts.path)
        if not path:
            raise StorageValidationError("file URLs need a directory: file:///tmp/models")
        self.directory = Path(path)
        self.fsync = options.get("fsync", "true").lower() not in ("false", "0", "no")

    async def connect(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageConnectionError(
                f"cannot create directory {self.directory}: {exc}", self.url
            ) from exc

    async def disconnect(self) -> None:
        """Nothing stays open between operations."""

    def _path(self, class_name: str, id: UUID) -> Path:
        # The class name is checked and the id is a UUID, so the path stays in the directory.
        return self.directory / check_class_name(class_name) / f"{id}.json"

    async def write_record(self, record: Record) -> None:
        path = self._path(record.class_name, record.id)
        temporary = path.with_name(f".{path.name}.{uuid4().hex}.tmp")
        try:
            path.parent.mkdir(exist_ok=True)
            with open(temporary, "wb") as file:  # noqa: ASYNC230 - inline by design, see module doc
                file.write(encode_envelope(record))
                if self.fsync:
                    file.flush()
                    os.fsync(file.fileno())
            os.replace(temporary, path)
            if self.fsync:  # the rename itself must reach the disk too
                directory = os.open(path.parent, os.O_RDONLY)
                try:
                    os.fsync(directory)
                finally:
                    os.close(directory)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            raise StorageConnectionError(
                f"cannot write {record.class_name} record {record.id}: {exc}", self.url
            ) from exc

    async def read_record(self, class_name: str, id: UUID) -> Record | None:
        path = self._path(class_name, id)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageConnectionError(
                f"cannot read {class_name} record {id}: {exc}", self.url
            ) from exc
        return decode_envelope(raw, id, class_name)

    async def delete_records(self, class_name: str, ids: Sequence[UUID]) -> int:
        deleted = 0
        for id in ids:
            try:
                self._path(class_name, id).unlink()
                deleted += 1
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise StorageConnectionError(
                    f"cannot delete {class_name} record {id}: {exc}", self.url
                ) from exc
        return deleted

    async def scan_records(self, class_name: str | None = None) -> AsyncIterator[RecordInfo]:
        if class_name is None:
            directories = sorted(p for p in self.directory.iterdir() if p.is_dir())
        else:
            directories = [self.directory / check_class_name(class_name)]
        for directory in directories:
            for path in sorted(directory.glob("*.json")):
                try:
                    id = UUID(path.stem)
                    with open(path, "rb") as file:  # noqa: ASYNC230 - inline by design
                        head = file.read(512)
                    size = path.stat().st_size
                except (ValueError, FileNotFoundError):
                    continue  # not a record, or deleted while listing
                yield decode_envelope_info(head, id, size)

    async def write_records(self, records: Sequence[Record]) -> None:
        for record in records:
            await self.write_record(record)

    async def read_records(self, class_name: str, ids: Sequence[UUID]) -> list[Record | None]:
        return [await self.read_record(class_name, id) for id in ids]
