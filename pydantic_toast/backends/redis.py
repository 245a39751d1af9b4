"""``redis://host:port/db``, ``rediss://`` (TLS), ``redis+unix:///path.sock``: a string per record.

The key is ``{prefix}:{ClassName}:{uuid}`` and the value the record envelope: one JSON object,
metadata first and the model's fields under ``"data"``. A save runs one Lua script that reads
the stored envelope's ``created_at`` (a fixed byte range), ``SET``s the new value (with the
TTL, so a re-save renews it) and writes the old ``created_at`` back over the new one. Redis
runs a script atomically, so two savers of one id can never both see "no record" and both
claim ``created_at``, as a read-then-write would allow. A first save tries a plain ``SET NX``
before the script: when it succeeds nothing was stored, so there was nothing to keep.
A batch is one script call over many keys (fewer round trips and less client work than a
pipeline of calls), a batch read one MGET. Listing (and so purging) walks the prefix with
SCAN, reading each page's headers in one script call.

With ``wait_replicas=N`` a write is followed, on its connection, by ``WAIT N``: the save
fails (transient, so it is retried) unless N replicas confirm it within ``wait_timeout``.
The cluster and Sentinel variants (`redis_cluster`, `redis_sentinel`) are subclasses that
make their own client and, for a cluster, route batches by slot; the primitives are these.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import math
import re
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime
from functools import cache
from typing import Annotated, Any, TypeVar, cast
from urllib.parse import quote, urlencode, urlunsplit
from uuid import UUID

from pydantic import Field, model_validator
from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.connection import (
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
    parse_url,
)
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript

from pydantic_toast._errors import StorageValidationError
from pydantic_toast.backends.base import Capabilities, StorageBackend
from pydantic_toast.backends.options import BackendOptions, Count, Seconds
from pydantic_toast.backends.records import (
    CREATED_AT_OFFSET,
    CREATED_AT_WIDTH,
    HEAD_BYTES,
    UPDATED_AT_OFFSET,
    Record,
    StoredInfo,
    check_class_name,
    encode_envelope,
    id_text,
    id_texts,
    timestamp_text,
)

__all__ = ["RedisBackend"]

DEFAULT_PREFIX = "pydantic_toast"
_DB_PATH = re.compile(r"/?\d*")
# One script call writes at most this many records or (roughly) bytes: Redis runs a script
# without serving other clients, and a request must stay far below its 1 GB query buffer.
_BATCH_RECORDS = 1000
_BATCH_BYTES = 16 << 20
#: The longest value Redis takes by default (``proto-max-bulk-len``, 512 MiB).
MAX_VALUE_BYTES = 512 << 20

# Failures that go away by themselves: a connection lost or refused, a timeout, a server
# loading its data set, a replica promoted or a cluster resharding (failover). A refused login
# is a `ConnectionError` in redis-py, but a permanent one.
_TRANSIENT = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.BusyLoadingError,
    redis_errors.TryAgainError,
    redis_errors.ClusterDownError,
    redis_errors.ReadOnlyError,
    redis_errors.MasterDownError,
)
_PERMANENT = (redis_errors.AuthenticationError, redis_errors.AuthorizationError)
# What a record key holding another type (a hash, a list) reads as: not an envelope, so the
# spine reports it as a corrupt record naming class and id.
_NOT_A_STRING = b"(a key of another type)"

# A stored envelope starts with these bytes, then `created_at` in a fixed width (32 characters
# for UTC) and its closing quote. The script keeps the stored `created_at` only from a value
# with exactly that shape, so a foreign value at the key is overwritten whole.
_HEAD = b'{"created_at":"'
_TIMESTAMP = r'^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%d%d%d%d[%+%-]%d%d:%d%d"$'
_UTC_TIMESTAMP = r'^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%d%d%d%d%+00:00"$'
_QUOTE_AT = CREATED_AT_OFFSET + CREATED_AT_WIDTH  # index of the quote closing `created_at`
assert len(_HEAD) == CREATED_AT_OFFSET, "the envelope layout changed"

# KEYS: the records' keys; ARGV[1]: TTL in milliseconds ("0": none); ARGV[i + 1]: KEYS[i]'s
# envelope. Returns the `created_at` kept from the stored record where it differs from the
# one written (false: none stored, or the same), as a list when there are several keys. A
# re-save usually sends the stored `created_at` back: found equal, it is kept without
# matching the pattern, and the reply stays small. SETRANGE runs only when it differs.
_WRITE_SCRIPT = f"""
local ttl = ARGV[1]
local kept = {{}}
for i, key in ipairs(KEYS) do
  local value = ARGV[i + 1]
  local old = redis.call('GETRANGE', key, 0, {_QUOTE_AT})
  if ttl == '0' then
    redis.call('SET', key, value)
  else
    redis.call('SET', key, value, 'PX', ttl)
  end
  kept[i] = false
  local mine = string.sub(value, {CREATED_AT_OFFSET + 1}, {_QUOTE_AT + 1})
  if string.sub(old, {CREATED_AT_OFFSET + 1}) == mine then
    -- the same created_at: nothing to report
  elseif string.sub(old, 1, {CREATED_AT_OFFSET}) == [==[{_HEAD.decode()}]==] then
    local created = string.sub(old, {CREATED_AT_OFFSET + 1})
    if string.find(created, [==[{_TIMESTAMP}]==]) then
      created = string.sub(created, 1, {CREATED_AT_WIDTH})
      if created ~= string.sub(value, {CREATED_AT_OFFSET + 1}, {_QUOTE_AT}) then
        redis.call('SETRANGE', key, {CREATED_AT_OFFSET}, created)
      end
      kept[i] = created
    end
  end
