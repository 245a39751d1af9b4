"""``memory://name``: records in this process's memory, for tests and notebooks.

Backends are per event loop, but the data is per URL: every ``memory://name`` backend in the
process (the sync bridge's included) shares one store, so a record saved synchronously can be
loaded asynchronously. Nothing survives the process.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import ClassVar
from uuid import UUID

from pydantic_toast.backends.base import Record, RecordInfo, StorageBackend, check_class_name
from pydantic_toast.errors import StorageValidationError

__all__ = ["MemoryBackend"]


class MemoryBackend(StorageBackend):
    """Keeps `Record` objects in a dict, copying the small object (never the bytes) on the
    way in and out so that no caller can change what is stored."""

    coalesce_loads = False  # in-process: a batch would not wait on anything less

    _stores: ClassVar[dict[str, dict[UUID, Record]]] = {}
    _stores_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self._name = url.partition("://")[2]
        if "?" in self._name or "#" in self._name:
            raise StorageValidationError("memory URLs take a name and no options: memory://name")
        self._store: dict[UUID, Record] = {}

    async def connect(self) -> None:
        with self._stores_lock:
            self._store = self._stores.setdefault(self._name, {})

    async def disconnect(self) -> None:
        """Keeps the data: other backends of the same URL may still use it."""

    async def write_record(self, record: Record) -> None:
        check_class_name(record.class_name)
        existing = self._store.get(record.id)
        if existing is not None:
            record.created_at = existing.created_at  # tell the caller, as others do
        self._store[record.id] = replace(record)

    async def read_record(self, class_name: str, id: UUID) -> Record | None:
        check_class_name(class_name)
        record = self._store.get(id)
        return None if record is None else replace(record)  # callers may change their copy

    async def write_records(self, records: Sequence[Record]) -> None:
        for record in records:
            await self.write_record(record)

    async def read_records(self, class_name: str, ids: Sequence[UUID]) -> list[Record | None]:
        check_class_name(class_name)
        store = self._store
        return [None if (r := store.get(id)) is None else replace(r) for id in ids]

    async def delete_records(self, class_name: str, ids: Sequence[UUID]) -> int:
        check_class_name(class_name)
        store = self._store
        doomed = [
            id for id in ids if (r := store.get(id)) is not None and r.class_name == class_name
        ]
        for id in doomed:
            del store[id]
        return len(doomed)

    async def scan_records(self, class_name: str | None = None) -> AsyncIterator[RecordInfo]:
        for record in list(self._store.values()):
            if class_name is None or record.class_name == class_name:
                yield RecordInfo(record.class_name, record.id, len(record.data), record.updated_at)

    @classmethod
    def clear(cls, url: str) -> None:
        """Forget every record of the ``memory://`` store named by ``url``."""
        with cls._stores_lock:
            cls._stores.get(url.partition("://")[2], {}).clear()
