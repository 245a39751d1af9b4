"""Coalescing of single loads: the DataLoader pattern.

Loads that different tasks issue against the same backend in the same event-loop turn are
collected and sent as one batch read; each caller gets its own record (or ``None``) back. The
batch is sent by a task created with the first load, which the loop runs right after the
callbacks already queued: a lone load waits for nobody, there is no timer.
"""

from __future__ import annotations

import asyncio
import weakref
from uuid import UUID

from pydantic_toast.backends.base import Record, StorageBackend

__all__ = ["load_record"]

_Waiters = dict[UUID, list["asyncio.Future[Record | None]"]]


class _Loader:
    __slots__ = ("backend", "pending", "task")

    def __init__(self, backend: StorageBackend) -> None:
        self.backend = backend
        self.pending: dict[str, _Waiters] = {}
        self.task: asyncio.Task[None] | None = None

    def load(self, class_name: str, id: UUID) -> asyncio.Future[Record | None]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Record | None] = loop.create_future()
        if not self.pending:
            self.task = loop.create_task(self._send())
        self.pending.setdefault(class_name, {}).setdefault(id, []).append(future)
        return future

    async def _send(self) -> None:
        batch, self.pending = self.pending, {}
        if len(batch) == 1:
            for class_name, waiters in batch.items():
                await self._read(class_name, waiters)
        else:
            await asyncio.gather(*(self._read(name, waiters) for name, waiters in batch.items()))

    async def _read(self, class_name: str, waiters: _Waiters) -> None:
        ids = list(waiters)
        try:
            if len(ids) == 1:
                records = [await self.backend.read_record(class_name, ids[0])]
            else:
                records = await self.backend.read_records(class_name, ids)
        except BaseException as exc:
            for futures in waiters.values():
                for future in futures:
                    if future.done():
                        continue
                    if isinstance(exc, asyncio.CancelledError):
                        future.cancel()
                    else:
                        future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for id, record in zip(ids, records, strict=True):
            for future in waiters[id]:
                if not future.done():
                    future.set_result(record)


_loaders: weakref.WeakKeyDictionary[StorageBackend, _Loader] = weakref.WeakKeyDictionary()


def load_record(
    backend: StorageBackend, class_name: str, id: UUID
) -> asyncio.Future[Record | None]:
    """Read one record through ``backend``, batched with the other loads of this loop turn."""
    loader = _loaders.get(backend)
    if loader is None:
        loader = _loaders[backend] = _Loader(backend)
    return loader.load(class_name, id)
