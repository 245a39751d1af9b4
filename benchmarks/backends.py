"""Each backend's two sides: the library (a `Doc` class bound to the storage URL) and the raw
driver doing the same work by hand.

The raw side gets the same JSON bytes from Pydantic's serializer, sends the same statement or
command the library sends, and validates what it reads with ``model_validate_json``; it skips
only what a hand-written program would skip (reference checks, records, error mapping):

Each raw client is configured as the library configures its own by default (timeouts,
retries, hiredis when installed; the asyncpg pool's size too).

- PostgreSQL: the library's upsert and select through an asyncpg pool of the same size, once
  with the pool's default reset on release and once with a no-op ``reset=`` (the tuned floor,
  which the library itself uses). Batches: one ``unnest`` upsert, ``WHERE id = ANY($1)``.
- Redis: ``SET``/``GET`` of the same envelope bytes. The library saves with an ``EVALSHA`` Lua
  script that keeps ``created_at`` atomically, so a plain ``SET`` is the honest floor.
  Batches: ``MSET`` or a pipeline of ``SET``s, and ``MGET``.
- S3: ``put_object``/``get_object`` of the envelope on one aiobotocore client; batches run
  concurrently, at most 32 requests in flight (the library's default).
- SQLite: the same upsert, one ``execute`` (autocommit) on a WAL connection; batches one
  ``executemany`` in one transaction.
- memory: a dict of JSON bytes (the floor of "no storage at all").
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlsplit
from uuid import UUID

from benchmarks.models import CLASS_NAME, Doc, doc_class
from benchmarks.services import POSTGRES_URL, REDIS_URL, Services

COLUMNS = "id, class_name, data, schema_version, created_at, updated_at"
S3_CONCURRENCY = 32
SQLITE_IDS_PER_SELECT = 500


def _now() -> datetime:
    return datetime.now(UTC)


def envelope(data: bytes, now: datetime) -> bytes:
    """The record envelope the library stores in Redis and S3: metadata, then the model."""
    moment = now.isoformat(timespec="microseconds").encode()
    return b"".join(
        (
            b'{"created_at":"',
            moment,
            b'","updated_at":"',
            moment,
            b'","schema_version":1,"class_name":"' + CLASS_NAME.encode() + b'","data":',
            data,
            b"}",
        )
    )


def envelope_data(raw: bytes) -> bytes:
    """The model's JSON inside an envelope."""
    return raw[raw.index(b',"data":') + 8 : -1]


class RawStore(ABC):
    """The raw driver doing a save or load of a `Doc` by hand."""

    #: Whether its loads differ from the floor's (else only its saves are measured).
    distinct_loads = True

    def __init__(self, model: type[Doc]) -> None:
        self.model = model
        self.to_json = model.__pydantic_serializer__.to_json

    def validate(self, data: bytes | str) -> Doc:
        return self.model.model_validate_json(data)

    @abstractmethod
    async def open(self) -> None:
        """Connect (the library's side is connected first, so tables exist)."""

    @abstractmethod
    async def close(self) -> None:
        """Close what `open` opened."""

    @abstractmethod
    async def save(self, model: Doc, id: UUID) -> None: ...

    @abstractmethod
    async def load(self, id: UUID) -> Doc: ...

    @abstractmethod
    async def save_many(self, models: Sequence[Doc], ids: Sequence[UUID]) -> None: ...

    @abstractmethod
    async def load_many(self, ids: Sequence[UUID]) -> list[Doc]: ...

    def batch_savers(self) -> dict[str, Callable[[Sequence[Doc], Sequence[UUID]], Awaitable[None]]]:
        """Every raw way to save a batch; the best of them is the floor."""
        return {"": self.save_many}


class RawMemory(RawStore):
    def __init__(self, model: type[Doc]) -> None:
        super().__init__(model)
        self.store: dict[UUID, bytes] = {}

    async def open(self) -> None:
        self.store.clear()

    async def close(self) -> None:
        self.store.clear()

    async def save(self, model: Doc, id: UUID) -> None:
        self.store[id] = self.to_json(model)

    async def load(self, id: UUID) -> Doc:
        return self.validate(self.store[id])

    async def save_many(self, models: Sequence[Doc], ids: Sequence[UUID]) -> None:
        for model, id in zip(models, ids, strict=True):
            self.store[id] = self.to_json(model)

    async def load_many(self, ids: Sequence[UUID]) -> list[Doc]:
        return [self.validate(self.store[id]) for id in ids]


