"""The Redis backend against the real server (the `redis_server`/`redis_url` fixtures).

What the shared contract suite cannot see: exact key names and stored values, `created_at`
kept atomically under racing writers, TTLs, the logical database, one round trip per
operation and per batch, the pool limit, listing and purge, connection failures without the
password, corrupt stored values, URL options checked at class definition and stripped before
redis-py, Unix sockets and NOSCRIPT (on a private server, so that flushing its script cache
disturbs nobody).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit
from uuid import UUID, uuid4

import pytest

pytest.importorskip("redis")

import redis.asyncio as aioredis
from redis.asyncio.connection import Connection
from redis.exceptions import RedisError

from pydantic_toast import (
    CorruptRecordError,
    ExternalBaseModel,
    ExternalConfigDict,
    RecordNotFoundError,
    StorageConnectionError,
    StorageOperationError,
    StorageValidationError,
)
from pydantic_toast._registry import get_backend
from pydantic_toast.backends.records import Record, decode_envelope, encode_envelope
from pydantic_toast.backends.redis import RedisBackend

from .conftest import service_missing

T0 = datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


def prefix_of(url: str) -> str:
    return parse_qs(urlsplit(url).query)["prefix"][0]


def with_query(url: str, **options: object) -> str:
    extra = "&".join(f"{name}={value}" for name, value in options.items())
    return f"{url}{'&' if '?' in url else '?'}{extra}"


def define_customer(storage: str) -> type[ExternalBaseModel]:
    class Customer(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=storage)
        name: str
        email: str
        tags: list[str] = []

    return Customer


def record(class_name: str = "Batch", n: int = 0, created_at: datetime = T0) -> Record:
    return Record(uuid4(), class_name, b'{"n":%d}' % n, 1, created_at, created_at)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
async def raw(redis_server: str) -> AsyncIterator[aioredis.Redis]:
    """A plain redis-py client on the same server, to see what the backend stored."""
    client = aioredis.Redis.from_url(redis_server)
    yield client
    await client.aclose()


@pytest.fixture
async def backend(redis_url: str) -> AsyncIterator[RedisBackend]:
    backend = RedisBackend(redis_url)
    await backend.connect()
    yield backend
    await backend.disconnect()


# --- what is stored, and where --------------------------------------------------------------


async def test_key_and_value_layout(redis_url: str, raw: aioredis.Redis) -> None:
    Customer = define_customer(redis_url)
    customer = Customer(name="Ada", email="ada@example.com", tags=["vip"])
    reference = await customer.save_external()

    key = f"{prefix_of(redis_url)}:Customer:{reference['id']}"
    stored = json.loads(await raw.get(key))
    assert list(stored) == ["created_at", "updated_at", "schema_version", "class_name", "data"]
    assert stored["class_name"] == "Customer"
    assert stored["schema_version"] == 1
    assert stored["data"] == customer.model_dump(mode="json")
    metadata = customer.external_metadata
    assert metadata is not None
    assert datetime.fromisoformat(stored["created_at"]) == metadata.created_at
    assert datetime.fromisoformat(stored["updated_at"]) == metadata.updated_at
    assert await raw.type(key) == b"string"
    assert await raw.ttl(key) == -1  # no TTL unless asked for


async def test_default_prefix(redis_server: str, raw: aioredis.Redis) -> None:
    Customer = define_customer(redis_server)  # no ?prefix=
    reference = await Customer(name="Ada", email="a@example.com").save_external()
    key = f"pydantic_toast:Customer:{reference['id']}"
    try:
        assert await raw.exists(key) == 1
        assert (await Customer.load_external(reference)).name == "Ada"  # type: ignore[attr-defined]
    finally:
        await raw.delete(key)


async def test_created_at_is_kept_in_the_stored_value(
    redis_url: str, raw: aioredis.Redis, backend: RedisBackend
) -> None:
    Customer = define_customer(redis_url)
    customer = Customer(name="Ada", email="ada@example.com")
    reference = await customer.save_external()
    key = f"{prefix_of(redis_url)}:Customer:{reference['id']}"
    first = json.loads(await raw.get(key))

    for n in range(3):
        await asyncio.sleep(0.002)
        customer.name = f"Ada {n}"  # type: ignore[attr-defined]
        assert await customer.save_external() == reference
        stored = json.loads(await raw.get(key))
        assert stored["created_at"] == first["created_at"]
        assert stored["updated_at"] > first["updated_at"]
        assert stored["data"]["name"] == f"Ada {n}"

    # The saves above send the stored created_at back, so they would keep it even if the
    # write script kept nothing. Another writer of the id (a stale copy, a racing process)
    # claims a created_at of its own: not a first save (created_at != updated_at, so no SET
    # NX) and not the stored value, so only the script's SETRANGE puts the original back.
    original = datetime.fromisoformat(first["created_at"])
    claimed, now = original + timedelta(days=1), datetime.now(UTC)
    rewrite = Record(
        UUID(reference["id"]),
        "Customer",
        json.dumps({"name": "Bob", "email": "bob@example.com", "tags": []}).encode(),
        1,
        claimed,
        now,
    )
    await backend.write_record(rewrite)

    stored = json.loads(await raw.get(key))
    assert stored["created_at"] == first["created_at"]
    assert datetime.fromisoformat(stored["updated_at"]) == now
    assert stored["data"]["name"] == "Bob"
    assert rewrite.created_at == original  # the writer is told what was kept
    loaded = await Customer.load_external(reference)
    assert loaded.external_metadata is not None
    assert loaded.external_metadata.created_at == original


async def test_the_stored_created_at_wins_over_the_records(
    backend: RedisBackend, raw: aioredis.Redis
) -> None:
    first = record("Kept", 1)
    await backend.write_record(first)
    later = T0 + timedelta(days=1)
    second = Record(first.id, "Kept", b'{"n":2}', 1, later, later)

    await backend.write_record(second)

    assert second.created_at == T0  # the caller's record is told what was kept
    assert second.updated_at == later
    stored = await raw.get(f"{backend.prefix}:Kept:{first.id}")
    assert decode_envelope(stored, first.id, "Kept").created_at == T0
    assert decode_envelope(stored, first.id, "Kept").data == b'{"n":2}'


@pytest.mark.parametrize("trial", range(3))  # a read-then-write loses ~9 races in 10
@pytest.mark.parametrize("style", ["first saves", "re-saves"])
async def test_racing_writers_of_one_id_end_with_one_whole_version(
    backend: RedisBackend, raw: aioredis.Redis, style: str, trial: int
) -> None:
    id = uuid4()
    # Two instances share an id; each believes it is the first insert, with its own
    # created_at, and each saves 100 times, all at once on many connections. As first saves
    # (created_at == updated_at) they take the SET NX path first; as re-saves, the script.
    versions = {
        "a": (T0, json.dumps({"writer": "a", "fill": "a" * 5000}).encode()),
        "b": (T0 + timedelta(hours=1), json.dumps({"writer": "b", "fill": "b" * 7000}).encode()),
    }
    step = timedelta(0) if style == "first saves" else timedelta(microseconds=1)
    records = [
        Record(id, "Racer", data, 1, created, created + i * step)
        for i in range(100)
        for created, data in versions.values()
    ]

    await asyncio.gather(*(backend.write_record(r) for r in records))

    stored = decode_envelope(await raw.get(f"{backend.prefix}:Racer:{id}"), id, "Racer")
    assert stored.data in {data for _, data in versions.values()}
    assert stored.created_at in {created for created, _ in versions.values()}
    # Whoever inserted first set created_at; every later write kept it and said so.
    assert {r.created_at for r in records} == {stored.created_at}


async def test_a_first_save_onto_an_existing_record_keeps_its_created_at(
    backend: RedisBackend, raw: aioredis.Redis
) -> None:
    first = record("Twice", 1)
    await backend.write_record(first)
    later = T0 + timedelta(days=3)
    second = Record(first.id, "Twice", b'{"n":2}', 1, later, later)  # looks like a first save

    await backend.write_record(second)

    assert second.created_at == T0
    stored = decode_envelope(await raw.get(f"{backend.prefix}:Twice:{first.id}"), first.id, "X")
    assert (stored.created_at, stored.updated_at, stored.data) == (T0, later, b'{"n":2}')


async def test_a_foreign_value_at_the_key_is_overwritten_whole(
    backend: RedisBackend, raw: aioredis.Redis
) -> None:
    new = record("Foreign")
    key = f"{backend.prefix}:Foreign:{new.id}"
    for foreign in (
        b"garbage",
        b'{"created_at":"not a timestamp at all, no no no","x":1}',
        b'{"created_at":"',
    ):
        await raw.set(key, foreign)
        await backend.write_record(new)
        assert new.created_at == T0
        assert await raw.get(key) == encode_envelope(new)


# --- TTL and database -----------------------------------------------------------------------


async def test_ttl_from_the_url_is_applied_and_renewed(redis_url: str, raw: aioredis.Redis) -> None:
    Customer = define_customer(with_query(redis_url, ttl=60))
    customer = Customer(name="Ada", email="ada@example.com")
    reference = await customer.save_external()
    key = f"{prefix_of(redis_url)}:Customer:{reference['id']}"
    assert 59_000 < await raw.pttl(key) <= 60_000

    assert await raw.persist(key)
    assert await raw.ttl(key) == -1
    await customer.save_external()
    assert 59_000 < await raw.pttl(key) <= 60_000


async def test_a_model_ttl_is_applied_natively_and_wins_over_the_urls(
    redis_url: str, raw: aioredis.Redis
) -> None:
    class Session(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=with_query(redis_url, ttl=60), ttl=300)
        token: str

    session = Session(token="t")
    reference = await session.save_external()
    key = f"{prefix_of(redis_url)}:Session:{reference['id']}"
    assert 299_000 < await raw.pttl(key) <= 300_000
    assert await raw.persist(key)
    await session.save_external()  # a re-save applies the class's TTL again
    assert 299_000 < await raw.pttl(key) <= 300_000
    many = await Session.save_external_many([Session(token="a"), Session(token="b")])
    for other in many:
        assert 299_000 < await raw.pttl(f"{prefix_of(redis_url)}:Session:{other['id']}") <= 300_000


async def test_a_migrated_write_back_keeps_the_records_expiry(
    redis_url: str, raw: aioredis.Redis
) -> None:
    """The write-back keeps the record's timestamps, so it keeps its time left too: the class's
    whole ttl again would keep the key for up to twice as long as the record lives."""
    backend = await get_backend(redis_url)
    id, saved = uuid4(), datetime.now(UTC) - timedelta(seconds=200)
    old = Record(id, "Visit", b'{"page":"/"}', 1, saved, saved, ttl=timedelta(seconds=100))
    await backend.write_record(old)  # saved 200s ago under a ttl of 300s: 100s left

    class Visit(ExternalBaseModel):
        model_config = ExternalConfigDict(
            storage=redis_url, ttl=300, schema_version=2, save_migrated=True
        )
        path: str

    @Visit.migration(from_version=1)
    def rename(data: dict[str, Any]) -> dict[str, Any]:
        return {"path": data["page"]}

    loaded = await Visit.load_external({"class_name": "Visit", "id": str(id)})
    assert loaded == Visit(path="/")
    stored = await backend.read_record("Visit", id)
    assert stored is not None
    assert (stored.schema_version, stored.updated_at) == (2, saved)  # written back
    assert 98_000 < await raw.pttl(f"{prefix_of(redis_url)}:Visit:{id}") <= 100_000


async def test_sub_second_ttl_expires_and_batches_get_it_too(
    redis_url: str, raw: aioredis.Redis
) -> None:
    backend = RedisBackend(redis_url, ttl=0.3)
    await backend.connect()
    try:
        records = [record("Short", n) for n in range(3)]
        await backend.write_records(records)
        keys = [f"{backend.prefix}:Short:{r.id}" for r in records]
        for key in keys:
            assert 0 < await raw.pttl(key) <= 300
        await asyncio.sleep(0.5)
        assert await backend.read_records("Short", [r.id for r in records]) == [None] * 3
    finally:
        await backend.disconnect()


async def test_logical_database_in_the_url_is_honoured(redis_server: str, namespace: str) -> None:
    url = urlsplit(redis_server)._replace(path="/15", query=f"prefix={namespace}").geturl()
    db15 = aioredis.Redis.from_url(url.split("?")[0])
    db0 = aioredis.Redis.from_url(redis_server)
    try:
        Customer = define_customer(url)
        reference = await Customer(name="Ada", email="ada@example.com").save_external()
        key = f"{namespace}:Customer:{reference['id']}"
        assert await db15.exists(key) == 1
        assert await db0.exists(key) == 0
        assert (await Customer.load_external(reference)).name == "Ada"  # type: ignore[attr-defined]
    finally:
        keys = [k async for k in db15.scan_iter(match=f"{namespace}:*")]
        if keys:
            await db15.delete(*keys)
        await db15.aclose()
        await db0.aclose()


# --- batches --------------------------------------------------------------------------------


class CountingConnection(Connection):
    """A real connection that counts what it sends and receives (nothing is faked)."""

    sends = 0
    replies = 0

    async def send_packed_command(self, *args: Any, **kwargs: Any) -> None:
        type(self).sends += 1
        await super().send_packed_command(*args, **kwargs)

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        type(self).replies += 1
        return await super().read_response(*args, **kwargs)


class CountingBackend(RedisBackend):
    """The backend on `CountingConnection`s (the URL's scheme chooses redis-py's own class)."""

    def _new_client(self) -> Any:
        client = super()._new_client()
        client.connection_pool.connection_class = CountingConnection
        return client


async def test_batches_of_1000_are_one_round_trip_each(redis_url: str) -> None:
    backend = CountingBackend(redis_url)
    await backend.connect()
    try:
        records = [record("Bulk", n) for n in range(1000)]
        ids = [r.id for r in records]

        def counts() -> tuple[int, int]:
            return CountingConnection.sends, CountingConnection.replies

        before = counts()
        await backend.write_records(records)
        after_write = counts()
        found = await backend.read_records("Bulk", ids)
        after_read = counts()
        deleted = await backend.delete_records("Bulk", ids)
        after_delete = counts()
    finally:
        await backend.disconnect()

    assert [r.data if r else None for r in found] == [r.data for r in records]
    assert deleted == 1000
    assert (after_write[0] - before[0], after_write[1] - before[1]) == (1, 1)
    assert (after_read[0] - after_write[0], after_read[1] - after_write[1]) == (1, 1)
    assert (after_delete[0] - after_read[0], after_delete[1] - after_read[1]) == (1, 1)


async def test_single_operations_are_one_round_trip(redis_url: str) -> None:
    backend = CountingBackend(redis_url)
    await backend.connect()
    r = record("Single")
    resaved = Record(r.id, "Single", b"{}", 1, T0, T0 + timedelta(seconds=1))
    steps: list[Callable[[], Awaitable[object]]] = [
        lambda: backend.write_record(r),  # a first save: SET NX
        lambda: backend.write_record(resaved),  # a re-save: the script
        lambda: backend.read_record("Single", r.id),
        lambda: backend.read_record("Single", uuid4()),
        lambda: backend.delete(r.id, "Single"),
    ]
    try:
        for step in steps:
            sends, replies = CountingConnection.sends, CountingConnection.replies
            await step()
            assert CountingConnection.sends - sends == 1
            assert CountingConnection.replies - replies == 1
    finally:
        await backend.disconnect()


async def test_batch_write_keeps_stored_created_at_per_record(backend: RedisBackend) -> None:
    old = [record("Mixed", n) for n in range(3)]
    await backend.write_records(old)
    later = T0 + timedelta(days=2)
    again = [Record(r.id, "Mixed", b'{"n":9}', 1, later, later) for r in old]
    fresh = [record("Mixed", n, created_at=later) for n in range(2)]

    await backend.write_records([*again, *fresh])

    assert [r.created_at for r in again] == [T0] * 3
    assert [r.created_at for r in fresh] == [later] * 2
    loaded = await backend.read_records("Mixed", [r.id for r in again + fresh])
    assert [r.created_at if r else None for r in loaded] == [T0] * 3 + [later] * 2
    assert all(r is not None and r.data == b'{"n":9}' for r in loaded[:3])


async def test_large_batches_are_split_and_keep_order(backend: RedisBackend) -> None:
    records = [record("Large", n) for n in range(2500)]
    await backend.write_records(records)
    missing = uuid4()
    ids = [missing, *(r.id for r in reversed(records))]
    found = await backend.read_records("Large", ids)
    assert found[0] is None
    assert [r.data if r else None for r in found[1:]] == [r.data for r in reversed(records)]
    assert await backend.delete_records("Large", ids) == 2500


async def test_a_value_longer_than_redis_takes_is_refused_before_anything_is_sent(
    backend: RedisBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pydantic_toast.backends.redis as redis_backend

    monkeypatch.setattr(redis_backend, "MAX_VALUE_BYTES", 400)  # as if 512 MiB were this
    small, big = record("Sized", 1), record("Sized", 2)
    big.data = b'{"text":"' + b"x" * 400 + b'"}'
    for batch in ([big], [small, big]):
        with pytest.raises(StorageValidationError) as caught:
            await backend.write_records(batch)
        assert str(caught.value).startswith(f"Sized record {big.id} is ")
        assert "more than a Redis value may be (400, the server's default" in str(caught.value)
    assert await backend.read_records("Sized", [small.id, big.id]) == [None, None]


async def test_empty_batches_do_nothing(backend: RedisBackend) -> None:
    await backend.write_records([])
    assert await backend.read_records("Empty", []) == []
    assert await backend.delete_records("Empty", []) == 0


async def test_delete(backend: RedisBackend, raw: aioredis.Redis) -> None:
    a, b, c = (record("Gone", n) for n in range(3))
    await backend.write_records([a, b, c])
    assert await backend.delete_records("Gone", [a.id, b.id, uuid4()]) == 2
    assert await backend.delete(c.id, "Gone") is True
    assert await backend.delete(c.id, "Gone") is False
    assert await raw.exists(*(f"{backend.prefix}:Gone:{r.id}" for r in (a, b, c))) == 0


async def test_a_burst_beyond_the_pool_waits_for_free_connections(
    redis_url: str, raw: aioredis.Redis, namespace: str
) -> None:
    name = f"toast-{namespace}"
    backend = RedisBackend(with_query(redis_url, max_connections=2, client_name=name))
    await backend.connect()
    try:
        records = [record("Burst", n) for n in range(200)]
        await asyncio.gather(*(backend.write_record(r) for r in records))
        found = await asyncio.gather(*(backend.read_record("Burst", r.id) for r in records))
        assert [r.data if r else None for r in found] == [r.data for r in records]
        ours = [c for c in await raw.client_list() if c["name"] == name]
        assert 1 <= len(ours) <= 2
    finally:
        await backend.disconnect()
    # disconnect() closes the pool: the server sees our connections go.
    for _ in range(100):
        if not [c for c in await raw.client_list() if c["name"] == name]:
            break
        await asyncio.sleep(0.01)
    else:
        pytest.fail("the backend's connections stayed open after disconnect()")
    with pytest.raises(StorageOperationError, match="not connected"):
        await backend.read_record("Burst", records[0].id)


async def test_a_waiter_cancelled_as_it_is_handed_a_connection_passes_it_on() -> None:
    from pydantic_toast.backends.redis import _Gate

    gate = _Gate(1)
    assert gate.take() and not gate.take()
    first, second = asyncio.ensure_future(gate.wait()), asyncio.ensure_future(gate.wait())
    await asyncio.sleep(0)  # both queue
    gate.release()  # the place goes to the first waiter...
    first.cancel()  # ...cancelled before it resumes: the second gets it
    await asyncio.wait_for(second, timeout=1)
    with pytest.raises(asyncio.CancelledError):
        await first
    assert not gate.take()  # the second holds it
    cancelled = asyncio.ensure_future(gate.wait())
    await asyncio.sleep(0)
    cancelled.cancel()  # cancelled while queued: it leaves the queue
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    gate.release()
    assert gate._value == 1 and gate.take()


# --- listing and purge ----------------------------------------------------------------------


async def test_scan_lists_records_with_sizes_across_pages(
    backend: RedisBackend, raw: aioredis.Redis
) -> None:
    listed = [record("Listed", n) for n in range(2500)]  # more than one SCAN page
    other = [record("Unlisted", n) for n in range(3)]
    await backend.write_records([*listed, *other])
    prefix = backend.prefix
    # Keys under the prefix that are not records are skipped.
    await raw.set(f"{prefix}:Listed:not-a-uuid", b"x")
    await raw.set(f"{prefix}:Listed:{str(uuid4()).upper()}", b"x")
    await raw.set(f"{prefix}:Listed", b"x")
    await raw.set(f"{prefix}:sub:Listed:{uuid4()}", b"x")

    infos = [info async for info in backend.scan_records("Listed")]
    assert {info.id for info in infos} == {r.id for r in listed}
    assert all(info.class_name == "Listed" for info in infos)
    assert {info.size for info in infos} == {len(r.data) for r in listed}
    assert {info.updated_at for info in infos} == {T0}

    every = {(info.class_name, info.id) async for info in backend.scan_records()}
    assert every == {(r.class_name, r.id) for r in [*listed, *other]}


async def test_scan_takes_the_prefix_literally(redis_url: str, raw: aioredis.Redis) -> None:
    # Unescaped, "[g]*" would match "gXYZ", and both prefixes have the same length.
    globbing = RedisBackend(redis_url, prefix=f"{prefix_of(redis_url)}:[g]*")
    plain = RedisBackend(redis_url, prefix=f"{prefix_of(redis_url)}:gXYZ")
    await globbing.connect()
    await plain.connect()
    try:
        mine, theirs = record("Glob", 1), record("Glob", 2)
        await globbing.write_record(mine)
        await plain.write_record(theirs)
        assert [info.id async for info in globbing.scan_records("Glob")] == [mine.id]
        assert [info.id async for info in globbing.scan_records()] == [mine.id]
    finally:
        await globbing.disconnect()
        await plain.disconnect()


async def test_scan_of_a_corrupt_record_names_it(
    backend: RedisBackend, raw: aioredis.Redis
) -> None:
    id = uuid4()
    await raw.set(f"{backend.prefix}:Broken:{id}", b"not an envelope")
    with pytest.raises(StorageValidationError, match=str(id)):
        [info async for info in backend.scan_records("Broken")]


async def test_purge_deletes_only_old_records_of_the_class(backend: RedisBackend) -> None:
    old = [record("Aging", n) for n in range(5)]
    recent_time = datetime.now(UTC)
    recent = [record("Aging", n, created_at=recent_time) for n in range(3)]
    other = record("Bystander")
    await backend.write_records([*old, *recent, other])

    purged = await backend.purge("Aging", recent_time - timedelta(days=1), batch_size=2)

    assert purged == 5
    left = await backend.read_records("Aging", [r.id for r in old + recent])
    assert [r is not None for r in left] == [False] * 5 + [True] * 3
    assert await backend.read_record("Bystander", other.id) is not None


# --- failures -------------------------------------------------------------------------------


def assert_password_hidden(exc: BaseException, password: str) -> None:
    shown = [str(exc), repr(exc), "".join(traceback.format_exception(exc))]
    assert not [text for text in shown if password in text]


async def test_refused_connection_is_quick_names_the_host_and_hides_the_password() -> None:
    port = closed_port()
    Customer = define_customer(f"redis://:s3cretPW@127.0.0.1:{port}/0")
    started = time.monotonic()
    with pytest.raises(StorageConnectionError) as caught:
        await Customer(name="Ada", email="ada@example.com").save_external()
    assert time.monotonic() - started < 5
    assert f"127.0.0.1:{port}" in str(caught.value)
    assert isinstance(caught.value.__cause__, RedisError | OSError)
    assert_password_hidden(caught.value, "s3cretPW")
    assert caught.value.url == f"redis://:***@127.0.0.1:{port}/0"


async def test_a_server_that_never_answers_times_out(namespace: str) -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    backend = RedisBackend(f"redis://:s3cretPW@127.0.0.1:{port}/0?timeout=0.2")
    started = time.monotonic()
    try:
        with pytest.raises(StorageConnectionError) as caught:
            await backend.open()
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()
    assert accepted  # it did connect; the reply never came
    assert time.monotonic() - started < 3
    assert f"127.0.0.1:{port}" in str(caught.value)
    assert caught.value.__cause__ is not None
    assert_password_hidden(caught.value, "s3cretPW")


async def test_rediss_speaks_tls(redis_server: str) -> None:
    # The test server speaks plain RESP, so a TLS handshake fails: quickly, and as our error.
    netloc = urlsplit(redis_server).netloc
    backend = RedisBackend(f"rediss://{netloc}/0?timeout=0.5")
    started = time.monotonic()
    with pytest.raises(StorageConnectionError, match=netloc):
        await backend.open()
    assert time.monotonic() - started < 5


async def test_a_command_error_is_a_permanent_error(
    backend: RedisBackend, raw: aioredis.Redis
) -> None:
    # The server answered and refused: retrying cannot help, so it is not a connection error.
    id = uuid4()
    await raw.hset(f"{backend.prefix}:Hashed:{id}", "field", "value")
    with pytest.raises(CorruptRecordError, match=f"stored Hashed record {id} is corrupt"):
        await backend.read_record("Hashed", id)
    # MGET answers nil for such a key; the batch read must not take it for a missing record.
    with pytest.raises(CorruptRecordError, match=f"stored Hashed record {id} is corrupt"):
        await backend.read_records("Hashed", [uuid4(), id])
    corrupt: list[CorruptRecordError] = []
    listed = [info async for info in backend.scan_records("Hashed", on_corrupt=corrupt.append)]
    assert listed == [] and [error.id for error in corrupt] == [str(id)]
    with pytest.raises(StorageOperationError, match="WRONGTYPE") as caught:
        await backend.write_record(Record(id, "Hashed", b"{}", 1, T0, T0))
    assert not isinstance(caught.value, StorageConnectionError)
    assert caught.value.failed_ids == [str(id)]


@pytest.mark.parametrize(
    "stored",
    [
        b"garbage",
        b'{"a": 1}',
        b"[1, 2, 3]",
        b'{"created_at":"2024-01-02T03:04:05.678901+00:00","data":{}}',
        b"",
    ],
)
async def test_corrupt_stored_values_are_validation_errors(
    redis_url: str, raw: aioredis.Redis, stored: bytes
) -> None:
    Customer = define_customer(redis_url)
    id = uuid4()
    await raw.set(f"{prefix_of(redis_url)}:Customer:{id}", stored)
    with pytest.raises(StorageValidationError) as caught:
        await Customer.load_external({"class_name": "Customer", "id": str(id)})
    assert "Customer" in str(caught.value)
    assert str(id) in str(caught.value)


async def test_an_envelope_of_another_class_at_the_key_is_not_found(
    redis_url: str, raw: aioredis.Redis
) -> None:
    Customer = define_customer(redis_url)
    id = uuid4()
    other = Record(id, "Invoice", b'{"name":"x","email":"y"}', 1, T0, T0)
    await raw.set(f"{prefix_of(redis_url)}:Customer:{id}", encode_envelope(other))
    with pytest.raises(RecordNotFoundError) as caught:
        await Customer.load_external({"class_name": "Customer", "id": str(id)})
    assert str(caught.value).startswith(f"no Customer record with id {id}")
    assert "Invoice" not in str(caught.value)


async def test_a_record_with_a_corrupt_payload_fails_model_validation(
    redis_url: str, raw: aioredis.Redis
) -> None:
    Customer = define_customer(redis_url)
    id = uuid4()
    broken = Record(id, "Customer", b'{"name": 1}', 1, T0, T0)
    await raw.set(f"{prefix_of(redis_url)}:Customer:{id}", encode_envelope(broken))
    with pytest.raises(StorageValidationError, match=f"Customer record {id} no longer validates"):
        await Customer.load_external({"class_name": "Customer", "id": str(id)})


# --- URL options ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://127.0.0.1:6379/0?prefix=", "option prefix must be a key prefix"),
        ("redis://127.0.0.1:6379/0?prefix=a%20b", "option prefix must be a key prefix"),
        ("redis://127.0.0.1:6379/0?prefix=a%0Ab", "option prefix must be a key prefix"),
        ("redis://127.0.0.1:6379/0?prefix=a%09b", "option prefix must be a key prefix"),
        ("redis://127.0.0.1:6379/0?ttl=soon", "ttl must be at least 0.001 seconds"),
        ("redis://127.0.0.1:6379/0?ttl=-5", "ttl must be at least 0.001 seconds"),
        ("redis://127.0.0.1:6379/0?ttl=0", "ttl must be at least 0.001 seconds"),
        ("redis://127.0.0.1:6379/0?ttl=inf", "ttl must be at least 0.001 seconds"),
        ("redis://127.0.0.1:6379/0?ttl=0.0001", "ttl must be at least"),
        ("redis://127.0.0.1:6379/0?timeout=0", "timeout must be a positive number of seconds"),
        ("redis://127.0.0.1:6379/0?timeout=nan", "timeout must be a positive number of seconds"),
        ("redis://127.0.0.1:6379/0?max_connections=0", "max_connections must be an integer >= 1"),
        (
            "redis://127.0.0.1:6379/0?max_connections=many",
            "max_connections must be an integer >= 1",
        ),
        ("redis://127.0.0.1:6379/notadb", "the path of a redis URL is the database number"),
        ("redis://127.0.0.1:6379/0?db=first", "Invalid value for 'db'"),
        ("redis://127.0.0.1:6379/0?socket_timeout=x", "Invalid value for 'socket_timeout'"),
        ("redis://127.0.0.1:6379/0?prefx=typo", "unknown redis option.*prefx"),
        ("redis://127.0.0.1:99999/0", "malformed storage URL"),
    ],
)
def test_invalid_options_fail_at_class_definition(url: str, message: str) -> None:
    with pytest.raises(StorageValidationError, match=message) as caught:
        define_customer(url)
    assert "Customer" in str(caught.value)


def test_invalid_keyword_options() -> None:
    with pytest.raises(StorageValidationError, match="option prefix must be a key prefix"):
        RedisBackend("redis://127.0.0.1/0", prefix="has space")
    with pytest.raises(StorageValidationError, match=r"ttl must be at least 0\.001 seconds"):
        RedisBackend("redis://127.0.0.1/0", ttl=-1)
    with pytest.raises(StorageValidationError, match=r"unknown redis option.*socket_tiemout"):
        RedisBackend("redis://127.0.0.1/0", socket_tiemout=3)
    with pytest.raises(StorageValidationError, match="socket path"):
        RedisBackend("redis+unix://")


def test_options_are_parsed_without_io() -> None:
    # Nothing listens on a closed port: building the backend must not try.
    port = closed_port()
    backend = RedisBackend(
        f"rediss://user:pw@127.0.0.1:{port}/3?prefix=app:v1&ttl=1.5&timeout=2"
        "&max_connections=7&ssl_cert_reqs=none&health_check_interval=30"
    )
    assert (backend.prefix, backend.ttl, backend.timeout, backend.max_connections) == (
        "app:v1",
        1.5,
        2.0,
        7,
    )
    assert "pw" not in repr(backend)


async def test_library_options_are_stripped_and_the_rest_reach_redis_py(
    redis_url: str, raw: aioredis.Redis, namespace: str
) -> None:
    # Had `prefix`, `ttl`, `timeout` or `max_connections` reached redis-py, its connection
    # class would reject them; `client_name` and `health_check_interval` are redis-py's.
    name = f"toast-{namespace}"
    url = with_query(
        redis_url, ttl=30, timeout=3, max_connections=4, client_name=name, health_check_interval=5
    )
    backend = RedisBackend(url)
    await backend.connect()
    try:
        r = record("Opts")
        await backend.write_record(r)
        assert [c["name"] for c in await raw.client_list() if c["name"] == name] == [name]
        assert 0 < await raw.ttl(f"{backend.prefix}:Opts:{r.id}") <= 30
    finally:
        await backend.disconnect()


async def test_keyword_options_override_the_url(redis_url: str, raw: aioredis.Redis) -> None:
    prefix = f"{prefix_of(redis_url)}:kw"
    backend = RedisBackend(with_query(redis_url, ttl=1000), prefix=prefix, ttl=20)
    await backend.connect()
    try:
        r = record("Keyword")
        await backend.write_record(r)
        key = f"{prefix}:Keyword:{r.id}"
        assert 0 < await raw.ttl(key) <= 20
        assert (await backend.read_record("Keyword", r.id)) == r
    finally:
        await backend.disconnect()


async def test_class_names_are_checked_before_building_a_key() -> None:
    backend = RedisBackend("redis://127.0.0.1/0")  # never connected: no request is made
    for operation in (
        backend.read_record("Bad:Name*", uuid4()),
        backend.write_record(Record(uuid4(), "Bad:Name*", b"{}", 1, T0, T0)),
        backend.delete_records("Bad:Name*", [uuid4()]),
    ):
        with pytest.raises(StorageValidationError, match="invalid class name"):
            await operation


# --- a private server: Unix socket and a flushed script cache -------------------------------


@pytest.fixture
def private_socket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A redis-server of this test's own, on a Unix socket only (no TCP port)."""
    binary = shutil.which("redis-server")
    if binary is None:
        service_missing("redis-server", "not on PATH")
    directory = tmp_path_factory.mktemp("redis")
    path = directory / "redis.sock"
    process = subprocess.Popen(
        [binary, "--port", "0", "--unixsocket", str(path), "--save", "", "--appendonly", "no"],
        cwd=directory,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not path.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                service_missing("a private redis-server", "it did not start")
            time.sleep(0.02)
        yield path
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def test_unix_socket_url_with_database(private_socket: Path) -> None:
    backend = RedisBackend(f"redis+unix://{private_socket}?db=2&prefix=sock")
    await backend.connect()
    raw = aioredis.Redis(unix_socket_path=str(private_socket), db=2)
    try:
        r = record("Sock")
        await backend.write_record(r)
        assert await raw.exists(f"sock:Sock:{r.id}") == 1
        assert await backend.read_record("Sock", r.id) == r
    finally:
        await raw.aclose()
        await backend.disconnect()


async def test_a_flushed_script_cache_is_reloaded_transparently(private_socket: Path) -> None:
    backend = RedisBackend(f"redis+unix://{private_socket}?prefix=flush")
    await backend.connect()
    raw = aioredis.Redis(unix_socket_path=str(private_socket))
    try:
        first = record("Flushed")
        await backend.write_record(first)
        await raw.script_flush()
        later = T0 + timedelta(days=1)
        again = Record(first.id, "Flushed", b'{"n":2}', 1, later, later)
        await backend.write_record(again)  # NOSCRIPT, reload, retry
        assert again.created_at == T0
        await raw.script_flush()
        batch = [record("Flushed", n) for n in range(3)]
        await backend.write_records(batch)
        assert (
            len([r for r in await backend.read_records("Flushed", [r.id for r in batch]) if r]) == 3
        )
    finally:
        await raw.aclose()
        await backend.disconnect()