end
if #KEYS == 1 then
  return kept[1]
end
return kept
"""

# KEYS: records' keys; ARGV[1]: a moment as UTC text of the fixed width. Deletes each record
# whose envelope's `updated_at` (UTC, the fixed width: what `_envelope` writes) is still before
# it; returns how many. Anything else at a key (another shape, another type) stays.
_DELETE_STALE_SCRIPT = f"""
local cutoff = ARGV[1]
local deleted = 0
for _, key in ipairs(KEYS) do
  local head = redis.pcall('GETRANGE', key, 0, {UPDATED_AT_OFFSET + CREATED_AT_WIDTH})
  if type(head) == 'string'
    and string.sub(head, 1, {CREATED_AT_OFFSET}) == [==[{_HEAD.decode()}]==]
    and string.sub(head, {UPDATED_AT_OFFSET - 15}, {UPDATED_AT_OFFSET}) == '","updated_at":"'
  then
    local updated = string.sub(head, {UPDATED_AT_OFFSET + 1})
    if string.find(updated, [==[{_UTC_TIMESTAMP}]==])
      and string.sub(updated, 1, {CREATED_AT_WIDTH}) < cutoff
    then
      deleted = deleted + redis.call('UNLINK', key)
    end
  end
end
return deleted
"""

# KEYS: records' keys; ARGV[3i - 2], ARGV[3i - 1], ARGV[3i]: KEYS[i]'s TTL in milliseconds
# ("0": none), the `updated_at` it must still have (UTC text of the fixed width, then the
# closing quote) and its new envelope. Writes each record whose stored envelope's `updated_at`
# is still that one; returns 1 where written, 0 where not, in key order.
_WRITE_UNCHANGED_SCRIPT = f"""
local written = {{}}
for i, key in ipairs(KEYS) do
  local ttl, expected, value = ARGV[3 * i - 2], ARGV[3 * i - 1], ARGV[3 * i]
  written[i] = 0
  local head = redis.pcall('GETRANGE', key, 0, {UPDATED_AT_OFFSET + CREATED_AT_WIDTH})
  if type(head) == 'string'
    and string.sub(head, 1, {CREATED_AT_OFFSET}) == [==[{_HEAD.decode()}]==]
    and string.sub(head, {UPDATED_AT_OFFSET - 15}, {UPDATED_AT_OFFSET}) == '","updated_at":"'
    and string.sub(head, {UPDATED_AT_OFFSET + 1}) == expected
  then
    if ttl == '0' then
      redis.call('SET', key, value)
    else
      redis.call('SET', key, value, 'PX', ttl)
    end
    written[i] = 1
  end
end
return written
"""

# KEYS: records' keys. Returns each key's first `HEAD_BYTES` and its length, flat; a length of
# -1 for a key of another type, 0 for a key gone since it was listed.
_HEADS_SCRIPT = f"""
local out = {{}}
for i, key in ipairs(KEYS) do
  local head = redis.pcall('GETRANGE', key, 0, {HEAD_BYTES - 1})
  if type(head) == 'table' then
    out[2 * i - 1] = ''
    out[2 * i] = -1
  else
    out[2 * i - 1] = head
    out[2 * i] = redis.call('STRLEN', key)
  end
