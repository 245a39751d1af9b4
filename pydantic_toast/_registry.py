"""Which backend serves a URL scheme, and the live backends: one per URL and event loop.

Drivers such as asyncpg and redis-py bind their connections to the event loop that opened
them, so a backend lives in exactly one loop. Each loop gets its own backend per URL, created
and connected on first use and reused by every later call. When the loop shuts down
(``asyncio.run`` returning, or any runner calling ``loop.shutdown_asyncgens()``) its backends
are closed in that loop, through an async generator the loop finalizes; `aclose` closes them
on request.
"""

from __future__ import annotations

import asyncio
import copy
import importlib
import os
import weakref
from collections.abc import AsyncGenerator
from functools import partial
from urllib.parse import urlsplit

from pydantic_toast._errors import (
    ExternalStorageError,
    StorageValidationError,
    mask_url,
    scrub_password,
)
from pydantic_toast._loader import cancel_batch_reads
from pydantic_toast.backends.base import StorageBackend

__all__ = [
    "backend_class_for",
    "check_storage_url",
    "close_running_loop_backends",
    "get_backend",
    "live_backend",
    "register_backend",
]

# Built-in schemes, imported on first use so that the core install needs no driver.
_BUILTIN: dict[str, str] = {
    "memory": "pydantic_toast.backends.memory:MemoryBackend",
    "sqlite": "pydantic_toast.backends.sqlite:SQLiteBackend",
    "file": "pydantic_toast.backends.file:FileBackend",
    "postgresql": "pydantic_toast.backends.postgresql:PostgreSQLBackend",
    "postgres": "pydantic_toast.backends.postgresql:PostgreSQLBackend",
    "redis": "pydantic_toast.backends.redis:RedisBackend",
    "rediss": "pydantic_toast.backends.redis:RedisBackend",
    "redis+unix": "pydantic_toast.backends.redis:RedisBackend",
    "redis+cluster": "pydantic_toast.backends.redis_cluster:RedisClusterBackend",
    "rediss+cluster": "pydantic_toast.backends.redis_cluster:RedisClusterBackend",
    "redis+sentinel": "pydantic_toast.backends.redis_sentinel:RedisSentinelBackend",
    "s3": "pydantic_toast.backends.s3:S3Backend",
}
_EXTRA_FOR_MODULE = {
    "postgresql": "postgresql",
    "redis": "redis",
    "redis_cluster": "redis",
    "redis_sentinel": "redis",
    "s3": "s3",
}

_registered: dict[str, type[StorageBackend]] = {}


def register_backend(scheme: str, backend_class: type[StorageBackend]) -> None:
    """Serve URLs of ``scheme`` with ``backend_class``; replaces a built-in backend too.

    Register before defining the models that use the scheme: their URLs are checked then.
    """
    if not (isinstance(backend_class, type) and issubclass(backend_class, StorageBackend)):
        raise TypeError(f"{backend_class!r} is not a StorageBackend subclass")
    scheme = scheme.lower()
    if not scheme.isascii() or not scheme.replace("+", "").replace("-", "").isalnum():
        raise ValueError(f"invalid URL scheme {scheme!r}")
    _registered[scheme] = backend_class


def registered_schemes() -> list[str]:
    return sorted(set(_BUILTIN) | set(_registered))


def backend_class_for(url: str) -> type[StorageBackend]:
    """The backend class registered for ``url``'s scheme."""
    scheme = _scheme_of(url)
    backend_class = _registered.get(scheme)
    if backend_class is not None:
        return backend_class
    target = _BUILTIN.get(scheme)
    if target is None:
        raise StorageValidationError(
            f"unknown storage scheme {scheme!r} in {mask_url(url)!r}; "
            f"registered schemes: {', '.join(registered_schemes())}"
        )
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if exc.name == module_name:
            raise
        extra = _EXTRA_FOR_MODULE.get(module_name.rpartition(".")[2], "all")
        raise StorageValidationError(
            f"the {scheme!r} backend needs a driver that is not installed ({exc.name}): "
            f"pip install 'pydantic-toast[{extra}]'"
        ) from exc
    backend_class = getattr(module, class_name)
    _registered.setdefault(scheme, backend_class)
    return _registered[scheme]


def _scheme_of(url: object) -> str:
    if not isinstance(url, str) or not url:
        raise StorageValidationError(f"a storage URL must be a non-empty string, not {url!r}")
    try:
        scheme = urlsplit(url).scheme
    except ValueError as exc:
        raise StorageValidationError(f"malformed storage URL {mask_url(url)!r}: {exc}") from exc
    if not scheme or "://" not in url:
        raise StorageValidationError(
            f"malformed storage URL {mask_url(url)!r}: expected scheme://..., "
            f"with one of the registered schemes: {', '.join(registered_schemes())}"
        )
    return scheme.lower()