class RawSQLite(RawStore):
    def __init__(self, model: type[Doc], path: str, table: str) -> None:
        super().__init__(model)
        self.path = path
        self.table = f'"{table}"'
        self.upsert = (
            f"INSERT INTO {self.table} ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (id) DO UPDATE SET class_name = excluded.class_name,"
            " data = excluded.data, schema_version = excluded.schema_version,"
            " updated_at = excluded.updated_at"
        )
        self.select = (
            f"SELECT class_name, data, schema_version, created_at, updated_at FROM {self.table}"
            " WHERE id = ?"
        )
        self.connection: sqlite3.Connection | None = None

    async def open(self) -> None:
        self.connection = sqlite3.connect(self.path, timeout=5, isolation_level=None)
        self.connection.execute("PRAGMA journal_mode=WAL")
        self.connection.execute("PRAGMA synchronous=NORMAL")

    async def close(self) -> None:
        if self.connection is not None:
            self.connection.close()

    def _row(self, model: Doc, id: UUID, now: str) -> tuple[str, str, str, int, str, str]:
        return (str(id), CLASS_NAME, self.to_json(model).decode(), 1, now, now)

    async def save(self, model: Doc, id: UUID) -> None:
        assert self.connection is not None
        now = _now().isoformat(timespec="microseconds")
        self.connection.execute(self.upsert, self._row(model, id, now))

    async def load(self, id: UUID) -> Doc:
        assert self.connection is not None
        row = self.connection.execute(self.select, (str(id),)).fetchone()
        return self.validate(row[1])

    async def save_many(self, models: Sequence[Doc], ids: Sequence[UUID]) -> None:
        assert self.connection is not None
        now = _now().isoformat(timespec="microseconds")
        rows = [self._row(model, id, now) for model, id in zip(models, ids, strict=True)]
        self.connection.execute("BEGIN IMMEDIATE")
        self.connection.executemany(self.upsert, rows)
        self.connection.execute("COMMIT")

    async def load_many(self, ids: Sequence[UUID]) -> list[Doc]:
        assert self.connection is not None
        keys = [str(id) for id in ids]
        found: dict[str, str] = {}
        for start in range(0, len(keys), SQLITE_IDS_PER_SELECT):
            chunk = keys[start : start + SQLITE_IDS_PER_SELECT]
            statement = (
                f"SELECT id, data FROM {self.table} WHERE id IN ({', '.join('?' * len(chunk))})"
            )
            found.update(self.connection.execute(statement, chunk).fetchall())
        return [self.validate(found[key]) for key in keys]


async def _no_reset(connection: Any) -> None:
    """A pool ``reset`` that does nothing: the tuned floor."""


class RawPostgres(RawStore):
    def __init__(self, model: type[Doc], table: str, *, tuned: bool) -> None:
        super().__init__(model)
        self.tuned = tuned
        quoted = f'"{table}"'
        update = (
            " ON CONFLICT (id) DO UPDATE SET class_name = EXCLUDED.class_name,"
            " data = EXCLUDED.data, schema_version = EXCLUDED.schema_version,"
            " updated_at = EXCLUDED.updated_at"
        )
        self.upsert = f"INSERT INTO {quoted} ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6){update}"
        self.upsert_many = (
            f"INSERT INTO {quoted} ({COLUMNS}) SELECT * FROM unnest($1::uuid[], $2::text[],"
            f" $3::jsonb[], $4::integer[], $5::timestamptz[], $6::timestamptz[]){update}"
        )
        self.select = (
            "SELECT class_name, data, schema_version, created_at, updated_at"
            f" FROM {quoted} WHERE id = $1"
        )
        self.select_many = f"SELECT {COLUMNS} FROM {quoted} WHERE id = ANY($1::uuid[])"
        self.pool: Any = None

    async def open(self) -> None:
        import asyncpg  # type: ignore[import-untyped]

        options: dict[str, Any] = {"reset": _no_reset} if self.tuned else {}
        # Configured as the library's pool is by default: min 1, max 10 connections, 10 s to
        # connect, 30 s per statement.
        self.pool = await asyncpg.create_pool(
            POSTGRES_URL, min_size=1, max_size=10, timeout=10.0, command_timeout=30.0, **options
        )

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()

    async def save(self, model: Doc, id: UUID) -> None:
        now = _now()
        data = self.to_json(model).decode()
        await self.pool.execute(self.upsert, id, CLASS_NAME, data, 1, now, now)

    async def load(self, id: UUID) -> Doc:
        row = await self.pool.fetchrow(self.select, id)
        return self.validate(row[1])

    async def save_many(self, models: Sequence[Doc], ids: Sequence[UUID]) -> None:
        now = _now()
        count = len(ids)
        await self.pool.execute(
            self.upsert_many,
            ids,
            [CLASS_NAME] * count,
            [self.to_json(model).decode() for model in models],
            [1] * count,
            [now] * count,
            [now] * count,
        )

    async def load_many(self, ids: Sequence[UUID]) -> list[Doc]:
        rows = await self.pool.fetch(self.select_many, ids)
        found = {row[0]: row[2] for row in rows}
        return [self.validate(found[id]) for id in ids]


