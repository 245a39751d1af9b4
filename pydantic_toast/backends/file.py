"""``file:///directory``: one JSON file per record, ``{directory}/{ClassName}/{uuid}.json``.

Each file holds the record envelope (metadata, then the model's fields). A write goes to a
temporary file in the same directory, is flushed to disk, then renamed over the old file, so a
reader sees the old record or the new one, never a torn one; a first save links the temporary
file into place instead, which fails when a record is there already (then the spine keeps its
``created_at``). File operations run inline on the event loop's thread, like SQLite's: for
records of ordinary size that is cheaper than a hop to a worker thread.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from uuid import UUID, uuid4

from pydantic_toast._errors import StorageOperationError, StorageValidationError
from pydantic_toast.backends.base import Capabilities, StorageBackend
from pydantic_toast.backends.options import BackendOptions
from pydantic_toast.backends.records import HEAD_BYTES, Record, StoredInfo, encode_envelope

__all__ = ["FileBackend"]


class FileOptions(BackendOptions):
    label = "file"

    #: Flush every write to disk; false trades durability across a power loss for speed.
    fsync: bool = True


class FileBackend(StorageBackend):
    """Options (URL query or keyword): ``fsync`` (default ``true``; ``false`` trades
    durability across a power loss for speed)."""

    options_model = FileOptions
    options: FileOptions
    capabilities = Capabilities(
        delete=True,
        scan=True,
        put_if_absent=True,
        coalesce_loads=False,  # in-process: a batch would not wait on anything less
        batch_size=1 << 30,
        concurrency=1,
    )

    def __init__(self, url: str, **options: object) -> None:
        super().__init__(url, **options)
        location = self.location
        if location.netloc not in ("", "localhost"):
            raise StorageValidationError("file URLs name a local directory: file:///absolute/path")
        path = location.unquoted_path
        if not path:
            raise StorageValidationError("file URLs need a directory: file:///tmp/models")
        self.directory = Path(path)
        self.fsync = self.options.fsync

    @property
    def where(self) -> str:
        return f"directory {self.directory}"

    async def connect(self) -> None:
        if self.create_missing:
            self.directory.mkdir(parents=True, exist_ok=True)
        elif not self.directory.is_dir():
            raise StorageOperationError(f"{self.where} does not exist", self.url)

    async def disconnect(self) -> None:
        """Nothing stays open between operations."""

    def _path(self, class_name: str, id: UUID) -> Path:
        # The spine checked the class name and the id is a UUID: the path stays inside.
        return self.directory / class_name / f"{id}.json"

    async def put_many(self, records: Sequence[Record]) -> None:
        for record in records:
            self._write(record, only_new=False)

    async def put_new(self, records: Sequence[Record]) -> list[bool]:
        return [self._write(record, only_new=True) for record in records]

    def _write(self, record: Record, *, only_new: bool) -> bool:
        path = self._path(record.class_name, record.id)
        temporary = path.with_name(f".{path.name}.{uuid4().hex}.tmp")
        try:
            path.parent.mkdir(exist_ok=True)
            with open(temporary, "wb") as file:
                file.write(encode_envelope(record))
                if self.fsync:
                    file.flush()
                    os.fsync(file.fileno())
            if only_new:
                try:
                    os.link(temporary, path)  # atomic, and fails if the record exists
                except FileExistsError:
                    return False
            else:
                os.replace(temporary, path)
            if self.fsync:  # the rename itself must reach the disk too
                directory = os.open(path.parent, os.O_RDONLY)
                try:
                    os.fsync(directory)
                finally:
                    os.close(directory)
        finally:
            temporary.unlink(missing_ok=True)
        return True

    async def get_many(self, class_name: str, ids: Sequence[UUID]) -> list[bytes | None]:
        found: list[bytes | None] = []
        for id in ids:
            try:
                found.append(self._path(class_name, id).read_bytes())
            except FileNotFoundError:
                found.append(None)
        return found

    async def delete_many(self, class_name: str, ids: Sequence[UUID]) -> int:
        deleted = 0
        for id in ids:
            try:
                self._path(class_name, id).unlink()
                deleted += 1
            except FileNotFoundError:
                pass
        return deleted

    async def scan(self, class_name: str | None) -> AsyncIterator[StoredInfo]:
        if class_name is None:
            directories = sorted(p for p in self.directory.iterdir() if p.is_dir())
        else:
            directories = [self.directory / class_name]
        for directory in directories:
            for path in sorted(directory.glob("*.json")):
                try:
                    id = UUID(path.stem)
                    if str(id) != path.stem:
                        continue  # not a name this backend writes
                    with open(path, "rb") as file:  # noqa: ASYNC230 - inline, see module doc
                        head = file.read(HEAD_BYTES)
                    size = path.stat().st_size
                except (ValueError, FileNotFoundError):
                    continue  # not a record, or deleted while listing
                yield StoredInfo(id, directory.name, size, None, head)