end
return out
"""


# redis-py's connection options that pass through, from the URL or as keywords: values a URL
# carries (redis-py types the numbers and booleans among them). Its other parameters are its
# internals, or would break what this module relies on (`_REFUSED`).
_CONNECTION_OPTIONS = frozenset(
    {
        "client_name",
        "db",
        "health_check_interval",
        "lib_name",
        "lib_version",
        "password",
        "protocol",
        "retry_on_timeout",
        "socket_connect_timeout",
        "socket_keepalive",
        "socket_read_size",
        "socket_timeout",
        "ssl_ca_certs",
        "ssl_ca_data",
        "ssl_ca_path",
        "ssl_cert_reqs",
        "ssl_certfile",
        "ssl_check_hostname",
        "ssl_ciphers",
        "ssl_exclude_verify_flags",
        "ssl_include_verify_flags",
        "ssl_keyfile",
        "ssl_min_version",
        "ssl_password",
        "username",
    }
)
# Those whose values are Python objects: keyword arguments only.
_CONNECTION_KEYWORDS = frozenset(
    {"credential_provider", "driver_info", "retry", "retry_on_error", "socket_keepalive_options"}
)
_AS_UTF8 = "keys are written as UTF-8 and read back as UTF-8"
_IN_THE_URL = "the URL names the server (host and port, or the socket's path)"
_REFUSED = {
    "decode_responses": (
        "records are read as bytes; replies decoded to str would make every record read back "
        "as corrupt"
    ),
    "encoding": _AS_UTF8,
    "encoding_errors": _AS_UTF8,
    "encoder_class": "redis-py's own encoder sends keys and values as this module writes them",
    "parser_class": "the replies are read by redis-py's own parser",
    "connection_class": "the URL's scheme chooses it (redis://, rediss://, redis+unix://)",
    "event_dispatcher": "it is one of redis-py's internals, which redis-py sets up itself",
    "redis_connect_func": "it would replace redis-py's handshake (login, database, client name)",
    "host": _IN_THE_URL,
    "port": _IN_THE_URL,
    "path": _IN_THE_URL,
}


#: A key prefix: 1 to 200 characters, no whitespace or control characters.
Prefix = Annotated[
    str,
    Field(
        pattern=r"^[^\s\x00-\x1f\x7f]{1,200}$",
        description="a key prefix of 1 to 200 characters, without whitespace or control characters",
    ),
]


class RedisOptions(BackendOptions):
    label = "redis"

    prefix: Prefix = DEFAULT_PREFIX
    #: Seconds every record of this URL expires after (renewed by each save).
    ttl: (
        Annotated[float, Field(ge=0.001, allow_inf_nan=False, description="at least 0.001 seconds")]
        | None
    ) = None
    #: Seconds to connect, to wait for a reply or for a free connection.
    timeout: Seconds = 10.0
    max_connections: Count = 50
    #: Replicas that must confirm each write (``WAIT``) before a save succeeds; 0: none.
    wait_replicas: Annotated[int, Field(ge=0, le=100, description="an integer 0-100")] = 0
    #: Seconds a save waits for those replicas.
    wait_timeout: Seconds = 1.0

    @model_validator(mode="after")
    def _wait_within_timeout(self) -> RedisOptions:
        if self.wait_replicas and self.wait_timeout >= self.timeout:
            raise ValueError(
                f"wait_timeout ({self.wait_timeout:g}s) must be shorter than timeout "
                f"({self.timeout:g}s), which bounds every reply"
            )
        return self

    @classmethod
    def driver_option_names(cls) -> frozenset[str]:
        return _CONNECTION_OPTIONS & _driver_parameters()

    @classmethod
    def driver_keyword_names(cls) -> frozenset[str]:
        return _CONNECTION_KEYWORDS & _driver_parameters()

    @classmethod
    def refused_driver_options(cls) -> Mapping[str, str]:
        return _REFUSED


class RedisBackend(StorageBackend):
    """Options (URL query or keyword): ``prefix`` of keys (default ``pydantic_toast``),
    ``ttl`` seconds every record of this URL expires after (renewed by each save; default
    none), ``timeout`` seconds to connect, to wait for a reply or for a free connection
    (default 10), and ``max_connections`` in the pool (default 50; more operations wait).
    redis-py's own connection options pass through (``client_name``,
    ``health_check_interval``, ``ssl_ca_certs``, ``retry`` ...), those taking a Python object
    (``retry``) only as keywords; anything else is refused, and so is a ``db`` option naming
    another database than the URL's path.
    """

    options_model = RedisOptions
    options: RedisOptions
    capabilities = Capabilities(
        delete=True,
        conditional_delete=True,
        conditional_write=True,
        scan=True,
        keeps_created_at=True,
        batch_size=_BATCH_RECORDS,
        concurrency=1,
    )

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url, **options)
        self._where = self._locate(options)

        self.prefix = self.options.prefix
        self.ttl = self.options.ttl
        self.timeout = self.options.timeout
        self.max_connections = self.options.max_connections
        self.wait_replicas = self.options.wait_replicas
        self._wait_ms = math.ceil(self.options.wait_timeout * 1000)
        # The TTL travels to the script as milliseconds: PX keeps sub-second TTLs exact.
        self._ttl_ms = b"0" if self.ttl is None else str(math.ceil(self.ttl * 1000)).encode()
        keywords = {k: v for k, v in self.driver_options.items() if k in options}
        self._client_options: dict[str, Any] = {
            "socket_timeout": self.timeout,
            "socket_connect_timeout": self.timeout,
            # No retries inside redis-py: the model layer retries connection failures (its
            # `retries` and `retry_backoff`). A retry here too multiplied every attempt (and
            # every timeout), and made `retries=0` not off. A dropped idle connection is still
            # noticed when it is taken from the pool, and replaced.
            "retry": Retry(NoBackoff(), 0),
            "max_connections": self.max_connections,
            **keywords,
            "decode_responses": False,
        }
        self._client: Redis | None = None
        self._script: AsyncScript | None = None
        self._delete_script: AsyncScript | None = None
        self._heads_script: AsyncScript | None = None
        self._sha = ""
        # redis-py's plain pool fails when all connections are busy and its blocking pool
        # costs a condition variable per command; this gate makes a burst wait its turn (at
        # most `timeout` seconds) and costs nothing while a connection is free.
        self._gate = _Gate(self.max_connections)
        self._suspect_idle = False

    def _driver_query(self, options: dict[str, Any]) -> str:
        """The URL's query options for redis-py: less ours and less those a keyword replaces."""
        return urlencode(
            [
                (k, v)
                for k, v in self.location.query
                if k not in self.options_model.model_fields and k not in options
            ]
        )

    def _userinfo(self) -> str:
        """``user:password@`` as written in the URL (``""`` without either)."""
        location = self.location
        if location.username is None and location.password is None:
            return ""
        secret = "" if location.password is None else ":" + quote(location.password, safe="")
        return f"{quote(location.username or '', safe='')}{secret}@"

    def _locate(self, options: dict[str, Any]) -> str:
        """Check the URL's scheme and path, keep the driver's URL; return where, for messages."""
        location = self.location
        driver_query = self._driver_query(options)
        netloc = self._userinfo() + location.netloc
        database = ""
        if location.scheme == "redis+unix":
            # redis-py spells it unix://; the path is the socket and ?db= picks the database.
            if not location.path:
                raise StorageValidationError("redis+unix URLs need a socket path")
            where = f"unix socket {location.path}"
            driver_parts = ("unix", netloc, location.path, driver_query, "")
        elif location.scheme in ("redis", "rediss"):
            if _DB_PATH.fullmatch(location.path) is None:
                raise StorageValidationError(
                    f"the path of a redis URL is the database number (/0, /15), "
                    f"not {location.path!r}"
                )
            database = location.path.strip("/")
            where = f"{location.host or 'localhost'}:{location.port or 6379}"
            driver_parts = (location.scheme, netloc, location.path, driver_query, "")
        else:
            raise StorageValidationError(f"RedisBackend does not serve {location.scheme!r} URLs")
        self._driver_url = urlunsplit(driver_parts)
        _parse_driver_url(self._driver_url)
        self._check_database(database)
        return where

    def _check_database(self, database: str) -> None:
        """Refuse a ``db`` option naming another database than the URL's path (``database``,
        ``""`` when the path names none): redis-py would quietly take one of the two."""
        db = self.driver_options.get("db")
        if database and db is not None and not (str(db).isdecimal() and int(db) == int(database)):
            raise StorageValidationError(
                f"{self.options.label} option db={str(db)[:20]!r} conflicts with the database "
                f"in the URL's path ({int(database)}): name the database once, in the path"
            )

    @property
    def where(self) -> str:
        return f"redis at {self._where}"

    def _new_client(self) -> Any:
        """The redis-py client (the cluster and Sentinel variants make theirs)."""
        return Redis.from_url(self._driver_url, **self._client_options)

    async def connect(self) -> None:
        """Open the pool and load the write script; this proves the server answers."""
        client = self._new_client()
        script = client.register_script(_WRITE_SCRIPT)
        try:
            await client.script_load(_WRITE_SCRIPT)
        except BaseException:
            await client.aclose()
            raise
        self._client, self._script, self._sha = client, script, script.sha
        self._delete_script = client.register_script(_DELETE_STALE_SCRIPT)
        self._heads_script = client.register_script(_HEADS_SCRIPT)

    async def disconnect(self) -> None:
        """Close the client and its connection pool."""
        client, self._client, self._script = self._client, None, None
        if client is not None:
            await client.aclose()

    def _key(self, class_name: str, id: UUID) -> str:
        return f"{self.prefix}:{class_name}:{id_text(id)}"

    def _keys(self, class_name: str, ids: Sequence[UUID]) -> list[str]:
        """`_key` of each id, the ids spelled in one call (a batch's keys)."""
        start = f"{self.prefix}:{class_name}:"
        return [start + text for text in id_texts(ids)]

    def _record_keys(self, records: Sequence[Record]) -> list[str]:
        """`_key` of each record, the ids spelled in one call."""
        texts = id_texts([record.id for record in records])
        return [
            f"{self.prefix}:{record.class_name}:{text}"
            for record, text in zip(records, texts, strict=True)
        ]

    async def _acquire(self) -> Redis:
        """The client, once a connection is free; release `_gate` after the command."""
        client = self._client
        if client is None:
            raise self.closed()
        if self._suspect_idle:
            # A connection failed: the idle ones most likely went with it (a server restart,
            # a network cut). Close them, so that each next command connects afresh instead of
            # finding a dead connection one failure at a time.
            self._suspect_idle = False
            await self._drop_idle(client)
        if not self._gate.take():
            try:
                async with asyncio.timeout(self.timeout):
                    await self._gate.wait()
            except TimeoutError:
                raise TimeoutError(
                    f"none of {self.max_connections} busy connections was free within "
                    f"{self.timeout:g}s"
                ) from None
        return client

    async def _drop_idle(self, client: Any) -> None:
        """Close the pool's idle connections (those in use close when their command fails)."""
        await client.connection_pool.disconnect(inuse_connections=False)

    async def _evalsha(self, client: Redis, keys: Sequence[str], args: Sequence[bytes]) -> Any:
        """Run the write script by its SHA: one round trip, the script text sent only once."""
        try:
            return await client.execute_command("EVALSHA", self._sha, len(keys), *keys, *args)  # type: ignore[no-untyped-call]
        except redis_errors.NoScriptError:
            # The server lost its script cache (restart, SCRIPT FLUSH); redis-py's script
            # object loads it again and retries.
            return await cast(Any, self._script)(keys=keys, args=args)

    def _ttl_ms_for(self, record: Record) -> bytes:
        """The record's own time to live (its model's ``ttl``), else this URL's, in ms."""
        if record.ttl is None:
            return self._ttl_ms
        return str(max(1, math.ceil(record.ttl.total_seconds() * 1000))).encode()

    async def put_many(self, records: Sequence[Record]) -> list[datetime]:
        """One script call per TTL group and per `_BATCH_BYTES` of values: each call is
        atomic and keeps the stored ``created_at``."""
        if self.wait_replicas:
            return await self._put_pipelined(records)
        if len(records) == 1:
            return [await self._put_one(records[0])]
        kept: dict[UUID, datetime] = {}
        by_ttl: dict[bytes, list[Record]] = {}
        for record in records:
            by_ttl.setdefault(self._ttl_ms_for(record), []).append(record)
        # Every envelope before the first call: one that is refused must leave none written.
        groups = [
            (ttl_ms, [(record, _envelope(record)) for record in group])
            for ttl_ms, group in by_ttl.items()  # one group, unless classes with TTLs mix
        ]
        client = await self._acquire()
        try:
            for ttl_ms, pairs in groups:
                for call in _script_calls(pairs):
                    keys = self._record_keys([record for record, _ in call])
                    values = [value for _, value in call]
                    reply = await self._evalsha(client, keys, (ttl_ms, *values))
                    replies = [reply] if len(call) == 1 else reply
                    for (record, value), old in zip(call, replies, strict=True):
                        kept[record.id] = _kept_created_at(record, value, old)
        finally:
            self._gate.release()
        return [kept[record.id] for record in records]

    async def _put_pipelined(self, records: Sequence[Record]) -> list[datetime]:
        """The script calls of `put_many` (one per slot on a cluster) sent in one pipeline
        (one per node on a cluster), each node's ended by ``WAIT`` when replicas must
        confirm. A server that lost its script cache gets it again and the whole pipeline is
        sent again: the script keeps what a first run stored, so a second run changes
        nothing."""
        groups: dict[tuple[bytes, int], list[tuple[Record, str, bytes]]] = {}
        for record in records:
            key = self._key(record.class_name, record.id)
            group = groups.setdefault((self._ttl_ms_for(record), self._slot(key)), [])
            group.append((record, key, _envelope(record)))
        calls = [
            (call, ttl_ms) for (ttl_ms, _), group in groups.items() for call in _script_calls(group)
        ]
        commands = [
            [
                [key for _, key, _ in call],
                ["EVALSHA", self._sha, len(call), *(key for _, key, _ in call), ttl_ms]
                + [value for _, _, value in call],
            ]
            for call, ttl_ms in calls
        ]
        client = await self._acquire()
        try:
            replies = await self._pipeline(client, commands)
            if any(isinstance(reply, redis_errors.NoScriptError) for reply in replies):
                await client.script_load(_WRITE_SCRIPT)
                replies = await self._pipeline(client, commands)
        finally:
            self._gate.release()
        kept: dict[UUID, datetime] = {}
        for (call, _), reply in zip(calls, replies, strict=True):
            if isinstance(reply, Exception):
                raise reply
            for (record, _, value), old in zip(
                call, [reply] if len(call) == 1 else reply, strict=True
            ):
                kept[record.id] = _kept_created_at(record, value, old)
        return [kept[record.id] for record in records]

    def _slot(self, key: str) -> int:
        """Which keys may share a script call: any, on one server."""
        return 0

    async def _pipeline(self, client: Any, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Send ``[keys, command]`` pairs in one round trip; replies (errors included) in
        order. Then ``WAIT``, on the same connection, when replicas must confirm."""
        pipe = client.pipeline(transaction=False)
        for _, command in commands:
            pipe.execute_command(*command)
        if self.wait_replicas:
            pipe.execute_command("WAIT", self.wait_replicas, self._wait_ms)
        replies = await self._send(pipe)
        if self.wait_replicas:
            self._check_replicated([replies.pop()])
        return replies

    async def _send(self, pipe: Any) -> list[Any]:
        """Execute a pipeline; the replies, errors in place."""
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies

    def _check_replicated(self, confirmations: Sequence[object]) -> None:
        """Fail unless every ``WAIT`` reply counts ``wait_replicas`` replicas."""
        for confirmed in confirmations:
            if isinstance(confirmed, Exception):
                raise confirmed
            if not isinstance(confirmed, int) or confirmed < self.wait_replicas:
                raise NotReplicatedError(
                    f"{confirmed} replicas confirmed the write within "
                    f"{self._wait_ms / 1000:g}s, wait_replicas={self.wait_replicas} asks for "
                    f"more; it is on the primary, and lost if the primary fails now"
                )

    async def _put_one(self, record: Record) -> datetime:
        key = self._key(record.class_name, record.id)
        value = _envelope(record)
        ttl_ms = self._ttl_ms_for(record)
        client = await self._acquire()
        try:
            # A first save (the model layer gives it created_at == updated_at) tries a plain
            # SET NX: when it succeeds nothing was stored, so there was no created_at to keep,
            # and it costs what a SET costs. Otherwise the script keeps the stored one.
            if record.created_at == record.updated_at and await client.execute_command(  # type: ignore[no-untyped-call]
                "SET", key, value, "NX", *(() if ttl_ms == b"0" else (b"PX", ttl_ms))
            ):
                return record.created_at
            old = await self._evalsha(client, (key,), (ttl_ms, value))
        finally:
            self._gate.release()
        return _kept_created_at(record, value, old)

    async def get_many(self, class_name: str, ids: Sequence[UUID]) -> list[bytes | None]:
        one = len(ids) == 1
        keys = [self._key(class_name, ids[0])] if one else self._keys(class_name, ids)
        client = await self._acquire()
        try:
            if one:
                try:
                    return [await client.execute_command("GET", keys[0])]  # type: ignore[no-untyped-call]
                except redis_errors.ResponseError as exc:
                    if "WRONGTYPE" not in str(exc):
                        raise
                    return [_NOT_A_STRING]  # something else lives at the key: corrupt
            values = cast(list[bytes | None], await client.execute_command("MGET", *keys))  # type: ignore[no-untyped-call]
            missing = [i for i, value in enumerate(values) if value is None]
            if missing:
                # MGET answers nil for a key of another type too; ask which "missing" keys
                # exist, so that such a key reads as corrupt, as a single GET says.
                pipe = client.pipeline(transaction=False)
                for i in missing:
                    pipe.exists(keys[i])
                for i, exists in zip(missing, await pipe.execute(), strict=True):
                    if exists:
                        values[i] = _NOT_A_STRING
            return values
        finally:
            self._gate.release()

    async def delete_many(self, class_name: str, ids: Sequence[UUID]) -> int:
        keys = self._keys(class_name, ids)
        client = await self._acquire()
        try:
            return int(await client.execute_command("UNLINK", *keys))  # type: ignore[no-untyped-call]
        finally:
            self._gate.release()

    async def delete_stale(self, class_name: str, ids: Sequence[UUID], before: datetime) -> int:
        """One script call: Redis runs it atomically, so a record written again since the
        caller looked (its `updated_at` refreshed) is never deleted."""
        keys = self._keys(class_name, ids)
        cutoff = timestamp_text(before.astimezone(UTC)).encode()
        client = await self._acquire()
        try:
            script = cast(AsyncScript, self._delete_script)
            return int(await script(keys=keys, args=[cutoff], client=client))
        finally:
            self._gate.release()

    async def put_unchanged(
        self, records: Sequence[Record], expected: Sequence[datetime]
    ) -> list[bool]:
        """One script call per slot (one, on a single server) and per `_BATCH_BYTES`,
        sent in one pipeline (ended by ``WAIT`` when replicas must confirm): Redis runs each
        call atomically, so a record saved since it was read is passed over. The stored
        `updated_at` is compared as the fixed-width UTC text every write stores."""
        groups: dict[int, list[tuple[str, bytes, bytes, bytes]]] = {}
        for record, updated_at in zip(records, expected, strict=True):
            key = self._key(record.class_name, record.id)
            text = timestamp_text(updated_at.astimezone(UTC)).encode() + b'"'
            value = _envelope(record)
            groups.setdefault(self._slot(key), []).append(
                (key, self._ttl_ms_for(record), text, value)
            )
        calls = [call for group in groups.values() for call in _script_calls(group)]
        commands = [
            [
                [key for key, *_ in call],
                [
                    "EVAL",
                    _WRITE_UNCHANGED_SCRIPT,
                    len(call),
                    *(key for key, *_ in call),
                    *(part for _, *parts in call for part in parts),
                ],
            ]
            for call in calls
        ]
        client = await self._acquire()
        try:
            replies = await self._pipeline(client, commands)
        finally:
            self._gate.release()
        written: dict[str, bool] = {}
        for call, reply in zip(calls, replies, strict=True):
            if isinstance(reply, Exception):
                raise reply
            for (key, *_), done in zip(call, reply, strict=True):
                written[key] = bool(done)
        return [written[self._key(record.class_name, record.id)] for record in records]

    async def scan(self, class_name: str | None) -> AsyncIterator[StoredInfo]:
        """Every record under ``{prefix}:{class_name}:`` (or the whole prefix), by SCAN.

        SCAN holds nothing on the server and may list a key twice if the keyspace is resized
        meanwhile. Each page's headers and sizes come in one script call (one command of many
        keys costs the client a fraction of a pipeline of two commands per key): a key deleted
        since the SCAN is skipped, as is any key that is not ``{prefix}:{ClassName}:{uuid}``.
        """
        pattern = _glob_escape(f"{self.prefix}:")
        pattern += "*" if class_name is None else f"{class_name}:*"
        for target in self._scan_targets():
            cursor: int = 0
            while True:
                client = await self._acquire()
                try:
                    cursor, keys = await self._scan_page(client, target, cursor, pattern)
                    found = [parsed for key in keys if (parsed := self._parse_key(key))]
                    replies = (
                        await self._heads(client, [self._key(n, i) for n, i in found])
                        if found
                        else []
                    )
                finally:
                    self._gate.release()
                for index, (name, id) in enumerate(found):
                    head, size = replies[2 * index], replies[2 * index + 1]
                    if size < 0:  # a key of another type
                        yield StoredInfo(id, name, 1, None, _NOT_A_STRING)
                    elif size:  # 0: deleted since the scan
                        yield StoredInfo(id, name, size, None, head)
                if cursor == 0:
                    break

    async def _heads(self, client: Any, keys: list[str]) -> list[Any]:
        """Each key's first `HEAD_BYTES` and its length, flat (see `_HEADS_SCRIPT`)."""
        script = cast(AsyncScript, self._heads_script)
        return cast(list[Any], await script(keys=keys, client=client))

    def _scan_targets(self) -> Sequence[Any]:
        """What `scan` walks in turn: the one server (every primary of a cluster)."""
        return (None,)

    async def _scan_page(
        self, client: Any, target: Any, cursor: int, pattern: str
    ) -> tuple[int, list[bytes]]:
        """One SCAN page of ``target``: the next cursor and the keys."""
        page: tuple[int, list[bytes]] = await client.scan(
            cursor, match=pattern, count=_BATCH_RECORDS
        )
        return page

    def _parse_key(self, key: bytes | str) -> tuple[str, UUID] | None:
        """``(class_name, id)`` of one of our record keys, or ``None`` for any other key."""
        text = key.decode(errors="replace") if isinstance(key, bytes) else key
        if not text.startswith(f"{self.prefix}:"):
            return None
        name, _, id_text = text[len(self.prefix) + 1 :].rpartition(":")
        try:
            id = UUID(id_text)
            check_class_name(name)
        except (ValueError, StorageValidationError):
            return None
        return (name, id) if str(id) == id_text else None

    def is_transient(self, exc: BaseException) -> bool:
        if isinstance(exc, _PERMANENT):
            return False
        if isinstance(exc, redis_errors.ConnectionError):
            self._suspect_idle = True
        return isinstance(exc, (*_TRANSIENT, NotReplicatedError)) or super().is_transient(exc)


