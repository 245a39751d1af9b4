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
SCAN, reading each page's headers in one MULTI.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import re
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from functools import cache
from typing import Any, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit
from uuid import UUID

from redis.asyncio import Redis
from redis.asyncio.connection import Connection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError

from pydantic_toast.backends.base import (
    CREATED_AT_OFFSET,
    CREATED_AT_WIDTH,
    HEAD_BYTES,
    Record,
    RecordInfo,
    StorageBackend,
    check_class_name,
    decode_envelope,
    decode_envelope_info,
    encode_envelope,
)
from pydantic_toast.errors import StorageConnectionError, StorageValidationError

__all__ = ["RedisBackend"]

DEFAULT_PREFIX = "pydantic_toast"
DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_CONNECTIONS = 50
_OPTIONS = ("prefix", "ttl", "timeout", "max_connections")
_PREFIX = re.compile(r"[^\s\x00-\x1f\x7f]{1,200}")
_DB_PATH = re.compile(r"/?\d*")
# One script call writes at most this many records or (roughly) bytes: Redis runs a script
# without serving other clients, and a request must stay far below its 1 GB query buffer.
_BATCH_RECORDS = 1000
_BATCH_BYTES = 16 << 20
# The envelope's metadata header fits in its first 512 bytes (see `decode_envelope_info`).


# A stored envelope starts with these bytes, then `created_at` in a fixed width (32 characters
# for UTC) and its closing quote. The script keeps the stored `created_at` only from a value
# with exactly that shape, so a foreign value at the key is overwritten whole.
_HEAD = b'{"created_at":"'
_TIMESTAMP = r'^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%d%d%d%d[%+%-]%d%d:%d%d"$'
_QUOTE_AT = CREATED_AT_OFFSET + CREATED_AT_WIDTH  # index of the quote closing `created_at`
assert len(_HEAD) == CREATED_AT_OFFSET, "the envelope layout changed"

# KEYS: the records' keys; ARGV[1]: TTL in milliseconds ("0": none); ARGV[i + 1]: KEYS[i]'s
# envelope. Returns the `created_at` kept from the stored record (false: none), as a list
# when there are several keys. SETRANGE runs only when the new value's `created_at` differs.
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
  if string.sub(old, 1, {CREATED_AT_OFFSET}) == [==[{_HEAD.decode()}]==] then
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


