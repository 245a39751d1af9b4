"""Coalescing of single loads: the DataLoader pattern.

Loads that different tasks issue against the same backend while others are under way are
sent as one batch read; each caller gets its own record (or ``None``) back. A load issued
when nothing else is being read through the backend goes out at once, by itself, so a lone
load pays nothing for coalescing (no callback, no task, no future). Any load issued while a
read is in flight joins the loads of its loop turn, and a task reads them as one batch as
soon as the turn ends. There is no timer.

So 64 tasks loading at once send one single read (the first) and one batch (the 63 behind
it), and go on sending batches while they keep loading, instead of each round's first load
going out alone and splitting them into ever more, smaller reads.
"""

from __future__ import annotations

import asyncio
import copy
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from uuid import UUID

from pydantic_toast._errors import StorageValidationError
from pydantic_toast.backends.base import Record, StorageBackend

__all__ = ["cancel_batch_reads", "load_record"]

_Key = tuple[str, UUID]


@dataclass(frozen=True, slots=True)
class _Failed:
    """One record of a batch that could not be read: its waiters get ``error``."""

    error: StorageValidationError


_Waiters = dict[_Key, list["asyncio.Future[Record | None]"]]


class _Loader:
    __slots__ = ("_backend", "gathering", "in_flight", "serving")

    def __init__(self, backend: StorageBackend) -> None:
        self._backend = weakref.ref(backend)
        #: The loads of this loop turn waiting for its end, once one has joined.
        self.gathering: _Waiters | None = None
        #: Reads under way: lone loads, and batches flushed (counted until their task ends).
        self.in_flight = 0
        self.serving: set[asyncio.Task[None]] = set()

    def join(self, class_name: str, id: UUID) -> asyncio.Future[Record | None]:
        """The record's future, set by the batch read of this loop turn."""
        gathering = self.gathering
        loop = asyncio.get_running_loop()
        if gathering is None:  # the first to join in this turn: read them all at its end
            self.gathering = gathering = {}
            loop.call_soon(self._flush, gathering)
        future: asyncio.Future[Record | None] = loop.create_future()
        gathering.setdefault((class_name, id), []).append(future)
        return future

    def _flush(self, gathering: _Waiters) -> None:
        """The turn ended: read what gathered in it, in a task of its own."""
        if self.gathering is gathering:
            self.gathering = None
        self.in_flight += 1  # counted from now, so the loads of the next turns gather too
        task = asyncio.get_running_loop().create_task(self._serve_quietly(gathering))
        self.serving.add(task)
        task.add_done_callback(self._served)

    def _served(self, task: asyncio.Task[None]) -> None:
        self.in_flight -= 1
        self.serving.discard(task)

    async def _serve(self, waiters: _Waiters) -> None:
        """Read every waiter's record, one batch per class, and give each its result."""
        by_class: dict[str, list[UUID]] = {}
        for class_name, id in waiters:
            by_class.setdefault(class_name, []).append(id)
        try:
            batches = await asyncio.gather(
                *(self._read(class_name, ids) for class_name, ids in by_class.items())
            )
        except Exception as exc:
            for futures in waiters.values():
                for future in futures:
                    if not future.done():
                        future.set_exception(_own_copy(exc))
            raise
        for (class_name, ids), records in zip(by_class.items(), batches, strict=True):
            for id, record in zip(ids, records, strict=True):
                for future in waiters[class_name, id]:
                    if future.done():
                        continue
                    if isinstance(record, _Failed):
                        future.set_exception(_own_copy(record.error))
                    else:
                        future.set_result(record)

    def backend(self) -> StorageBackend:
        backend = self._backend()
        assert backend is not None, "a loader outlived its backend"  # callers hold it
        return backend

    async def _read(self, class_name: str, ids: list[UUID]) -> Sequence[Record | _Failed | None]:
        try:
            return await self.backend().read_records(class_name, ids)
        except StorageValidationError:
            if len(ids) == 1:
                raise
        # One record the batch could not decode must not fail the others' loads: read each
        # alone, so every caller gets its own record or its own error (a rare, slow path).
        return list(await asyncio.gather(*(self._read_alone(class_name, id) for id in ids)))

    async def _read_alone(self, class_name: str, id: UUID) -> Record | _Failed | None:
        try:
            return await self.backend().read_record(class_name, id)
        except StorageValidationError as exc:
            return _Failed(exc)

    async def _serve_quietly(self, waiters: _Waiters) -> None:
        try:
            await self._serve(waiters)
        except Exception:  # noqa: BLE001 - _serve delivered it to every waiter
            return
        except BaseException:  # cancelled (the loop is shutting down): so are the waiters
            for futures in waiters.values():
                for future in futures:
                    future.cancel()
            raise


def _own_copy(exc: Exception) -> Exception:
    """A copy of ``exc`` for one waiter: each caller raises its own exception object (shared,
    their tracebacks would pile up on one). Falls back to the original if it cannot copy."""
    try:
        clone = copy.copy(exc)
    except Exception:  # noqa: BLE001 - an exotic exception: share it rather than fail
        return exc
    clone.__cause__ = exc.__cause__
    return clone


# A backend's loader lives as long as the backend: the loader holds it only weakly.
_loaders: weakref.WeakKeyDictionary[StorageBackend, _Loader] = weakref.WeakKeyDictionary()


async def load_record(backend: StorageBackend, class_name: str, id: UUID) -> Record | None:
    """Read one record through ``backend``, batched with the other loads of this loop turn
    (when the backend's `coalesce_loads` says batching pays)."""
    if not backend.coalesce_loads:
        return await backend.read_record(class_name, id)
    loader = _loaders.get(backend)
    if loader is None:
        loader = _loaders[backend] = _Loader(backend)
    if loader.gathering is None and not loader.in_flight:  # nothing else under way: go at once
        loader.in_flight += 1
        try:
            return await backend.read_record(class_name, id)
        finally:
            loader.in_flight -= 1
    return await loader.join(class_name, id)


async def cancel_batch_reads(backends: Iterable[StorageBackend]) -> None:
    """Cancel the batch reads under way through ``backends`` and wait until they have ended.

    For a loop that is shutting down: `asyncio.run` cancels the tasks it finds, but a batch
    read whose turn ended while those were being cancelled starts after that, and nothing
    would await it (its callers are cancelled): left alone it is still pending, holding a
    connection, when the loop closes."""
    serving = [
        task
        for backend in backends
        if (loader := _loaders.get(backend)) is not None
        for task in loader.serving
    ]
    for task in serving:
        task.cancel()
    await asyncio.gather(*serving, return_exceptions=True)
