"""``file:///directory``: one JSON file per record, ``{directory}/{ClassName}/{uuid}.json``.

Each file holds the record envelope (metadata, then the model's fields). A write goes to a
temporary file in the same directory, is flushed to disk, then renamed over the old file, so a
reader sees the old record or the new one, never a torn one; a first save links the temporary
file into place instead, which fails when a record is there already (then the spine keeps its
``created_at``). File operations run inline on the event loop's thread, like SQLite's: for
records of ordinary size that is cheaper than a hop to a worker thread.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from pathlib import Path
from uuid import UUID, uuid4

from pydantic_toast._errors import (
    CorruptRecordError,
    StorageOperationError,
    StorageValidationError,
)
from pydantic_toast.backends.base import Capabilities, StorageBackend
from pydantic_toast.backends.options import BackendOptions
from pydantic_toast.backends.records import (
    HEAD_BYTES,
    Record,
    StoredInfo,
    decode_stored,
    encode_envelope,
    holds_unchanged,
)

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
        conditional_delete=True,
        conditional_write=True,
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
        self._root = str(self.directory)
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

    def _path(self, class_name: str, id: UUID) -> str:
        # The spine checked the class name and the id is a UUID: the path stays inside.
        # Strings, not `Path`s, for every name made of an id: Python 3.12's pathlib interns
        # each name it parses for good, and a process writes ever new ids.
        return os.path.join(self._root, class_name, f"{id}.json")

    async def put_many(self, records: Sequence[Record]) -> None:
        for record in records:
            self._write(record, only_new=False)

    async def put_new(self, records: Sequence[Record]) -> list[bool]:
        return [self._write(record, only_new=True) for record in records]

    async def put_unchanged(
        self, records: Sequence[Record], expected: Sequence[datetime]
    ) -> list[bool]:
        """As `delete_stale`: a record that looks unchanged is renamed aside (atomic: a save
        after that finds no file and writes a new one) and read again. Still unchanged, the
        new record is linked into place, which fails, leaving the newer record, if a save
        wrote one meanwhile; changed just before the rename, or the new record not written (a
        full disk), the record is linked back. While it is aside a reader finds no record for
        a moment."""
        written = []
        for record, updated_at in zip(records, expected, strict=True):
            (found,) = await self.get_many(record.class_name, [record.id])
            written.append(
                found is not None
                and holds_unchanged(found, record, updated_at)
                and self._swap(record, updated_at)
            )
        return written

    def _swap(self, record: Record, updated_at: datetime) -> bool:
        path = self._path(record.class_name, record.id)
        aside = f"{path}.{uuid4().hex}.cas.tmp"
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return False  # deleted meanwhile
        written = False
        try:
            with open(aside, "rb") as file:
                taken = file.read()
            if holds_unchanged(taken, record, updated_at):
                written = self._write(record, only_new=True)  # False: a save came in between
            return written
        finally:
            if not written:  # changed, or the write failed: the record goes back
                with contextlib.suppress(FileExistsError):  # a newer one is in place
                    os.link(aside, path)
            os.unlink(aside)

    def _write(self, record: Record, *, only_new: bool) -> bool:
        directory = os.path.join(self._root, record.class_name)
        path = self._path(record.class_name, record.id)
        temporary = os.path.join(directory, f".{record.id}.json.{uuid4().hex}.tmp")
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(directory)
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
                descriptor = os.open(directory, os.O_RDONLY)
                try:
                    os.fsync(descriptor)
                finally:
                    os.close(descriptor)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
        return True

    async def get_many(self, class_name: str, ids: Sequence[UUID]) -> list[bytes | None]:
        found: list[bytes | None] = []
        for id in ids:
            try:
                with open(self._path(class_name, id), "rb") as file:  # noqa: ASYNC230 - inline
                    found.append(file.read())
            except FileNotFoundError:
                found.append(None)
        return found

    async def delete_many(self, class_name: str, ids: Sequence[UUID]) -> int:
        deleted = 0
        for id in ids:
            try:
                os.unlink(self._path(class_name, id))
                deleted += 1
            except FileNotFoundError:
                pass
        return deleted

    async def delete_stale(self, class_name: str, ids: Sequence[UUID], before: datetime) -> int:
        """A record that looks stale is first renamed aside (atomic: a writer after that
        finds no file and writes a new one), then read again: still stale, it is deleted;
        written again just before the rename, it is linked back, unless a writer has put a
        newer one in its place meanwhile. Other processes and threads write here too."""
        deleted = 0
        for id, found in zip(ids, await self.get_many(class_name, ids), strict=True):
            if found is None or not _stale(found, id, class_name, before):
                continue
            path = self._path(class_name, id)
            aside = f"{path}.{uuid4().hex}.gc.tmp"
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                continue  # deleted meanwhile
            try:
                with open(aside, "rb") as file:  # noqa: ASYNC230 - inline, as every operation
                    taken = file.read()
                if _stale(taken, id, class_name, before):
                    deleted += 1
                else:
                    with contextlib.suppress(FileExistsError):  # a newer one is in place
                        os.link(aside, path)
            finally:
                os.unlink(aside)
        return deleted

    async def scan(self, class_name: str | None) -> AsyncIterator[StoredInfo]:
        if class_name is None:
            directories = sorted(p for p in self.directory.iterdir() if p.is_dir())
        else:
            directories = [self.directory / class_name]
        for directory in directories:
            try:
                names = sorted(name for name in os.listdir(directory) if name.endswith(".json"))
            except FileNotFoundError:
                continue  # no record of this class yet
            for name in names:
                stem = name.removesuffix(".json")
                try:
                    id = UUID(stem)
                    if str(id) != stem:
                        continue  # not a name this backend writes
                    with open(os.path.join(directory, name), "rb") as file:  # noqa: ASYNC230
                        head = file.read(HEAD_BYTES)
                        size = os.fstat(file.fileno()).st_size
                except (ValueError, FileNotFoundError):
                    continue  # not a record, or deleted while listing
                yield StoredInfo(id, directory.name, size, None, head)


def _stale(stored: bytes, id: UUID, class_name: str, before: datetime) -> bool:
    try:
        record = decode_stored(stored, id, class_name)
    except CorruptRecordError:
        return False  # never deleted by a condition it cannot be checked against
    return record.class_name == class_name and record.updated_at < before