class _Gate:
    """At most ``size`` holders at once, first come first served: `take` is a plain test
    while one is free (`asyncio.Semaphore` costs a coroutine and two scans of its waiters per
    command); `wait` queues, and `release` hands the freed place to the first waiter."""

    __slots__ = ("_value", "_waiters")

    def __init__(self, size: int) -> None:
        self._value = size  # free places
        self._waiters: deque[asyncio.Future[None]] = deque()

    def take(self) -> bool:
        if self._value > 0 and not self._waiters:
            self._value -= 1
            return True
        return False

    async def wait(self) -> None:
        """Queue for a place; on return the caller holds one."""
        if self.take():
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            await future
        except BaseException:
            if future.done() and not future.cancelled():
                self.release()  # handed a place, then cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(future)
            raise

    def release(self) -> None:
        while self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                future.set_result(None)  # the place goes to it directly
                return
        self._value += 1


class NotReplicatedError(Exception):
    """Fewer replicas than ``wait_replicas`` confirmed a write within ``wait_timeout``
    (transient: a replica resyncing after a failover catches up)."""


def _parse_driver_url(url: str) -> dict[str, Any]:
    """redis-py's reading of a URL (its query typed); a bad value fails at definition."""
    try:
        return dict(parse_url(url))
    except ValueError as exc:
        raise StorageValidationError(f"invalid redis URL option: {exc}") from exc


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a SCAN MATCH pattern."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