class RedisBackend(StorageBackend):
    """Options (URL query or keyword): ``prefix`` of keys (default ``pydantic_toast``),
    ``ttl`` seconds every record of this URL expires after (renewed by each save; default
    none), ``timeout`` seconds to connect, to wait for a reply or for a free connection
    (default 10), and ``max_connections`` in the pool (default 50; more operations wait).
    Other query options and keyword arguments go to redis-py (``client_name``,
    ``health_check_interval``, ``ssl_ca_certs``, ``retry`` ...).
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str | None = None,
        ttl: float | None = None,
        timeout: float | None = None,
        max_connections: int | None = None,
        **client_options: Any,
    ) -> None:
        super().__init__(url)
        try:
            parts = urlsplit(url)
            host, port = parts.hostname or "localhost", parts.port or 6379
        except ValueError as exc:
            raise StorageValidationError(f"malformed redis URL: {exc}") from exc
        query = parse_qsl(parts.query, keep_blank_values=True)
        ours = {name: value for name, value in query if name in _OPTIONS}
        driver_query = urlencode([(name, value) for name, value in query if name not in _OPTIONS])
        scheme = parts.scheme.lower()
        if scheme == "redis+unix":
            # redis-py spells it unix://; the path is the socket and ?db= picks the database.
            if not parts.path:
                raise StorageValidationError("redis+unix URLs need a socket path")
            self._where = f"unix socket {parts.path}"
            driver_parts = ("unix", parts.netloc, parts.path, driver_query, "")
        elif scheme in ("redis", "rediss"):
            if _DB_PATH.fullmatch(parts.path) is None:
                raise StorageValidationError(
                    f"the path of a redis URL is the database number (/0, /15), not {parts.path!r}"
                )
            self._where = f"{host}:{port}"
            driver_parts = (scheme, parts.netloc, parts.path, driver_query, "")
        else:
            raise StorageValidationError(f"RedisBackend does not serve {scheme!r} URLs")
        self._driver_url = urlunsplit(driver_parts)

        self.prefix = prefix if prefix is not None else ours.get("prefix", DEFAULT_PREFIX)
        if not isinstance(self.prefix, str) or _PREFIX.fullmatch(self.prefix) is None:
            raise StorageValidationError(
                f"invalid redis key prefix {self.prefix!r}: 1 to 200 characters, "
                "no whitespace or control characters"
            )
        self.ttl = _number("ttl", ttl if ttl is not None else ours.get("ttl"), float)
        if self.ttl is not None and self.ttl < 0.001:
            raise StorageValidationError(
                f"redis option ttl must be at least 0.001s, not {self.ttl}"
            )
        self.timeout = _number("timeout", timeout if timeout is not None else ours.get("timeout"))
        pool_size = max_connections if max_connections is not None else ours.get("max_connections")
        self.max_connections = _number("max_connections", pool_size, int)

        # The TTL travels to the script as milliseconds: PX keeps sub-second TTLs exact.
        self._ttl_ms = b"0" if self.ttl is None else str(math.ceil(self.ttl * 1000)).encode()
        self._timeout = DEFAULT_TIMEOUT if self.timeout is None else self.timeout
        self._pool_size = self.max_connections or DEFAULT_MAX_CONNECTIONS
        self._client_options: dict[str, Any] = {
            "socket_timeout": self._timeout,
            "socket_connect_timeout": self._timeout,
            # No retries inside redis-py: the model layer retries connection failures (its
            # `retries` and `retry_backoff`). A retry here too multiplied every attempt (and
            # every timeout), and made `retries=0` not off. A dropped idle connection is still
            # noticed when it is taken from the pool, and replaced.
            "retry": Retry(NoBackoff(), 0),
            "max_connections": self._pool_size,
            **client_options,
            "decode_responses": False,
        }
        _check_driver_options(self._driver_url, self._client_options)
        self._client: Redis | None = None
        self._script: AsyncScript | None = None
        self._sha = ""
        # redis-py's plain pool fails when all connections are busy and its blocking pool
        # costs a condition variable per command; this gate makes a burst wait its turn (at
        # most `timeout` seconds) and costs nothing while a connection is free.
        self._gate = asyncio.Semaphore(self._pool_size)

    async def connect(self) -> None:
        """Open the pool and load the write script; this proves the server answers."""
        client = Redis.from_url(self._driver_url, **self._client_options)
        script = client.register_script(_WRITE_SCRIPT)
        try:
            await client.script_load(_WRITE_SCRIPT)
        except (RedisError, OSError) as exc:
            await client.aclose()
            raise self._failure(exc, "connect") from exc
        self._client, self._script, self._sha = client, script, script.sha

    async def disconnect(self) -> None:
        """Close the client and its connection pool."""
        client, self._client, self._script = self._client, None, None
        if client is not None:
            await client.aclose()

    def _key(self, class_name: str, id: UUID) -> str:
        return f"{self.prefix}:{check_class_name(class_name)}:{id}"

    async def _acquire(self) -> Redis:
        """The client, once a connection is free; release `_gate` after the command."""
        client = self._client
        if client is None:
            raise StorageConnectionError(f"redis backend for {self._where} is closed", self.url)
        if self._gate.locked():
            try:
                async with asyncio.timeout(self._timeout):
                    await self._gate.acquire()
            except TimeoutError as exc:
                raise self._failure(exc, f"get one of {self._pool_size} busy connections") from exc
        else:
            await self._gate.acquire()  # returns at once
        return client

    async def _evalsha(self, client: Redis, keys: Sequence[str], args: Sequence[bytes]) -> Any:
        """Run the write script by its SHA: one round trip, the script text sent only once."""
        try:
            return await client.execute_command("EVALSHA", self._sha, len(keys), *keys, *args)  # type: ignore[no-untyped-call]
        except NoScriptError:
            # The server lost its script cache (restart, SCRIPT FLUSH); redis-py's script
            # object loads it again and retries.
            return await cast(Any, self._script)(keys=keys, args=args)

    async def write_record(self, record: Record) -> None:
        key = self._key(record.class_name, record.id)
        value = _envelope(record)
        client = await self._acquire()
        try:
            # A first save (the model layer gives it created_at == updated_at) tries a plain
            # SET NX: when it succeeds nothing was stored, so there was no created_at to keep,
            # and it costs what a SET costs. Otherwise the script keeps the stored one.
            ttl_ms = self._ttl_ms_for(record)
            if record.created_at == record.updated_at and await client.execute_command(  # type: ignore[no-untyped-call]
                "SET", key, value, "NX", *(() if ttl_ms == b"0" else (b"PX", ttl_ms))
            ):
                return
            kept = await self._evalsha(client, (key,), (ttl_ms, value))
        except (RedisError, OSError) as exc:
            failure = self._failure(exc, f"save {record.class_name} record {record.id}")
            failure.failed_ids = [str(record.id)]
            raise failure from exc
        finally:
            self._gate.release()
        _keep_created_at(record, value, kept)

    async def read_record(self, class_name: str, id: UUID) -> Record | None:
        key = self._key(class_name, id)
        client = await self._acquire()
        try:
            raw = await client.execute_command("GET", key)  # type: ignore[no-untyped-call]
        except (RedisError, OSError) as exc:
            raise self._failure(exc, f"load {class_name} record {id}") from exc
        finally:
            self._gate.release()
        return None if raw is None else decode_envelope(raw, id, class_name)

    def _ttl_ms_for(self, record: Record) -> bytes:
        """The record's own time to live (its model's ``ttl``), else this URL's, in ms."""
        if record.ttl is None:
            return self._ttl_ms
        return str(max(1, math.ceil(record.ttl.total_seconds() * 1000))).encode()

    async def write_records(self, records: Sequence[Record]) -> None:
        """Write in script calls of up to `_BATCH_RECORDS` records: each call is atomic, the
        batch is not. A failure names in ``failed_ids`` the records of the failed call and of
        every later one; the records of earlier calls are stored."""
        by_ttl: dict[bytes, list[Record]] = {}
        for record in records:
            by_ttl.setdefault(self._ttl_ms_for(record), []).append(record)
        groups = list(by_ttl.items())  # one group, unless classes with TTLs mix
        for index, (ttl_ms, group) in enumerate(groups):
            try:
                await self._write_group(ttl_ms, group)
            except StorageConnectionError as exc:
                exc.failed_ids += [str(r.id) for _, later in groups[index + 1 :] for r in later]
                raise

    async def _write_group(self, ttl_ms: bytes, records: Sequence[Record]) -> None:
        keys = [self._key(record.class_name, record.id) for record in records]
        values = [_envelope(record) for record in records]
        kept: list[bytes | None] = []
        client = await self._acquire()
        start = 0
        try:
            while start < len(records):
                end, size = start, 0
                while end < len(records) and end - start < _BATCH_RECORDS and size < _BATCH_BYTES:
                    size += len(values[end])
                    end += 1
                chunk = await self._evalsha(client, keys[start:end], (ttl_ms, *values[start:end]))
                kept += [chunk] if end - start == 1 else chunk
                start = end
        except (RedisError, OSError) as exc:
            # The chunks before `start` are stored (each script call is atomic); the failed
            # one may or may not be, the later ones are not.
            failure = self._failure(exc, f"save {len(records)} records")
            failure.failed_ids = [str(record.id) for record in records[start:]]
            for record, value, created_at in zip(records, values, kept, strict=False):
                _keep_created_at(record, value, created_at)
            raise failure from exc
        finally:
            self._gate.release()
        for record, value, created_at in zip(records, values, kept, strict=True):
            _keep_created_at(record, value, created_at)

    async def read_records(self, class_name: str, ids: Sequence[UUID]) -> list[Record | None]:
        keys = [self._key(class_name, id) for id in ids]
        replies = await self._chunked("MGET", keys, f"load {len(keys)} {class_name} records")
        found = [raw for reply in replies for raw in reply]
        return [
            None if raw is None else decode_envelope(raw, id, class_name)
            for raw, id in zip(found, ids, strict=True)
        ]

    async def delete_records(self, class_name: str, ids: Sequence[UUID]) -> int:
        keys = [self._key(class_name, id) for id in ids]
        replies = await self._chunked("UNLINK", keys, f"delete {len(keys)} {class_name} records")
        return sum(replies)

    async def _chunked(self, command: str, keys: list[str], what: str) -> list[Any]:
        """``command`` over ``keys``, `_BATCH_RECORDS` keys per call on one connection; the
        replies, one per call."""
        replies: list[Any] = []
        client = await self._acquire()
        try:
            for start in range(0, len(keys), _BATCH_RECORDS):
                chunk = keys[start : start + _BATCH_RECORDS]
                replies.append(await client.execute_command(command, *chunk))  # type: ignore[no-untyped-call]
        except (RedisError, OSError) as exc:
            raise self._failure(exc, what) from exc
        finally:
            self._gate.release()
        return replies

    async def scan_records(self, class_name: str | None = None) -> AsyncIterator[RecordInfo]:
        """Every record under ``{prefix}:{class_name}:`` (or the whole prefix), by SCAN.

        SCAN holds nothing on the server and may list a key twice if the keyspace is resized
        meanwhile. Each page's headers and sizes come in one MULTI: a key deleted since the
        SCAN is skipped, as is any key that is not ``{prefix}:{ClassName}:{uuid}``.
        """
        pattern = _glob_escape(f"{self.prefix}:")
        pattern += "*" if class_name is None else f"{check_class_name(class_name)}:*"
        cursor: int = 0
        while True:
            client = await self._acquire()
            try:
                cursor, keys = await client.scan(cursor, match=pattern, count=_BATCH_RECORDS)
                found = [(key, parsed) for key in keys if (parsed := self._parse_key(key))]
                pipe = client.pipeline(transaction=True)
                for key, _ in found:
                    pipe.getrange(key, 0, HEAD_BYTES - 1)
                    pipe.strlen(key)
                replies = await pipe.execute() if found else []
            except (RedisError, OSError) as exc:
                raise self._failure(exc, f"list {class_name or 'all'} records") from exc
            finally:
                self._gate.release()
            for index, (_, (name, id)) in enumerate(found):
                head, size = replies[2 * index], replies[2 * index + 1]
                if size:  # 0: deleted since the scan
                    info = decode_envelope_info(head, id, size)
                    yield RecordInfo(name, id, info.size, info.updated_at)
            if cursor == 0:
                return

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

    def _failure(self, exc: BaseException, doing: str) -> StorageConnectionError:
        """Our error for a driver's, naming the server (never the password: see errors)."""
        return StorageConnectionError(
            f"redis at {self._where} could not {doing}: {type(exc).__name__}: {exc}", self.url
        )


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a SCAN MATCH pattern."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def _envelope(record: Record) -> bytes:
    """The record's envelope, with `created_at` in the fixed width the script relies on."""
    value = encode_envelope(record)
    if value[_QUOTE_AT] != ord('"'):  # an offset such as +05:30:15 is longer: use UTC
        record.created_at = record.created_at.astimezone(UTC)
        value = encode_envelope(record)
    return value


