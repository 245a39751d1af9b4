"""The sync bridge: the one place where synchronous callers run the async core.

Two loops serve sync callers, both owned by the library and reused by every call (never an
``asyncio.run`` per call):

* The main thread of a plain script, where no event loop is running, runs the coroutine on a
  private event loop of its own, right there: no thread hop, so a sync call costs what the
  async one does.
* Everything else (other threads, and code already inside a running loop: a Jupyter cell, a
  sync handler of an async framework) hands the coroutine to one loop running in a daemon
  thread and waits for the result. Blocking the caller's loop is then safe, and every worker
  thread shares that loop's pooled connections instead of opening its own.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import threading
from collections.abc import Coroutine
from typing import Any, NoReturn, TypeVar

from pydantic_toast._registry import close_running_loop_backends

__all__ = ["aclose", "close", "run_sync"]

T = TypeVar("T")

# Bound on how long interpreter exit waits for a loop's backends to close.
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
_main_loop: asyncio.AbstractEventLoop | None = None
# Set when interpreter exit closes the bridge: no new one may start (Python 3.12 refuses
# new threads from then on, and connections opened then would never be closed).
_exiting = False


def _get_bridge() -> _LoopThread | None:
    """The bridge, started on first use; ``None`` once interpreter exit has closed it."""
    global _bridge
    bridge = _bridge
    if bridge is None:
        with _bridge_lock:
            if _bridge is None and not _exiting:
                _bridge = _LoopThread()
            bridge = _bridge
    return bridge


def _outlive_exit() -> NoReturn:
    """A sync call that reaches the bridge after interpreter exit closed it. Only daemon
    threads still run then (exit joins the others first), and finalization stops them where
    they are: such a thread waits here for that, quietly, as it would in any blocking call."""
    if threading.current_thread() is threading.main_thread():
        raise RuntimeError(
            "a pydantic-toast *_sync method was called inside a running event loop during "
            "interpreter exit; await the async method instead"
        )
    while True:
        threading.Event().wait()


def run_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` to completion for a synchronous caller and return its result."""
    # (`_get_running_loop` answers None where `get_running_loop` would raise and catch.)
    main = threading.current_thread() is threading.main_thread()
    if main and asyncio._get_running_loop() is None:
        return _run_on_main_loop(coroutine)
    return _run_on_bridge(coroutine)


async def _then_stop(
    coroutine: Coroutine[Any, Any, T], loop: asyncio.AbstractEventLoop, stopping: list[bool]
) -> T:
    """``coroutine``, then stop ``loop`` in the same step (while ``stopping[0]``):
    `run_until_complete` stops it from a done callback instead, which costs one more loop
    iteration (and a poll) on every call."""
    try:
        return await coroutine
    finally:
        if stopping[0]:
            loop.stop()


def _run_on_main_loop(coroutine: Coroutine[Any, Any, T]) -> T:
    global _main_loop
    loop = _main_loop
    if loop is None or loop.is_closed():
        loop = _main_loop = asyncio.new_event_loop()
    stopping = [True]
    task = loop.create_task(_then_stop(coroutine, loop, stopping))
    try:
        loop.run_forever()
        return task.result()  # done: only its end stops the loop
    finally:
        if not task.done():  # interrupted (Ctrl-C): do not leave the operation half-run
            # Stopped by `run_until_complete` alone now (stopped twice, the loop would keep
            # a stop for the next call).
            stopping[0] = False
            task.cancel()
            with contextlib.suppress(BaseException):
                loop.run_until_complete(task)
        elif not task.cancelled():
            # Ended by what is propagating now (a Ctrl-C raised in the coroutine's own step):
            # retrieved, so that the loop does not log it again when the task is collected.
            task.exception()


def _run_on_bridge(coroutine: Coroutine[Any, Any, T]) -> T:
    bridge = _get_bridge()
    if bridge is None:
        coroutine.close()
        _outlive_exit()
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
    loop = _main_loop
    if loop is not None and not loop.is_closed() and not loop.is_running():
        loop.run_until_complete(close_running_loop_backends())
    bridge = _bridge
    if bridge is not None and bridge.thread.is_alive():
        future = asyncio.run_coroutine_threadsafe(close_running_loop_backends(), bridge.loop)
        future.result(timeout=_EXIT_TIMEOUT)


async def aclose() -> None:
    """Close every backend of the running event loop and of the sync bridge's thread.

    Later operations reconnect on demand, so this is safe to call at any time, for example
    in an application's shutdown hook. (Sync calls from a script's main thread use a loop of
    that thread, which cannot run while this one does: `close` closes those.)
    """
    await close_running_loop_backends()
    bridge = _bridge
    if bridge is not None and bridge.thread.is_alive():
        await asyncio.wrap_future(
            asyncio.run_coroutine_threadsafe(close_running_loop_backends(), bridge.loop)
        )


@atexit.register
def _close_at_exit() -> None:
    global _bridge, _main_loop, _exiting
    loop, _main_loop = _main_loop, None
    if loop is not None and not loop.is_closed() and not loop.is_running():
        with contextlib.suppress(Exception):  # exit must not print tracebacks
            loop.run_until_complete(asyncio.wait_for(close_running_loop_backends(), _EXIT_TIMEOUT))
            loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    with _bridge_lock:
        _exiting = True
        bridge, _bridge = _bridge, None
    if bridge is None or not bridge.thread.is_alive():
        return
    with contextlib.suppress(Exception):
        future = asyncio.run_coroutine_threadsafe(close_running_loop_backends(), bridge.loop)
        future.result(timeout=_EXIT_TIMEOUT)
    bridge.loop.call_soon_threadsafe(bridge.loop.stop)
    bridge.thread.join(timeout=_EXIT_TIMEOUT)


def _forget_after_fork() -> None:
    # Neither the bridge's thread nor the parent's connections are the child's: the next sync
    # call starts afresh (the registry forgets the backends the same way).
    global _bridge, _bridge_lock, _main_loop
    _bridge = None
    _bridge_lock = threading.Lock()
    _main_loop = None


os.register_at_fork(after_in_child=_forget_after_fork)
