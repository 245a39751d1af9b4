"""``redis+cluster://host:port[,host:port...]``, ``rediss+cluster://`` (TLS): Redis Cluster.

Records keep the single-server key format, ``{prefix}:{ClassName}:{uuid}``, with no hash
tag, so a class's records spread over every slot by id and use the whole cluster. A key's
operations are the single-server ones (the write script touches only keys of one slot). A
batch is split by slot and sent as one pipeline: redis-py sends each node its part on one
connection, every node at once, so a batch costs one round trip per node. Listing and purge
walk every primary with SCAN.

Failover: a connection lost, a node down or a cluster that is not ``ok`` yet fails the
operation as transient (the model layer retries it, within its ``retries``), and makes the
client read the slot map again before the next command. MOVED and ASK replies are followed.
With ``wait_replicas`` each node's writes go to the node the slot map names, ended by
``WAIT`` on the same connection; a write answered MOVED or ASK is sent again to the node the
reply names, followed by a ``WAIT`` there.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from functools import cache
from typing import Annotated, Any, cast
from uuid import UUID

from pydantic import Field
from redis import exceptions as redis_errors
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot

from pydantic_toast._errors import StorageValidationError
from pydantic_toast.backends.records import Record, timestamp_text
from pydantic_toast.backends.redis import (
    _CONNECTION_KEYWORDS,
    _CONNECTION_OPTIONS,
    _DELETE_STALE_SCRIPT,
    _HEADS_SCRIPT,
    _REFUSED,
    RedisBackend,
    RedisOptions,
    _parse_driver_url,
)

__all__ = ["RedisClusterBackend"]

# What makes the client read the slot map again: the node or its connection is gone, or the
# cluster is reconfiguring. redis-py does this itself for single commands, not for pipelines.
# A ClusterError is CLUSTERDOWN, or redis-py giving up after 16 redirections in a row ("TTL
# exhausted") while slots move.
_TOPOLOGY_CHANGED = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.ClusterError,
    redis_errors.SlotNotCoveredError,
    redis_errors.MovedError,
    redis_errors.AskError,
    redis_errors.TryAgainError,
)
_MAP_NOT_READY = (
    "startup_nodes could not agree on a valid slots cache",
    "Redis Cluster cannot be connected",
    "All slots are not covered",
)
_REDIRECTED = (redis_errors.MovedError, redis_errors.AskError)
# A cluster has one database; these name the one server or socket of a plain client.
_NOT_FOR_A_CLUSTER = {"host", "port", "path", "connection_class", "startup_nodes"}
# The cluster client's options that take Python objects, besides those of `redis`; its
# others are declared (and typed) by `RedisClusterOptions`.
_CLUSTER_KEYWORDS = frozenset({"address_remap", "load_balancing_strategy"})
_CLUSTER_REFUSED = {
    **_REFUSED,
    "startup_nodes": "the URL names the nodes",
    "cluster_error_retry_attempts": (
        "redis-py does not retry here: the model's retries (ExternalConfigDict) do"
    ),
}


class RedisClusterOptions(RedisOptions):
    label = "redis cluster"

    # redis-py's cluster options, typed here: it takes them from a URL as text, so
    # ``read_from_replicas=false`` would be a true string. ``None``: redis-py's default.
    require_full_coverage: bool | None = None
    read_from_replicas: bool | None = None
    dynamic_startup_nodes: bool | None = None
    reinitialize_steps: Annotated[int, Field(ge=0, description="an integer 0 or more")] | None = (
        None
    )

    @classmethod
    def driver_option_names(cls) -> frozenset[str]:
        return _CONNECTION_OPTIONS & _cluster_parameters()

    @classmethod
    def driver_keyword_names(cls) -> frozenset[str]:
        return (_CONNECTION_KEYWORDS | _CLUSTER_KEYWORDS) & _cluster_parameters()

    @classmethod
    def refused_driver_options(cls) -> Mapping[str, str]:
        return _CLUSTER_REFUSED


_CLUSTER_FIELDS = tuple(set(RedisClusterOptions.model_fields) - set(RedisOptions.model_fields))


class RedisClusterBackend(RedisBackend):
    """The options of ``redis://`` (``prefix``, ``ttl``, ``timeout``, ``max_connections``
    per node, ``wait_replicas``, ``wait_timeout``) and redis-py's cluster and connection
    options (``require_full_coverage``, ``ssl_ca_certs`` ...). Database 0 only."""

    options_model = RedisClusterOptions
    options: RedisClusterOptions

    def _locate(self, options: dict[str, Any]) -> str:
        location = self.location
        if location.scheme not in ("redis+cluster", "rediss+cluster"):
            raise StorageValidationError(
                f"RedisClusterBackend does not serve {location.scheme!r} URLs"
            )
        if not location.hosts:
            raise StorageValidationError(
                "a redis+cluster URL names at least one node: redis+cluster://host:port,..."
            )
        db = self.driver_options.get("db", location.path.strip("/") or "0")
        if str(db) != "0":
            raise StorageValidationError(
                f"a Redis Cluster has only database 0; the URL asks for {str(db)[:20]!r}"
            )
        # redis-py reads (and types) the query and credentials from a one-server URL.
        scheme = "rediss" if location.scheme == "rediss+cluster" else "redis"
        first = location.netloc.split(",")[0]
        self._connection_options = _parse_driver_url(
            f"{scheme}://{self._userinfo()}{first}/0?{self._driver_query(options)}"
        )
        for name in (*_NOT_FOR_A_CLUSTER, "db"):
            self._connection_options.pop(name, None)
        if scheme == "rediss":
            self._connection_options["ssl"] = True
        self._startup_nodes = [(host, port or 6379) for host, port in location.hosts]
        return ",".join(f"{host}:{port}" for host, port in self._startup_nodes)

    @property
    def where(self) -> str:
        return f"redis cluster at {self._where}"

    def _new_client(self) -> RedisCluster:
        options = {**self._connection_options, **self._client_options}
        options.pop("db", None)
        for name in _CLUSTER_FIELDS:
            value = getattr(self.options, name)
            if value is not None:
                options[name] = value
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in self._startup_nodes],
            **options,
        )

    async def _cluster(self) -> RedisCluster:
        """The client, once a connection is free; release `_gate` after the command."""
        return cast(RedisCluster, await self._acquire())

    def _slot(self, key: str) -> int:
        return key_slot(key.encode())

    async def put_many(self, records: Sequence[Record]) -> list[datetime]:
        """A single record as on one server; a batch by slot, in one pipeline."""
        if len(records) == 1 and not self.wait_replicas:
            return [await self._put_one(records[0])]
        return await self._put_pipelined(records)

    async def _pipeline(self, client: Any, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Each command to the node that owns its slot. With ``wait_replicas``, each node's
        commands are ended by ``WAIT`` and redis-py does not redirect them (a command it
        redirected would miss its ``WAIT``): a command answered MOVED or ASK is sent to the
        node named in the reply (after ``ASKING`` for a slot in migration), and that node's
        part ended by a ``WAIT`` of its own; after a MOVED the slot map is read again."""
        cluster = cast(RedisCluster, client)
        pipe, nodes = await self._routed(cluster, commands)
        if not self.wait_replicas:
            return await self._send(pipe)
        replies = await self._send_waiting(pipe, nodes)
        # (MovedError is a subclass of AskError in redis-py.)
        redirected = [i for i, reply in enumerate(replies) if isinstance(reply, _REDIRECTED)]
        if redirected:
            pipe, nodes = cluster.pipeline(), {}
            for i in redirected:
                redirect = replies[i]
                node = cluster.get_node(host=redirect.host, port=redirect.port)
                if node is None:
                    await self._refresh(cluster)
                    raise redirect
                nodes[node.name] = node
                pipe.execute_command("ASKING", target_nodes=node)  # harmless on an owner
                pipe.execute_command(*commands[i][1], target_nodes=node)
            again = await self._send_waiting(pipe, nodes)
            for i, reply in zip(redirected, again[1::2], strict=True):
                replies[i] = reply
            if any(isinstance(replies[i], redis_errors.MovedError) for i in redirected):
                await self._refresh(cluster)
        return replies

    async def _routed(
        self, cluster: RedisCluster, commands: Sequence[Sequence[Any]]
    ) -> tuple[Any, dict[str, ClusterNode]]:
        """A pipeline of ``[keys, command]`` pairs, each sent to the node the slot map names
        for its first key (redis-py would work that out again, slower, for each command),
        and those nodes by name."""
        await cluster.initialize()  # the slot map, read again after a failure
        pipe = cluster.pipeline()
        nodes: dict[str, ClusterNode] = {}
        try:
            for keys, command in commands:
                node = cluster.get_node_from_key(keys[0])
                if node is None:
                    raise redis_errors.SlotNotCoveredError(f"no node serves key {keys[0]!r}")
                nodes[node.name] = node
                pipe.execute_command(*command, target_nodes=node)
        except redis_errors.SlotNotCoveredError:
            await self._refresh(cluster)
            raise
        return pipe, nodes

    async def _send_waiting(self, pipe: Any, nodes: dict[str, ClusterNode]) -> list[Any]:
        """``pipe`` with a ``WAIT`` for each node at its end; its replies without those."""
        for node in nodes.values():
            pipe.execute_command("WAIT", self.wait_replicas, self._wait_ms, target_nodes=node)
        replies = await self._send(pipe, redirect=False)
        self._check_replicated(replies[len(replies) - len(nodes) :])
        return replies[: len(replies) - len(nodes)]

    async def _send(self, pipe: Any, redirect: bool = True) -> list[Any]:
        """Execute a cluster pipeline; after a failure that means the cluster changed, the
        client reads the slot map again before its next command. (Without ``redirect``,
        MOVED and ASK replies are left to the caller.)"""
        try:
            replies: list[Any] = await pipe.execute(
                raise_on_error=False, allow_redirections=redirect
            )
        except _TOPOLOGY_CHANGED:
            await self._refresh(pipe.cluster_client)
            raise
        for reply in replies:
            if isinstance(reply, _TOPOLOGY_CHANGED) and (
                redirect or not isinstance(reply, _REDIRECTED)
            ):
                await self._refresh(pipe.cluster_client)
                raise reply
        return replies

    def is_transient(self, exc: BaseException) -> bool:
        """A redirection that reaches here (a second one in a row, or to a node the client
        does not know yet) succeeds on a retry, once the slot map is read again."""
        if isinstance(exc, _TOPOLOGY_CHANGED):
            return True
        if isinstance(exc, redis_errors.RedisClusterException):
            # Reading the slot map while a failover is under way: nodes that disagree, none
            # reachable, slots without an owner. redis-py gives these no type of their own.
            return str(exc).startswith(_MAP_NOT_READY)
        return super().is_transient(exc)

    async def _drop_idle(self, client: Any) -> None:
        """Nothing: a cluster client has a pool per node, and a failure that reaches here
        has closed them already (`_refresh`) or redis-py has, reading the slot map again."""

    async def _refresh(self, cluster: RedisCluster) -> None:
        # `aclose` is redis-py's own way: the connections close and the next command reads
        # the slot map first (what its pipeline retries do).
        await cluster.aclose()

    async def get_many(self, class_name: str, ids: Sequence[UUID]) -> list[bytes | None]:
        if len(ids) == 1:
            return await super().get_many(class_name, ids)
        by_slot: dict[int, list[int]] = {}
        keys = self._keys(class_name, ids)
        for index, key in enumerate(keys):
            by_slot.setdefault(self._slot(key), []).append(index)
        client = await self._cluster()
        try:
            commands = [
                [[keys[indexes[0]]], ["MGET", *(keys[index] for index in indexes)]]
                for indexes in by_slot.values()
            ]
            replies = await self._send((await self._routed(client, commands))[0])
        finally:
            self._gate.release()
        found: list[bytes | None] = [None] * len(ids)
        for indexes, reply in zip(by_slot.values(), replies, strict=True):
            if isinstance(reply, Exception):
                raise reply
            for index, value in zip(indexes, reply, strict=True):
                found[index] = value
        return found

    async def delete_many(self, class_name: str, ids: Sequence[UUID]) -> int:
        by_slot: dict[int, list[str]] = {}
        for id in ids:
            key = self._key(class_name, id)
            by_slot.setdefault(self._slot(key), []).append(key)
        client = await self._cluster()
        try:
            commands = [[keys, ["UNLINK", *keys]] for keys in by_slot.values()]
            replies = await self._send((await self._routed(client, commands))[0])
        finally:
            self._gate.release()
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return sum(int(reply) for reply in replies)

    async def delete_stale(self, class_name: str, ids: Sequence[UUID], before: datetime) -> int:
        """The single server's script, once per slot: a script's keys must share one."""
        cutoff = timestamp_text(before.astimezone(UTC)).encode()
        by_slot = self._by_slot(self._keys(class_name, ids))
        replies = await self._per_slot(
            [[keys, ["EVAL", _DELETE_STALE_SCRIPT, len(keys), *keys, cutoff]] for keys in by_slot]
        )
        return sum(int(reply) for reply in replies)

    async def _heads(self, client: Any, keys: list[str]) -> list[Any]:
        """The single server's script, once per slot, the replies put back in key order."""
        order = {key: index for index, key in enumerate(keys)}
        by_slot = self._by_slot(keys)
        replies = await self._per_slot(
            [[group, ["EVAL", _HEADS_SCRIPT, len(group), *group]] for group in by_slot],
            client,
        )
        heads: list[Any] = [None] * (2 * len(keys))
        for group, reply in zip(by_slot, replies, strict=True):
            for at, key in enumerate(group):
                index = order[key]
                heads[2 * index], heads[2 * index + 1] = reply[2 * at], reply[2 * at + 1]
        return heads

    def _by_slot(self, keys: Sequence[str]) -> list[list[str]]:
        groups: dict[int, list[str]] = {}
        for key in keys:
            groups.setdefault(self._slot(key), []).append(key)
        return list(groups.values())

    async def _per_slot(
        self, commands: Sequence[Sequence[Any]], client: Any | None = None
    ) -> list[Any]:
        """One command per slot, routed and sent as one pipeline; the first error raised."""
        if client is None:
            cluster = await self._cluster()
            try:
                replies = await self._send((await self._routed(cluster, commands))[0])
            finally:
                self._gate.release()
        else:  # the caller holds the gate
            replies = await self._send((await self._routed(client, commands))[0])
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    def _scan_targets(self) -> Sequence[ClusterNode]:
        client = self._client
        if client is None:
            raise self.closed()
        return cast(RedisCluster, client).get_primaries()

    async def _scan_page(
        self, client: Any, target: Any, cursor: int, pattern: str
    ) -> tuple[int, list[bytes]]:
        cluster = cast(RedisCluster, client)
        reply = await cluster.execute_command(
            "SCAN", cursor, "MATCH", pattern, "COUNT", 1000, target_nodes=target
        )
        cursors, keys = reply  # redis-py's cluster SCAN: ({node name: cursor}, keys)
        return int(cursors[target.name]), keys


@cache
def _cluster_parameters() -> frozenset[str]:
    """The keyword arguments of redis-py's cluster client (it takes no others)."""
    parameters = inspect.signature(RedisCluster.__init__).parameters.items()
    names = {
        name
        for name, parameter in parameters
        if parameter.kind in (parameter.KEYWORD_ONLY, parameter.POSITIONAL_OR_KEYWORD)
    }
    return frozenset(names - _NOT_FOR_A_CLUSTER - {"self"})