_Item = TypeVar("_Item", bound=tuple[Any, ...])


def _script_calls(items: Sequence[_Item]) -> list[Sequence[_Item]]:
    """``items`` (tuples ending with the value to store) cut into the runs one script call
    takes: at most `_BATCH_RECORDS` of them and about `_BATCH_BYTES` of values, so that no
    call blocks the server for long or outgrows its query buffer."""
    calls: list[Sequence[_Item]] = []
    start = 0
    while start < len(items):
        end, size = start, 0
        while end < len(items) and size < _BATCH_BYTES and end - start < _BATCH_RECORDS:
            size += len(items[end][-1])
            end += 1
        calls.append(items[start:end])
        start = end
    return calls


def _envelope(record: Record) -> bytes:
    """The record's envelope, with `created_at` in the fixed width the script relies on;
    one longer than a Redis value may be is refused before anything is sent (the server
    would reset the connection, which reads as a failure worth retrying)."""
    if record.updated_at.utcoffset():  # UTC, so that the delete script can compare it as text
        record.updated_at = record.updated_at.astimezone(UTC)
    value = encode_envelope(record)
    if value[_QUOTE_AT] != ord('"'):  # an offset such as +05:30:15 is longer: use UTC
        record.created_at = record.created_at.astimezone(UTC)
        value = encode_envelope(record)
    if len(value) > MAX_VALUE_BYTES:
        raise StorageValidationError(
            f"{record.class_name} record {record.id} is {len(value)} bytes stored, more than "
            f"a Redis value may be ({MAX_VALUE_BYTES}, the server's default "
            "proto-max-bulk-len): compress it (compress_above) or keep it elsewhere"
        )
    return value


def _kept_created_at(record: Record, value: bytes, kept: bytes | None) -> datetime:
    """The ``created_at`` the script kept (``None``: nothing was stored, or the record's own
    was, so the record's own); parsed only when it differs from the one just written."""
    if kept is None or kept == value[CREATED_AT_OFFSET:_QUOTE_AT]:
        return record.created_at
    try:
        return datetime.fromisoformat(kept.decode())
    except ValueError:
        return record.created_at  # the record then reads back as corrupt


@cache
def _driver_parameters() -> frozenset[str]:
    """The keyword arguments the installed redis-py's connection classes (and their bases)
    accept: an option an older redis-py lacks is refused when the model is defined."""
    names: set[str] = set()
    for connection_class in (Connection, SSLConnection, UnixDomainSocketConnection):
        for cls in connection_class.__mro__:
            init = cls.__dict__.get("__init__")
            if init is not None:
                names.update(
                    name
                    for name, parameter in inspect.signature(init).parameters.items()
                    if parameter.kind in (parameter.KEYWORD_ONLY, parameter.POSITIONAL_OR_KEYWORD)
                )
    names.discard("self")
    return frozenset(names)
