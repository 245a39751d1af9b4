"""A loopback TCP proxy the fault tests put between a client and a real server.

It runs its own event loop in a daemon thread, so async tests (whose loop it must not share)
and sync code control it alike, and it listens on a free port of 127.0.0.1 only. Faults are
switched on and off by method calls, each returning once the proxy has applied it:

- `cut`: reset every open connection (both sides; the client sees ECONNRESET or EOF);
- `stall`: keep accepting connections, forward nothing in either direction (a partition or a
  frozen server); `heal` resumes forwarding what was held;
- `refuse`: stop listening, so new connections are refused, and reset the open ones (a server
  that is down); `heal` listens again on the same port;
- `reset_next(n)`: reset the next ``n`` accepted connections at once (a flaky first attempt);
- `cut_after(n)`: forward at most ``n`` more client-to-server bytes, counted over all
  connections, then cut the connection that reaches the limit and every one that sends more
  (the network lost in the middle of a write);
- `cut_on_reply(times, after_bytes)`: cut a connection instead of forwarding the server's
  next reply, once the connection has carried ``after_bytes`` to the server (a request that
  reached the server, its answer lost), the next ``times`` times.

``with FaultProxy(host, port) as proxy:`` (or `start` and `stop`) bounds its life.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from typing import Any, Self, TypeVar

__all__ = ["FaultProxy"]

T = TypeVar("T")

_CHUNK = 64 * 1024
_CONTROL_TIMEOUT = 10.0


class _Link:
    """One proxied connection: the client's side and the server's side."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.server: asyncio.StreamWriter | None = None
        self.sent = 0  # bytes forwarded from the client to the server

    def writers(self) -> list[asyncio.StreamWriter]:
        return [self.client] + ([self.server] if self.server is not None else [])


class FaultProxy:
    """Forward 127.0.0.1:`port` to ``target_host:target_port``, with faults on command."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.host = "127.0.0.1"
        self.port = 0
        self.accepted = 0  # connections accepted so far
        self.forwarded = 0  # bytes forwarded from clients to the server so far
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"faultproxy->{target_port}", daemon=True
        )
        self._flowing: asyncio.Event | None = None
        self._reset_next = 0
        self._upstream_budget: int | None = None  # client-to-server bytes left before cuts
        self._cut_replies: int | None = 0  # None: every reply until `heal`
        self._cut_replies_after = 0
        self._started = False

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> Self:
        if not self._started:
            self._thread.start()
            self._started = True
            self._call(self._start())
        return self

    def stop(self) -> None:
        if not self._started or not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=_CONTROL_TIMEOUT)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def open_connections(self) -> int:
        return len(self._links)

    @property
    def budget_exhausted(self) -> bool:
        """Whether a `cut_after` budget has run out (and cut a connection)."""
        return self._upstream_budget is not None and self._upstream_budget <= 0

    # --- faults -------------------------------------------------------------------------------

    def cut(self) -> int:
        """Reset every open connection; return how many there were."""
        return self._call(self._cut_all())

    def stall(self) -> None:
        """Forward nothing, on open and new connections, until `heal`."""
        self._call(self._set_flowing(False))

    def refuse(self) -> None:
        """Stop listening (new connections are refused) and reset the open ones."""
        self._call(self._refuse())

    def heal(self) -> None:
        """Back to normal: listen, forward, no pending resets or cuts."""
        self._call(self._heal())

    def reset_next(self, count: int = 1) -> None:
        """Reset the next ``count`` connections as soon as they are accepted."""
        self._call(self._set(reset_next=count))

    def cut_after(self, upstream_bytes: int) -> None:
        """Forward at most ``upstream_bytes`` more bytes from clients to the server (all
        connections together), then cut every connection that sends more, until `heal`."""
        self._call(self._set(cut_after=upstream_bytes))

    def cut_on_reply(self, times: int | None = None, after_bytes: int = 0) -> None:
        """Cut a connection instead of forwarding the server's next reply on it, once it
        has carried ``after_bytes`` to the server; ``times`` times (``None``: until `heal`)."""
        self._call(self._set(cut_replies=(times, after_bytes)))

    # --- the proxy, on its own loop -----------------------------------------------------------

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(_CONTROL_TIMEOUT)

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        await self._listen()

    async def _listen(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(
            self._accept, self.host, self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        await self._refuse()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=_CONTROL_TIMEOUT)

    async def _refuse(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()
        await self._cut_all()

    async def _heal(self) -> None:
        self._reset_next = 0
        self._upstream_budget = None
        self._cut_replies = 0
        await self._set_flowing(True)
        await self._listen()

    async def _set_flowing(self, flowing: bool) -> None:
        assert self._flowing is not None
        if flowing:
            self._flowing.set()
        else:
            self._flowing.clear()

    async def _set(
        self,
        *,
        reset_next: int | None = None,
        cut_after: int | None = None,
        cut_replies: tuple[int | None, int] | None = None,
    ) -> None:
        if cut_replies is not None:
            self._cut_replies, self._cut_replies_after = cut_replies
            for link in self._links:  # counted from now on
                link.sent = 0
        if reset_next is not None:
            self._reset_next = reset_next
        if cut_after is not None:
            self._upstream_budget = cut_after

    async def _cut_all(self) -> int:
        links = list(self._links)
        for link in links:
            self._reset(link)
        # Let the pumps see their closed streams before the caller goes on.
        await asyncio.sleep(0)
        return len(links)

    def _reset(self, link: _Link) -> None:
        self._links.discard(link)
        for writer in link.writers():
            _abort(writer)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None and self._flowing is not None
        self._tasks.add(task)
        self.accepted += 1
        link = _Link(writer)
        try:
            if self._reset_next > 0:
                self._reset_next -= 1
                _abort(writer)
                return
            self._links.add(link)
            # A stalled proxy accepts but does not even reach the server.
            await self._flowing.wait()
            try:
                server_reader, server_writer = await asyncio.open_connection(*self.target)
            except OSError:
                self._reset(link)
                return
            link.server = server_writer
            if link not in self._links:  # cut while connecting
                _abort(server_writer)
                return
            await asyncio.gather(
                self._pump(link, reader, server_writer, upstream=True),
                self._pump(link, server_reader, writer, upstream=False),
            )
        except (OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # `stop`: the task ends here, quietly
        finally:
            self._reset(link)
            self._tasks.discard(task)

    async def _pump(
        self,
        link: _Link,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        upstream: bool,
    ) -> None:
        assert self._flowing is not None
        try:
            while True:
                data = await reader.read(_CHUNK)
                if not data:
                    break
                await self._flowing.wait()
                if link not in self._links:
                    return
                if upstream:
                    link.sent += len(data)
                    self.forwarded += len(data)
                if upstream and self._upstream_budget is not None:
                    data = data[: self._upstream_budget]
                    self._upstream_budget -= len(data)
                    if data:
                        writer.write(data)
                        await writer.drain()
                    if self._upstream_budget <= 0:
                        # Give the partial write a moment to reach the server, then cut.
                        await asyncio.sleep(0.05)
                        self._reset(link)
                        return
                    continue
                if not upstream and self._cut_replies != 0 and link.sent >= self._cut_replies_after:
                    if self._cut_replies is not None:
                        self._cut_replies -= 1
                    self._reset(link)
                    return
                writer.write(data)
                await writer.drain()
        except (OSError, RuntimeError):
            pass
        # One side closed: close the other, as a server closing its socket would.
        self._reset(link)


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset rather than a clean FIN, as a crashed peer or a firewall does."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