def _keep_created_at(record: Record, value: bytes, kept: bytes | None) -> None:
    """Give the caller's record the ``created_at`` the script kept, when it differs."""
    if kept is None or kept == value[CREATED_AT_OFFSET : CREATED_AT_OFFSET + CREATED_AT_WIDTH]:
        return
    try:
        record.created_at = datetime.fromisoformat(kept.decode())
    except ValueError as exc:
        raise StorageValidationError(
            f"stored {record.class_name} record {record.id} had a corrupt created_at {kept!r}"
        ) from exc


def _number(name: str, value: object, kind: type[float] | type[int] = float) -> Any:
    """Parse a positive number option, or ``None`` when absent."""
    if value is None:
        return None
    try:
        number = kind(cast(Any, value))
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not (0 < number < math.inf):
        raise StorageValidationError(
            f"redis option {name} must be a positive {kind.__name__}, not {value!r}"
        )
    return number


def _check_driver_options(driver_url: str, options: dict[str, Any]) -> None:
    """Check what redis-py will get, without I/O: it would only fail at the first connection."""
    try:
        parsed = dict(parse_url(driver_url))
    except ValueError as exc:
        raise StorageValidationError(f"invalid redis URL option: {exc}") from exc
    connection_class = options.get("connection_class") or parsed.get("connection_class")
    accepted = _parameters(connection_class or Connection) | {
        "connection_class",
        "max_connections",
        "path",
        "host",
        "port",
    }
    unknown = (set(parsed) | set(options)) - accepted
    if unknown:
        raise StorageValidationError(
            f"unknown redis option(s): {', '.join(sorted(unknown))} "
            f"(pydantic-toast's own: {', '.join(_OPTIONS)})"
        )


@cache
def _parameters(connection_class: type) -> frozenset[str]:
    """The keyword arguments a redis-py connection class and its bases accept."""
    names: set[str] = set()
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