class RawRedis(RawStore):
    def __init__(self, model: type[Doc], prefix: str) -> None:
        super().__init__(model)
        self.prefix = prefix
        self.client: Any = None

    def _key(self, id: UUID) -> str:
        return f"{self.prefix}:{CLASS_NAME}:{id}"

    async def open(self) -> None:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # Configured as the library's client is by default: 10 s to connect and per reply,
        # no retries inside redis-py. Its pool is left unbounded: redis-py's bounded pool
        # fails the 65th concurrent command, where the library's makes it wait its turn.
        self.client = Redis.from_url(
            REDIS_URL, socket_timeout=10.0, socket_connect_timeout=10.0, retry=Retry(NoBackoff(), 0)
        )

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    async def save(self, model: Doc, id: UUID) -> None:
        await self.client.set(self._key(id), envelope(self.to_json(model), _now()))

    async def load(self, id: UUID) -> Doc:
        return self.validate(envelope_data(await self.client.get(self._key(id))))

    async def save_many(self, models: Sequence[Doc], ids: Sequence[UUID]) -> None:
        now = _now()
        await self.client.mset(
            {
                self._key(id): envelope(self.to_json(model), now)
                for model, id in zip(models, ids, strict=True)
            }
        )

    async def save_pipelined(self, models: Sequence[Doc], ids: Sequence[UUID]) -> None:
        now = _now()
        async with self.client.pipeline(transaction=False) as pipe:
            for model, id in zip(models, ids, strict=True):
                pipe.set(self._key(id), envelope(self.to_json(model), now))
            await pipe.execute()

    async def load_many(self, ids: Sequence[UUID]) -> list[Doc]:
        found = await self.client.mget([self._key(id) for id in ids])
        return [self.validate(envelope_data(raw)) for raw in found]

    def batch_savers(self) -> dict[str, Callable[[Sequence[Doc], Sequence[UUID]], Awaitable[None]]]:
        return {"MSET": self.save_many, "pipeline": self.save_pipelined}


class RawRedisScript(RawRedis):
    """``EVALSHA`` of the library's own write script (which keeps ``created_at``) through
    redis-py: what the script costs the server, apart from the library's Python. Its loads
    are plain GETs, measured once, as the floor's."""

    distinct_loads = False

    def __init__(self, model: type[Doc], prefix: str, script: str) -> None:
        super().__init__(model, prefix)
        self.script = script
        self.sha = ""

    async def open(self) -> None:
        await super().open()
        self.sha = await self.client.script_load(self.script)

    async def save(self, model: Doc, id: UUID) -> None:
        value = envelope(self.to_json(model), _now())
        await self.client.evalsha(self.sha, 1, self._key(id), b"0", value)

    async def save_many(self, models: Sequence[Doc], ids: Sequence[UUID]) -> None:
        now = _now()
        values = [envelope(self.to_json(model), now) for model in models]
        keys = [self._key(id) for id in ids]
        await self.client.evalsha(self.sha, len(keys), *keys, b"0", *values)

    def batch_savers(self) -> dict[str, Callable[[Sequence[Doc], Sequence[UUID]], Awaitable[None]]]:
        return {"EVALSHA": self.save_many}