def check_storage_url(url: object, owner: str) -> None:
    """Check a model's storage URL when the model is defined, naming the model on failure.

    The backend's constructor parses the URL and its options without any I/O, so building one
    and throwing it away proves the URL is usable.
    """
    try:
        backend_class_for(url)(url)  # type: ignore[arg-type]
    except (StorageValidationError, TypeError, ValueError) as exc:
        # A custom backend's message may quote the URL: shown scrubbed, and not chained
        # when it did (the chained exception would print it whole).
        text = str(exc)
        shown = scrub_password(text, str(url))
        cause = exc if shown == text else None
        if not isinstance(exc, StorageValidationError):
            shown = f"invalid storage URL {mask_url(str(url))!r}: {shown}"
        raise StorageValidationError(f"{owner}: {shown}") from cause


class _LoopBackends:
    """The live backends of one event loop."""

    def __init__(self) -> None:
        self.backends: dict[str, StorageBackend] = {}
        # The connection attempt under way for a URL, which every caller of that URL awaits.
        self.connecting: dict[str, asyncio.Task[StorageBackend]] = {}
        self.closer: AsyncGenerator[None, None] | None = None

    async def close(self, *, loop_ending: bool = False) -> None:
        backends, self.backends = self.backends, {}
        for backend in backends.values():
            backend.retired = True  # what is still in flight retries on a fresh backend
        if loop_ending:
            # The loop's own tasks are cancelled already; what the library started on it
            # since (a batch read of coalesced loads, a connection attempt) nobody awaits any
            # more. Cancelled and waited for here, none is left running, holding or opening a
            # connection, when the loop closes.
            attempts = list(self.connecting.values())
            for attempt in attempts:
                attempt.cancel()
            await asyncio.gather(*attempts, return_exceptions=True)
            await cancel_batch_reads(backends.values())
        errors = await asyncio.gather(
            *(backend.disconnect() for backend in backends.values()), return_exceptions=True
        )
        for error in errors:
            if isinstance(error, BaseException) and not isinstance(error, Exception):
                raise error


_live: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopBackends] = (
    weakref.WeakKeyDictionary()
)


def live_backend(url: str) -> StorageBackend | None:
    """The connected backend for ``url`` in the running loop, if there is one (no await:
    every operation asks, and nearly always finds it)."""
    per_loop = _live.get(asyncio.get_running_loop())
    return None if per_loop is None else per_loop.backends.get(url)


async def get_backend(url: str) -> StorageBackend:
    """The connected backend for ``url`` in the running loop, connecting it on first use."""
    backend = live_backend(url)
    if backend is not None:
        return backend
    return await _connect(asyncio.get_running_loop(), url)


async def _connect(loop: asyncio.AbstractEventLoop, url: str) -> StorageBackend:
    per_loop = _live.get(loop)
    if per_loop is None:
        per_loop = _live[loop] = _LoopBackends()
        per_loop.closer = _close_at_shutdown(per_loop)
        await per_loop.closer.asend(None)
    backend = per_loop.backends.get(url)
    if backend is not None:
        return backend
    # Callers arriving while a connection attempt is under way share it, and its outcome.
    # (They used to queue on a lock and then each try again in turn: against a server that
    # never answers, the n-th caller waited n connect timeouts.) The attempt is a task of its
    # own, so a caller that is cancelled does not cancel it for the others.
    attempt = per_loop.connecting.get(url)
    if attempt is None:
        attempt = loop.create_task(_open(per_loop, url))
        per_loop.connecting[url] = attempt
        attempt.add_done_callback(partial(_attempt_done, per_loop, url))
    try:
        return await asyncio.shield(attempt)
    except ExternalStorageError as exc:
        # Every caller gets an error object of its own: callers add to it (`failed_ids`).
        raise copy.copy(exc) from exc.__cause__


async def _open(per_loop: _LoopBackends, url: str) -> StorageBackend:
    backend = backend_class_for(url)(url)
    await backend.open()
    per_loop.backends[url] = backend
    return backend


def _attempt_done(per_loop: _LoopBackends, url: str, attempt: asyncio.Task[StorageBackend]) -> None:
    if per_loop.connecting.get(url) is attempt:
        del per_loop.connecting[url]
    if not attempt.cancelled():
        attempt.exception()  # retrieved: every caller may have given up waiting for it


async def _close_at_shutdown(per_loop: _LoopBackends) -> AsyncGenerator[None, None]:
    """Suspended until the loop finalizes its async generators, then closes the backends."""
    try:
        yield
    finally:
        await per_loop.close(loop_ending=True)


async def close_running_loop_backends() -> None:
    """Close every backend of the running loop; later operations reconnect on demand."""
    per_loop = _live.get(asyncio.get_running_loop())
    if per_loop is not None:
        await per_loop.close()


def _forget_after_fork() -> None:
    # A forked child must not touch its parent's sockets: drop the parent's backends without
    # closing them (closing would talk on connections the parent still uses) and keep them
    # referenced so that no finalizer runs either.
    _abandoned.extend(_live.values())
    _live.clear()


_abandoned: list[_LoopBackends] = []
os.register_at_fork(after_in_child=_forget_after_fork)
