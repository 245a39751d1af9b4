"""``memory://name``: records in this process's memory, for tests and notebooks.

Backends are per event loop, but the data is per URL: every ``memory://name`` backend in the
process (the sync bridge's included) shares one store, so a record saved synchronously can be
loaded asynchronously. Nothing survives the process.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import ClassVar
from uuid import UUID

from pydantic_toast._errors import StorageValidationError
from pydantic_toast.backends.base import Capabilities, StorageBackend
from pydantic_toast.backends.options import BackendOptions
from pydantic_toast.backends.records import Record, StoredInfo

__all__ = ["MemoryBackend"]


class MemoryOptions(BackendOptions):
    """None: a memory URL is only a name."""

    label = "memory"


class MemoryBackend(StorageBackend):
    """Keeps `Record` objects in a dict, copying the small object (never the bytes) on the
    way in and out so that no caller can change what is stored."""

    options_model = MemoryOptions
    capabilities = Capabilities(
        delete=True,
        conditional_delete=True,
        conditional_write=True,
        scan=True,
        keeps_created_at=True,
        coalesce_loads=False,  # in-process: a batch would not wait on anything less
        batch_size=1 << 30,
        concurrency=1,
    )

    _stores: ClassVar[dict[str, dict[UUID, Record]]] = {}
    _stores_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, url: str) -> None:
        super().__init__(url)
        if self.location.fragment:
            raise StorageValidationError("memory URLs take a name and no options: memory://name")
        self._name = self.location.netloc + self.location.path
        self._store: dict[UUID, Record] = {}

    async def connect(self) -> None:
        with self._stores_lock:
            self._store = self._stores.setdefault(self._name, {})

    async def disconnect(self) -> None:
        """Keeps the data: other backends of the same URL may still use it."""

    async def get_many(self, class_name: str, ids: Sequence[UUID]) -> list[Record | None]:
        store = self._store
        return [store.get(id) for id in ids]  # the spine hands out copies

    async def put_many(self, records: Sequence[Record]) -> list[datetime]:
        store = self._store
        kept = []
        with self._stores_lock:  # against a conditional write of the sync bridge's thread
            for record in records:
                existing = store.get(record.id)
                created_at = record.created_at if existing is None else existing.created_at
                store[record.id] = copy = record.copy()
                copy.created_at = created_at
                kept.append(created_at)
        return kept

    async def put_unchanged(
        self, records: Sequence[Record], expected: Sequence[datetime]
    ) -> list[bool]:
        # Check and write under the lock every write of this process takes (the sync
        # bridge's thread shares the store).
        store = self._store
        written = []
        with self._stores_lock:
            for record, updated_at in zip(records, expected, strict=True):
                current = store.get(record.id)
                ok = (
                    current is not None
                    and current.class_name == record.class_name
                    and current.updated_at == updated_at
                )
                if ok:
                    store[record.id] = record.copy()
                written.append(ok)
        return written

    async def delete_many(self, class_name: str, ids: Sequence[UUID]) -> int:
        store = self._store
        doomed = [
            id for id in ids if (r := store.get(id)) is not None and r.class_name == class_name
        ]
        for id in doomed:
            del store[id]
        return len(doomed)

    async def delete_stale(self, class_name: str, ids: Sequence[UUID], before: datetime) -> int:
        # The store is shared with the sync bridge's thread, and a write replaces a record
        # object whole: what the pop took is put back unless it is the stale object checked.
        store = self._store
        deleted = 0
        for id in ids:
            record = store.get(id)
            if record is None or record.class_name != class_name or record.updated_at >= before:
                continue
            taken = store.pop(id, None)
            if taken is record:
                deleted += 1
            elif taken is not None:
                store.setdefault(id, taken)  # written again meanwhile (or later: newer still)
        return deleted

    async def scan(self, class_name: str | None) -> AsyncIterator[StoredInfo]:
        for record in list(self._store.values()):
            if class_name is None or record.class_name == class_name:
                yield StoredInfo(record.id, record.class_name, len(record.data), record.updated_at)

    @classmethod
    def clear(cls, url: str) -> None:
        """Forget every record of the ``memory://`` store named by ``url``."""
        with cls._stores_lock:
            cls._stores.get(url.partition("://")[2], {}).clear()