class RawS3(RawStore):
    def __init__(self, model: type[Doc], endpoint: str, bucket: str, prefix: str) -> None:
        super().__init__(model)
        self.endpoint = endpoint
        self.bucket = bucket
        self.prefix = prefix
        self.client: Any = None
        self._stack = contextlib.AsyncExitStack()

    def _key(self, id: UUID) -> str:
        return f"{self.prefix}/{CLASS_NAME}/{id}.json"

    async def open(self) -> None:
        from aiobotocore.config import AioConfig  # type: ignore[import-untyped]
        from aiobotocore.session import AioSession  # type: ignore[import-untyped]

        config = AioConfig(max_pool_connections=S3_CONCURRENCY, s3={"addressing_style": "path"})
        self.client = await self._stack.enter_async_context(
            AioSession().create_client(
                "s3", endpoint_url=self.endpoint, region_name="us-east-1", config=config
            )
        )

    async def close(self) -> None:
        await self._stack.aclose()

    async def save(self, model: Doc, id: UUID) -> None:
        await self.client.put_object(
            Bucket=self.bucket,
            Key=self._key(id),
            Body=envelope(self.to_json(model), _now()),
            ContentType="application/json",
        )

    async def load(self, id: UUID) -> Doc:
        response = await self.client.get_object(Bucket=self.bucket, Key=self._key(id))
        async with response["Body"] as body:
            raw: bytes = await body.read()
        return self.validate(envelope_data(raw))

    async def save_many(self, models: Sequence[Doc], ids: Sequence[UUID]) -> None:
        gate = asyncio.Semaphore(S3_CONCURRENCY)

        async def one(model: Doc, id: UUID) -> None:
            async with gate:
                await self.save(model, id)

        await asyncio.gather(*(one(model, id) for model, id in zip(models, ids, strict=True)))

    async def load_many(self, ids: Sequence[UUID]) -> list[Doc]:
        gate = asyncio.Semaphore(S3_CONCURRENCY)

        async def one(id: UUID) -> Doc:
            async with gate:
                return await self.load(id)

        return list(await asyncio.gather(*(one(id) for id in ids)))


@dataclass
class Target:
    """One backend: the library's model class and the raw stores beside it.

    ``raws["raw"]`` is the floor every ratio is taken against. PostgreSQL also has
    ``raws["raw_default_pool"]``, a pool with asyncpg's default reset, and Redis
    ``raws["raw_evalsha"]``, the library's write script run by hand.
    """

    name: str
    url: str
    model: type[Doc]
    raws: dict[str, RawStore] = field(default_factory=dict)

    @property
    def raw(self) -> RawStore:
        return self.raws["raw"]


def _option(url: str, name: str) -> str:
    return dict(parse_qsl(urlsplit(url).query))[name]


async def open_target(name: str, services: Services) -> Target:
    """The library's side (connected by a first save) and the raw stores, opened."""
    url = services.urls[name]
    model = doc_class(url)
    target = Target(name, url, model)
    if name == "memory":
        target.raws["raw"] = RawMemory(model)
    elif name == "sqlite":
        path = urlsplit(url).path[1:]
        target.raws["raw"] = RawSQLite(model, path, _option(url, "table"))
    elif name == "postgresql":
        table = _option(url, "table")
        target.raws["raw"] = RawPostgres(model, table, tuned=True)
        target.raws["raw_default_pool"] = RawPostgres(model, table, tuned=False)
    elif name == "redis":
        prefix = _option(url, "prefix")
        target.raws["raw"] = RawRedis(model, prefix)
        # The library's script, if its module still has it under this name.
        script = getattr(
            importlib.import_module("pydantic_toast.backends.redis"), "_WRITE_SCRIPT", None
        )
        if isinstance(script, str):
            target.raws["raw_evalsha"] = RawRedisScript(model, prefix, script)
    elif name == "s3":
        target.raws["raw"] = RawS3(model, services.s3_endpoint, services.namespace, "models")
    else:
        raise ValueError(f"unknown backend {name!r}")
    # Connect the library first: it creates the tables the raw side writes to.
    await model(title="", email="", tags=[], items=[]).save_external()
    for raw in target.raws.values():
        await raw.open()
    return target
