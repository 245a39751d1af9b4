"""``redis+sentinel://host:port[,host:port...]/service_name[/db]``: Redis behind Sentinel.

The client asks the Sentinels (any that answers) for the current primary of
``service_name`` and connects to it; everything else is the single-server backend, keys and
scripts included. When the primary fails, its connections fail (transient: the model layer
retries), and a new connection asks the Sentinels again, so once they have promoted a replica
the operations go to it. A write acknowledged by the old primary and not yet replicated is
lost in a failover unless the URL asks for ``wait_replicas``.

The URL's user and password authenticate to the Redis servers; the Sentinels are asked
without them.
"""

from __future__ import annotations

import re
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.sentinel import Sentinel

from pydantic_toast._errors import StorageValidationError
from pydantic_toast.backends.redis import RedisBackend, RedisOptions, _parse_driver_url

__all__ = ["RedisSentinelBackend"]

_PATH = re.compile(r"/(?P<service>[^/]{1,200})(?:/(?P<db>\d+))?/?")


class RedisSentinelOptions(RedisOptions):
    label = "redis sentinel"


class RedisSentinelBackend(RedisBackend):
    """The options of ``redis://``; the path names the Sentinels' service and, optionally,
    the database (``/mymaster/2``)."""

    options_model = RedisSentinelOptions
    options: RedisSentinelOptions

    def _locate(self, options: dict[str, Any]) -> str:
        location = self.location
        if location.scheme != "redis+sentinel":
            raise StorageValidationError(
                f"RedisSentinelBackend does not serve {location.scheme!r} URLs"
            )
        if not location.hosts:
            raise StorageValidationError(
                "a redis+sentinel URL names at least one Sentinel: "
                "redis+sentinel://host:port,.../service_name"
            )
        path = _PATH.fullmatch(location.unquoted_path)
        if path is None:
            raise StorageValidationError(
                f"the path of a redis+sentinel URL is /service_name or /service_name/db, "
                f"not {location.path[:60]!r}"
            )
        self.service = path["service"]
        db = path["db"] or "0"
        first = location.netloc.split(",")[0]
        self._connection_options = _parse_driver_url(
            f"redis://{self._userinfo()}{first}/{db}?{self._driver_query(options)}"
        )
        self._check_database(path["db"] or "")
        for name in ("host", "port", "connection_class"):
            self._connection_options.pop(name, None)
        self._sentinels = [(host, port or 26379) for host, port in location.hosts]
        self._sentinel: Sentinel | None = None
        hosts = ",".join(f"{host}:{port}" for host, port in self._sentinels)
        return f"service {self.service!r} of the Sentinels at {hosts}"

    @property
    def where(self) -> str:
        return f"redis {self._where}"

    def _new_client(self) -> Redis:
        timeouts = {
            name: value
            for name, value in self._client_options.items()
            if name.startswith("socket_")
        }
        sentinel = Sentinel(self._sentinels, sentinel_kwargs=timeouts)  # type: ignore[no-untyped-call]
        self._sentinel = sentinel
        options = {**self._connection_options, **self._client_options}
        client: Redis = sentinel.master_for(self.service, redis_class=Redis, **options)
        return client

    async def connect(self) -> None:
        try:
            await super().connect()
        except BaseException:
            await self._close_sentinels()
            raise

    async def disconnect(self) -> None:
        """Close the primary's pool and the connections to the Sentinels."""
        try:
            await super().disconnect()
        finally:
            await self._close_sentinels()

    async def _close_sentinels(self) -> None:
        sentinel, self._sentinel = self._sentinel, None
        if sentinel is not None:
            for client in sentinel.sentinels:
                await client.aclose()
