"""The sync bridge: the one place where synchronous callers run the async core.

Sync callers (scripts, threads, a Jupyter cell, a sync handler inside an async framework) all
hand their coroutine to one library-owned event loop running in a daemon thread and wait for
the result. That works the same whether or not the calling thread already runs a loop, costs
no ``asyncio.run`` per call, and keeps one set of pooled backends for every sync caller.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from pydantic_toast.registry import close_running_loop_backends

__all__ = ["aclose", "close", "run_sync"]

T = TypeVar("T")

# Bound on how long interpreter exit waits for the bridge's backends to close.
_EXIT_TIMEOUT = 5.0


class _LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="pydantic-toast-sync", daemon=True
        )
        self.thread.start()


_bridge: _LoopThread | None = None
_bridge_lock = threading.Lock()


def _get_bridge() -> _LoopThread:
    global _bridge
    bridge = _bridge
    if bridge is None:
        with _bridge_lock:
            if _bridge is None:
                _bridge = _LoopThread()
            bridge = _bridge
    return bridge


def run_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` on the bridge loop and return its result (or raise its error)."""
    bridge = _get_bridge()
    if threading.current_thread() is bridge.thread:
        coroutine.close()
        raise RuntimeError(
            "a pydantic-toast *_sync method was called from inside an async operation of "
            "pydantic-toast; await the async method instead"
        )
    future = asyncio.run_coroutine_threadsafe(coroutine, bridge.loop)
    try:
        return future.result()
    except BaseException:
        future.cancel()  # an interrupted caller must not leave its operation running
        raise


def close() -> None:
    """Close the backends that sync calls opened. Later sync calls reconnect on demand."""
    bridge = _bridge
    if bridge is not None and bridge.thread.is_alive():
        future = asyncio.run_coroutine_threadsafe(close_running_loop_backends(), bridge.loop)
        future.result(timeout=_EXIT_TIMEOUT)


async def aclose() -> None:
    """Close every backend of the running event loop and those that sync calls opened.

    Later operations reconnect on demand, so this is safe to call at any time, for example
    in an application's shutdown hook.
    """
    await close_running_loop_backends()
    if _bridge is not None:
        await asyncio.to_thread(close)


@atexit.register
def _close_at_exit() -> None:
    global _bridge
    bridge, _bridge = _bridge, None
    if bridge is None or not bridge.thread.is_alive():
        return
    try:
        future = asyncio.run_coroutine_threadsafe(close_running_loop_backends(), bridge.loop)
        future.result(timeout=_EXIT_TIMEOUT)
    except Exception:  # noqa: BLE001 - exit must not print tracebacks for a failed close
        pass
    bridge.loop.call_soon_threadsafe(bridge.loop.stop)
    bridge.thread.join(timeout=_EXIT_TIMEOUT)


def _forget_after_fork() -> None:
    # The bridge's thread does not exist in a forked child; the next sync call starts a new one.
    global _bridge, _bridge_lock
    _bridge = None
    _bridge_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)
