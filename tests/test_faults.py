"""Faults on the wire, for real: PostgreSQL, Redis and S3 behind a proxy that fails on command.

Every backend talks to its real server through `tests.faultproxy.FaultProxy`, which refuses,
stalls, resets or cuts connections when a test says so; two tests also stop and restart a
throwaway Redis and a throwaway PostgreSQL cluster. What must hold:

- a server that is down or silent is a `StorageConnectionError` within a bound set by the
  backend's ``timeout`` options (each operation is wrapped in an outer `asyncio.wait_for`, so a
  hang fails its test instead of the suite), naming the host and never showing the password;
- the pools recover: once the server is back the next operations succeed, in the same process;
- the model's ``retries`` ride over a reset connection, and ``retries=0`` really is off;
- a cancelled or timed-out save leaves the pool healthy;
- a save cut at any point leaves the old record or the new one, complete; a failed batch
  says which records it may not have written.

The password of every URL (for S3, the AWS secret key) must appear in no message, ``repr``,
formatted traceback (chained causes included) or log record, DEBUG level, of any logger.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit
from uuid import UUID

import pytest

from pydantic_toast import (
    ExternalBaseModel,
    ExternalConfigDict,
    RecordNotFoundError,
    StorageConnectionError,
    aclose,
    close,
)
from pydantic_toast._registry import get_backend

from .conftest import POSTGRES_URL, service_missing
from .faultproxy import FaultProxy

T = TypeVar("T")

PASSWORD = "Fault-s3cr3t-PW-4f1c"
# The outer bound of every awaited operation: far above any timeout configured here, so only
# a hang reaches it.
HANG = 30.0
PG_BIN = Path(os.environ.get("TOAST_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))

# The per-backend timeouts these tests configure, and what one attempt may take at most when
# the server is silent: PostgreSQL waits `command_timeout` for the reply and up to as long
# again for its cancel request; Redis waits `timeout`; S3 `timeout` to connect plus, for a
# request with a body, `timeout` per started MiB and `timeout` for the response.
# Margins absorb a loaded machine.
TIMEOUTS = {
    "postgresql": "timeout=1&command_timeout=1",
    "redis": "timeout=0.5",
    "s3": "timeout=0.5",
}
ATTEMPT_BOUND = {"postgresql": 2.0, "redis": 0.5, "s3": 1.5}
MARGIN = 1.5
POOL_SIZE = 4


# --- servers and targets ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, process: subprocess.Popen[bytes] | None, what: str) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if (process is not None and process.poll() is not None) or time.monotonic() > deadline:
                service_missing(what, f"it did not start on port {port}")
            time.sleep(0.02)


class ThrowawayRedis:
    """A redis-server of the test's own: no persistence, a password, a port of its own."""

    def __init__(self, password: str | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            service_missing("redis-server", "not on PATH")
        self.binary = str(binary)
        self.port = free_port()
        self.password = password
        self.directory = tempfile.mkdtemp(prefix="toast-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no"]
        if self.password:
            command += ["--requirepass", self.password]
        self.process = subprocess.Popen(
            command, cwd=self.directory, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for_port(self.port, self.process, "a throwaway redis-server")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            process.kill()  # a crash, not a polite shutdown
            process.wait(timeout=10)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


class ThrowawayPostgres:
    """A PostgreSQL cluster of the test's own (initdb into a temporary directory), run as the
    ``postgres`` user when the tests run as root, on a free loopback port."""

    def __init__(self) -> None:
        if not (PG_BIN / "initdb").exists():
            service_missing("PostgreSQL server binaries", f"no initdb in {PG_BIN}")
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            if shutil.which("runuser") is None:
                service_missing("a throwaway PostgreSQL", "running as root without runuser")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.directory = Path(tempfile.mkdtemp(prefix="toast-pg-"))
        if self.as_user:
            shutil.chown(self.directory, "postgres", "postgres")
        self.data = self.directory / "data"
        self.port = free_port()
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-N")

    def _run(self, program: str, *arguments: str) -> None:
        result = subprocess.run(
            [*self.as_user, str(PG_BIN / program), *arguments],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            service_missing(f"a throwaway PostgreSQL ({program})", result.stderr.strip()[-500:])

    def start(self) -> None:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = str(self.directory / "log")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", log, "-w", "start")

    def stop(self) -> None:
        # "immediate": the server dies without closing its connections politely, as in a crash.
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def remove(self) -> None:
        subprocess.run(
            [
                *self.as_user,
                str(PG_BIN / "pg_ctl"),
                "-D",
                str(self.data),
                "-m",
                "immediate",
                "stop",
            ],
            capture_output=True,
            timeout=60,
            check=False,
        )
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture(scope="module")
def secure_redis() -> Iterator[ThrowawayRedis]:
    """A password-protected Redis for this module (the shared one has no password)."""
    try:
        import redis  # noqa: F401
    except ImportError as exc:
        service_missing("redis-py", str(exc))
    server = ThrowawayRedis(PASSWORD)
    server.start()
    try:
        yield server
    finally:
        server.remove()


@dataclass
class Target:
    """One backend behind a proxy: how to build its URL and how to read what it stored."""

    kind: str
    upstream: tuple[str, int]
    url_for: Callable[[int, str], str]
    raw_read: Callable[[str, UUID], Awaitable[dict[str, Any] | None]]
    raw_ids: Callable[[str], Awaitable[set[UUID]]]
    secret: str = PASSWORD
    extras: dict[str, Any] = field(default_factory=dict)

    def url(self, proxy: FaultProxy, options: str = "") -> str:
        query = "&".join(filter(None, [TIMEOUTS[self.kind], options]))
        return self.url_for(proxy.port, query)

    @property
    def attempt_bound(self) -> float:
        return ATTEMPT_BOUND[self.kind]


def postgresql_target(namespace: str) -> Target:
    import asyncpg

    async def raw_read(class_name: str, id: UUID) -> dict[str, Any] | None:
        connection = await asyncpg.connect(POSTGRES_URL)
        try:
            row = await connection.fetchrow(
                f'SELECT class_name, data::text FROM "{namespace}" WHERE id = $1', id
            )
        finally:
            await connection.close()
        if row is None:
            return None
        assert row[0] == class_name
        data: dict[str, Any] = json.loads(row[1])
        return data

    async def raw_ids(class_name: str) -> set[UUID]:
        connection = await asyncpg.connect(POSTGRES_URL)
        try:
            rows = await connection.fetch(
                f'SELECT id FROM "{namespace}" WHERE class_name = $1', class_name
            )
        finally:
            await connection.close()
        return {row[0] for row in rows}

    server = urlsplit(POSTGRES_URL)
    user, database = server.username or "postgres", server.path or "/postgres"

    def url_for(port: int, query: str) -> str:
        # The test server trusts every login: the password is there to be hidden, not checked.
        return (
            f"postgresql://{user}:{PASSWORD}@127.0.0.1:{port}{database}"
            f"?table={namespace}&max_size={POOL_SIZE}&application_name={namespace}&{query}"
        )

    host, port = _host_port(POSTGRES_URL, 5432)
    return Target("postgresql", (host, port), url_for, raw_read, raw_ids)


def redis_target(namespace: str, server: ThrowawayRedis) -> Target:
    import redis.asyncio as aioredis

    def client() -> aioredis.Redis:
        return aioredis.Redis(host="127.0.0.1", port=server.port, password=PASSWORD)

    async def raw_read(class_name: str, id: UUID) -> dict[str, Any] | None:
        raw = client()
        try:
            value = await raw.get(f"{namespace}:{class_name}:{id}")
        finally:
            await raw.aclose()
        if value is None:
            return None
        envelope = json.loads(value)
        assert envelope["class_name"] == class_name
        data: dict[str, Any] = envelope["data"]
        return data

    async def raw_ids(class_name: str) -> set[UUID]:
        raw = client()
        try:
            keys = [key async for key in raw.scan_iter(match=f"{namespace}:{class_name}:*")]
        finally:
            await raw.aclose()
        return {UUID(key.decode().rpartition(":")[2]) for key in keys}

    def url_for(port: int, query: str) -> str:
        return (
            f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
            f"?prefix={namespace}&max_connections={POOL_SIZE}&{query}"
        )

    return Target("redis", ("127.0.0.1", server.port), url_for, raw_read, raw_ids)


def s3_target(endpoint: str, bucket: str) -> Target:
    import boto3

    client: Any = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")

    async def raw_read(class_name: str, id: UUID) -> dict[str, Any] | None:
        def read() -> bytes | None:
            try:
                body: bytes = client.get_object(
                    Bucket=bucket, Key=f"models/{class_name}/{id}.json"
                )["Body"].read()
            except client.exceptions.NoSuchKey:
                return None
            return body

        value = await asyncio.to_thread(read)
        if value is None:
            return None
        envelope = json.loads(value)
        assert envelope["class_name"] == class_name
        data: dict[str, Any] = envelope["data"]
        return data

    async def raw_ids(class_name: str) -> set[UUID]:
        def listing() -> list[str]:
            pages = client.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=f"models/{class_name}/"
            )
            return [item["Key"] for page in pages for item in page.get("Contents") or []]

        keys = await asyncio.to_thread(listing)
        return {UUID(key.rpartition("/")[2].removesuffix(".json")) for key in keys}

    def url_for(port: int, query: str) -> str:
        return (
            f"s3://{bucket}/models?endpoint_url=http://127.0.0.1:{port}"
            f"&max_concurrency={POOL_SIZE}&{query}"
        )

    host, port = _host_port(endpoint, 80)
    return Target("s3", (host, port), url_for, raw_read, raw_ids, extras={"client": client})


def _host_port(url: str, default: int) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or default


@pytest.fixture(params=["postgresql", "redis", "s3"])
def target(
    request: pytest.FixtureRequest, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Target]:
    """One backend's real server, with a namespace (table, key prefix, bucket) of the test's
    own that is removed afterwards."""
    kind = request.param
    if kind == "postgresql":
        request.getfixturevalue("postgresql_url")  # the server, and dropping the table after
        yield postgresql_target(namespace)
    elif kind == "redis":
        server: ThrowawayRedis = request.getfixturevalue("secure_redis")
        yield redis_target(namespace, server)
        import redis

        raw = redis.Redis(host="127.0.0.1", port=server.port, password=PASSWORD)
        try:
            keys = list(raw.scan_iter(match=f"{namespace}:*"))
            if keys:
                raw.delete(*keys)
        finally:
            raw.close()
    else:
        endpoint: str = request.getfixturevalue("s3_endpoint")
        bucket: str = request.getfixturevalue("s3_bucket")
        # S3 URLs carry no credentials: the secret to hide is the AWS secret key.
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", PASSWORD)
        s3 = s3_target(endpoint, bucket)
        yield s3
        client = s3.extras["client"]
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        keys = [{"Key": item["Key"]} for page in pages for item in page.get("Contents") or []]
        for start in range(0, len(keys), 1000):
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys[start : start + 1000]})
        client.delete_bucket(Bucket=bucket)


@pytest.fixture
def proxy(target: Target) -> Iterator[FaultProxy]:
    with FaultProxy(*target.upstream) as running:
        yield running


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Every log record of every logger, DEBUG and up."""
    caplog.set_level(logging.DEBUG)
    return caplog


# --- helpers ----------------------------------------------------------------------------------


def define(storage: str, retries: int = 2, backoff: float = 0.01) -> Any:
    """A model on ``storage`` (typed Any: a type checker does not know its fields)."""

    class Item(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=storage, retries=retries, retry_backoff=backoff)
        name: str
        payload: str = ""

    return Item


async def bounded(operation: Awaitable[T]) -> T:
    """Await ``operation``; a hang fails the test (TimeoutError) instead of blocking the suite."""
    return await asyncio.wait_for(operation, HANG)


async def timed_failure(operation: Awaitable[Any]) -> tuple[StorageConnectionError, float]:
    """The `StorageConnectionError` ``operation`` raises, and how long that took."""
    started = time.monotonic()
    with pytest.raises(StorageConnectionError) as caught:
        await bounded(operation)
    elapsed = time.monotonic() - started
    print(f"failed in {elapsed:.3f}s: {str(caught.value)[:160]}")  # shown by pytest -s
    return caught.value, elapsed


def assert_secret_hidden(
    secret: str, logs: pytest.LogCaptureFixture, *errors: BaseException
) -> None:
    shown: list[str] = []
    for error in errors:
        # format_exception walks __cause__ and __context__: the driver's errors are in it.
        shown += [str(error), repr(error), "".join(traceback.format_exception(error))]
    shown += [logs.text, *(record.getMessage() for record in logs.records)]
    leaks = [text[:300] for text in shown if secret in text]
    assert not leaks, f"the secret leaked: {leaks}"


def names_host(error: StorageConnectionError, proxy: FaultProxy) -> bool:
    return proxy.address in str(error)


async def healthy(Item: Any, count: int = 100, concurrency: int = 2 * POOL_SIZE) -> None:
    """``count`` operations (half saves, half loads of them), ``concurrency`` at a time; every
    one must succeed."""
    gate = asyncio.Semaphore(concurrency)

    async def one(n: int) -> None:
        async with gate:
            item = Item(name=f"healthy-{n}")
            reference = await item.save_external()
            assert await Item.load_external(reference) == item

    await bounded(asyncio.gather(*(one(n) for n in range(count // 2))))


async def settled(operation: Callable[[], Awaitable[T]], attempts: int = 3) -> T:
    """``operation`` once the fault is healed, retried after a transient failure: a class with
    ``retries=0`` (so that the fault itself fails at once) gets no retry from the library, and
    a check that follows the fault must not fail on a server that answers slowly for a moment
    (moto, late in a long suite, with a 0.5 s timeout)."""
    for _ in range(attempts - 1):
        try:
            return await bounded(operation())
        except StorageConnectionError:
            await asyncio.sleep(0.2)
    return await bounded(operation())


async def wait_until(condition: Callable[[], bool], within: float = 3.0) -> bool:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


# --- a server that is down ------------------------------------------------------------------


async def test_a_server_that_is_down_fails_fast_names_the_host_hides_the_secret(
    target: Target, proxy: FaultProxy, logs: pytest.LogCaptureFixture
) -> None:
    url = target.url(proxy)
    Item = define(url)  # default retries: 2
    proxy.refuse()
    error, elapsed = await timed_failure(Item(name="never").save_external())
    assert elapsed < 3, elapsed
    assert names_host(error, proxy), str(error)
    assert error.__cause__ is not None
    if target.kind != "s3":
        assert ":***@" in error.url and PASSWORD not in error.url

    # Up, then down again: a connected backend fails as fast.
    proxy.heal()
    reference = await bounded(Item(name="saved").save_external())
    proxy.refuse()
    load_error, elapsed = await timed_failure(Item.load_external(reference))
    assert elapsed < 3, elapsed
    assert names_host(load_error, proxy), str(load_error)
    save_error, elapsed = await timed_failure(Item(name="lost").save_external())
    assert elapsed < 3, elapsed
    assert_secret_hidden(target.secret, logs, error, load_error, save_error)

    # Back: the same process, the same backend, no restart.
    proxy.heal()
    assert (await bounded(Item.load_external(reference))).name == "saved"


# --- a server that stalls ---------------------------------------------------------------------


async def test_a_stalled_server_fails_within_the_timeout_never_hangs(
    target: Target, proxy: FaultProxy, logs: pytest.LogCaptureFixture
) -> None:
    url = target.url(proxy)
    Item = define(url, retries=0)
    reference = await bounded(Item(name="before").save_external())
    bound = target.attempt_bound + MARGIN

    proxy.stall()
    errors: list[BaseException] = []
    operations = (
        lambda: Item(name="stalled").save_external(),
        lambda: Item.load_external(reference),
    )
    for operation in operations:
        error, elapsed = await timed_failure(operation())
        assert elapsed < bound, (elapsed, str(error))
        assert names_host(error, proxy), str(error)
        errors.append(error)

    # A burst of saves six times the pool: waiting for a connection is bounded too.
    # (Not loads: concurrent loads are coalesced into one batch read.)
    started = time.monotonic()
    outcomes = await bounded(
        asyncio.gather(
            *(Item(name=f"burst-{n}").save_external() for n in range(6 * POOL_SIZE)),
            return_exceptions=True,
        )
    )
    elapsed = time.monotonic() - started
    print(f"{target.kind}: a burst of {len(outcomes)} saves failed in {elapsed:.3f}s")
    assert all(isinstance(outcome, StorageConnectionError) for outcome in outcomes), outcomes
    assert elapsed < 2 * bound, elapsed
    errors += [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    assert_secret_hidden(target.secret, logs, *errors)

    proxy.heal()
    Item = define(url, retries=2)
    assert (await bounded(Item.load_external(reference))).name == "before"
    await healthy(Item, 20)


async def test_a_server_stalled_from_the_start_fails_connecting_within_the_timeout(
    target: Target, proxy: FaultProxy, logs: pytest.LogCaptureFixture
) -> None:
    Item = define(target.url(proxy), retries=0)
    proxy.stall()
    started = time.monotonic()
    # Several callers at once share one connection attempt rather than queueing for their own.
    outcomes = await bounded(
        asyncio.gather(
            *(Item(name=f"{n}").save_external() for n in range(8)), return_exceptions=True
        )
    )
    elapsed = time.monotonic() - started
    print(f"{target.kind}: 8 saves connecting to a stalled server failed in {elapsed:.3f}s")
    assert all(isinstance(outcome, StorageConnectionError) for outcome in outcomes), outcomes
    assert elapsed < 2 * (target.attempt_bound + MARGIN), elapsed
    assert names_host(outcomes[0], proxy), str(outcomes[0])
    assert_secret_hidden(target.secret, logs, *outcomes)
    proxy.heal()
    await healthy(define(target.url(proxy)), 20)


async def test_with_retries_a_stall_costs_at_most_every_attempt(
    target: Target, proxy: FaultProxy, logs: pytest.LogCaptureFixture
) -> None:
    Item = define(target.url(proxy), retries=2, backoff=0.01)
    reference = await bounded(Item(name="before").save_external())
    proxy.stall()
    error, elapsed = await timed_failure(Item.load_external(reference))
    assert elapsed < 3 * target.attempt_bound + 2 * MARGIN, elapsed
    assert_secret_hidden(target.secret, logs, error)
    proxy.heal()
    assert (await bounded(Item.load_external(reference))).name == "before"


# --- connections cut mid-run ------------------------------------------------------------------


@pytest.mark.parametrize("retries", [2, 0])
async def test_connections_cut_mid_run_recover(
    target: Target, proxy: FaultProxy, retries: int, logs: pytest.LogCaptureFixture
) -> None:
    Item = define(target.url(proxy), retries=retries)
    references = [await bounded(Item(name=f"{n}").save_external()) for n in range(5)]
    failures: list[StorageConnectionError] = []
    failed_calls: list[int] = []
    cuts = 0
    for round_ in range(3):
        # Fill the pool, then cut every connection while it is idle.
        await bounded(asyncio.gather(*(Item.load_external(r) for r in references)))
        cuts += proxy.cut()
        for n in range(10):
            try:
                if n % 2:
                    await bounded(Item.load_external(references[n % 5]))
                else:
                    await bounded(Item(name=f"after-cut-{round_}-{n}").save_external())
            except StorageConnectionError as exc:
                failures.append(exc)
                failed_calls.append(n)
    if target.kind != "s3":  # moto closes every connection after its response: none idle
        assert cuts >= 3
    # With retries nothing fails; without, at most the first call after each cut.
    assert set(failed_calls) <= ({0} if retries == 0 else set()), [str(f) for f in failures]
    assert_secret_hidden(target.secret, logs, *failures)
    await healthy(Item, 20)


async def test_connections_cut_under_load_recover(target: Target, proxy: FaultProxy) -> None:
    Item = define(target.url(proxy), retries=2)
    references = [await bounded(Item(name=f"{n}").save_external()) for n in range(20)]

    async def load_many() -> list[Any]:
        return await asyncio.gather(
            *(Item.load_external(r) for r in references), return_exceptions=True
        )

    # Cut while 20 loads and 20 saves are in flight (held by a stall, so that they surely are),
    # twice; the retries, after the cut, find the server again.
    for _ in range(2):
        proxy.stall()
        work = asyncio.ensure_future(
            asyncio.gather(
                load_many(),
                asyncio.gather(
                    *(Item(name=f"x{n}", payload="p" * 20_000).save_external() for n in range(20)),
                    return_exceptions=True,
                ),
            )
        )
        assert await wait_until(lambda: proxy.open_connections >= POOL_SIZE)
        await asyncio.sleep(0.05)
        assert proxy.cut() >= POOL_SIZE
        proxy.heal()
        loads, saves = await bounded(work)
        for outcome in [*loads, *saves]:
            assert isinstance(outcome, ExternalBaseModel | dict), outcome
    await healthy(Item, 40)


def test_the_sync_api_fails_fast_and_recovers(target: Target, proxy: FaultProxy) -> None:
    # The sync twins run on the library's own event-loop thread; the proxy on its own.
    Item = define(target.url(proxy), retries=0)
    try:
        reference = Item(name="sync").save_external_sync()
        proxy.cut()
        outcomes = []
        for _ in range(3):
            try:
                outcomes.append(Item.load_external_sync(reference).name)
            except StorageConnectionError as exc:
                outcomes.append(exc)
        assert outcomes[1:] == ["sync", "sync"], outcomes
        proxy.refuse()
        started = time.monotonic()
        with pytest.raises(StorageConnectionError) as caught:
            Item(name="refused").save_external_sync()
        assert time.monotonic() - started < 3
        assert names_host(caught.value, proxy), str(caught.value)
        proxy.heal()
        assert Item.load_external_sync(reference).name == "sync"
    finally:
        close()  # the sync bridge's backends: none left pointing at this proxy


# --- real restarts ------------------------------------------------------------------------------


async def test_redis_restart(logs: pytest.LogCaptureFixture) -> None:
    server = ThrowawayRedis(PASSWORD)
    try:
        server.start()
        url = f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0?timeout=0.5"
        Item = define(url, retries=2)
        Strict = define(url, retries=0)
        item = Strict(name="before")
        await bounded(item.save_external())

        server.stop()
        errors: list[StorageConnectionError] = []
        reference = {"class_name": "Item", "id": str(item.external_metadata.id)}
        for operation in (item.save_external, lambda: Item.load_external(reference)):
            error, elapsed = await timed_failure(operation())
            assert elapsed < 3, elapsed
            assert f"127.0.0.1:{server.port}" in str(error)
            errors.append(error)

        server.start()  # empty: no persistence
        failed = 0
        for n in range(10):
            try:
                item.name = f"after-{n}"
                # A re-save runs the write script, which the new server has never seen.
                reference = await bounded(item.save_external())
                assert (await bounded(Strict.load_external(reference))).name == f"after-{n}"
            except StorageConnectionError as exc:
                failed += 1
                errors.append(exc)
        assert failed <= 1, [str(e) for e in errors[2:]]
        assert_secret_hidden(PASSWORD, logs, *errors)
    finally:
        server.remove()


async def test_postgresql_restart(logs: pytest.LogCaptureFixture) -> None:
    try:
        import asyncpg  # noqa: F401
    except ImportError as exc:
        service_missing("asyncpg", str(exc))
    cluster = ThrowawayPostgres()
    try:
        cluster.start()
        url = (
            f"postgresql://postgres:{PASSWORD}@127.0.0.1:{cluster.port}/postgres"
            "?timeout=1&command_timeout=1"
        )
        Item, Strict = define(url, retries=2), define(url, retries=0)
        reference = await bounded(Item(name="before").save_external())

        cluster.stop()
        errors: list[StorageConnectionError] = []
        lost = Item(name="lost")
        for operation in (lost.save_external, lambda: Item.load_external(reference)):
            error, elapsed = await timed_failure(operation())
            assert elapsed < 3, elapsed
            assert f"127.0.0.1:{cluster.port}" in str(error)
            errors.append(error)

        cluster.start()
        # retries=0: the pool's dead connections cost at most one failed call.
        failed = 0
        for n in range(10):
            try:
                assert (await bounded(Strict.load_external(reference))).name == "before"
                saved = await bounded(Strict(name=f"after-{n}").save_external())
                assert (await bounded(Strict.load_external(saved))).name == f"after-{n}"
            except StorageConnectionError as exc:
                failed += 1
                errors.append(exc)
        assert failed <= 1, [str(e) for e in errors[2:]]
        assert_secret_hidden(PASSWORD, logs, *errors)
    finally:
        cluster.remove()


# --- retries ------------------------------------------------------------------------------------


async def test_retries_ride_over_a_reset_connection(target: Target, proxy: FaultProxy) -> None:
    Item = define(target.url(proxy), retries=2)
    proxy.reset_next(1)  # the very first connection: while connecting
    reference = await bounded(Item(name="first").save_external())
    assert proxy.accepted >= 2

    await aclose()  # drop the pool: the next load connects afresh
    proxy.reset_next(1)
    assert (await bounded(Item.load_external(reference))).name == "first"

    # A save that reached the server and whose reply was lost: written, yet unconfirmed; the
    # retry writes it again under the same id (an upsert), so one record results.
    proxy.cut_on_reply(1, after_bytes=2000)
    before = await target.raw_ids("Item")
    second = await bounded(Item(name="second", payload="p" * 3000).save_external())
    assert await target.raw_ids("Item") - before == {UUID(second["id"])}
    assert (await bounded(Item.load_external(second))).name == "second"


async def test_retries_off_surfaces_a_reset_connection(
    target: Target, proxy: FaultProxy, logs: pytest.LogCaptureFixture
) -> None:
    Item = define(target.url(proxy), retries=0)
    # One attempt, no retries hidden in a driver; except that aiohttp (S3) sends an
    # idempotent request once more when its connection drops before any response (RFC 9112
    # 9.3.1.1), so there two resets are needed to be sure one surfaces.
    drops = 2 if target.kind == "s3" else 1
    proxy.reset_next(drops)
    error, _ = await timed_failure(Item(name="first").save_external())
    assert names_host(error, proxy), str(error)
    assert proxy.accepted <= drops
    proxy.heal()
    reference = await bounded(Item(name="second").save_external())

    await aclose()
    proxy.reset_next(drops)
    load_error, _ = await timed_failure(Item.load_external(reference))
    proxy.heal()
    assert (await bounded(Item.load_external(reference))).name == "second"
    assert_secret_hidden(target.secret, logs, error, load_error)


# --- cancellation ---------------------------------------------------------------------------------


async def test_cancelled_and_timed_out_saves_leave_the_pool_healthy(
    target: Target, proxy: FaultProxy, namespace: str
) -> None:
    Item = define(target.url(proxy))
    await bounded(Item(name="warm").save_external())
    timed_out = completed = 0
    for n in range(60):
        item = Item(name=f"hurried-{n}", payload="p" * (n * 9973 % 400_000))
        try:
            await asyncio.wait_for(item.save_external(), timeout=(n % 10) * 0.0005)
            completed += 1
        except TimeoutError:
            timed_out += 1
    assert timed_out >= 6, (timed_out, completed)  # 0 s: 6 of them, before they start

    # Cancelled after 0, 1, 2 ... steps of the event loop: at every await of a save in turn,
    # however fast the server is.
    interrupted = 0
    for steps in range(40):
        task = asyncio.ensure_future(
            Item(name=f"stepped-{steps}", payload="s" * 5000).save_external()
        )
        for _ in range(steps):
            await asyncio.sleep(0)
        interrupted += task.cancel()
        await bounded(asyncio.gather(task, return_exceptions=True))
    assert interrupted >= 5, interrupted

    for _ in range(5):
        tasks = [
            asyncio.ensure_future(Item(name=f"cancelled-{n}", payload="q" * 30_000).save_external())
            for n in range(12)
        ]
        await asyncio.sleep(0.003)
        for task in tasks:
            task.cancel()
        await bounded(asyncio.gather(*tasks, return_exceptions=True))

    # Loads cancelled mid-flight too (they are batched: the leader's cancellation hands off).
    reference = await bounded(Item(name="loaded").save_external())
    loads = [asyncio.ensure_future(Item.load_external(reference)) for _ in range(12)]
    await asyncio.sleep(0)
    loads[0].cancel()
    results = await bounded(asyncio.gather(*loads, return_exceptions=True))
    assert all(isinstance(r, Item) for r in results[1:]), results

    await healthy(Item, 100)

    backend = await get_backend(target.url(proxy))
    # No connection leaked: the pool is bounded and idle again.
    assert await wait_until(lambda: proxy.open_connections <= POOL_SIZE), proxy.open_connections
    if target.kind == "postgresql":
        pool = backend._pool  # type: ignore[attr-defined]
        assert pool.get_size() <= POOL_SIZE
        assert await wait_until(lambda: pool.get_idle_size() == pool.get_size())
        # And on the server: no session of ours left behind by a cancelled statement.
        import asyncpg

        raw = await asyncpg.connect(POSTGRES_URL)
        try:
            sessions = await raw.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", namespace
            )
        finally:
            await raw.close()
        assert 1 <= sessions <= POOL_SIZE, sessions
    elif target.kind == "redis":
        assert backend._gate._value == POOL_SIZE  # type: ignore[attr-defined]
        assert not backend._client.connection_pool._in_use_connections  # type: ignore[attr-defined]


# --- atomicity ----------------------------------------------------------------------------------


async def test_a_save_cut_mid_write_leaves_the_old_or_the_new_record(
    target: Target, proxy: FaultProxy, logs: pytest.LogCaptureFixture
) -> None:
    Item = define(target.url(proxy), retries=0)
    size = 300_000
    item = Item(name="v0", payload="0" * size)
    reference = await bounded(item.save_external())
    id = UUID(reference["id"])
    stored = {"name": "v0", "payload": "0" * size}
    outcomes: Counter[str] = Counter()
    errors: list[StorageConnectionError] = []
    cut_points = [1, 50, 1000, size // 4, size // 2, 3 * size // 4, size - 100]
    for n, cut_at in enumerate([*cut_points, "reply", "reply"], start=1):
        new = {"name": f"v{n}", "payload": str(n % 10) * size}
        item.name, item.payload = new["name"], new["payload"]
        if cut_at == "reply":
            # The reply to the save itself: after the payload has reached the server.
            proxy.cut_on_reply(after_bytes=size)
        else:
            proxy.cut_after(int(cut_at))
        try:
            await bounded(item.save_external())
            saved = True
        except StorageConnectionError as exc:
            errors.append(exc)
            saved = False
        proxy.heal()
        raw = await target.raw_read("Item", id)
        assert raw is not None
        # Whole: one of the two versions, every byte of it.
        assert raw in (stored, new), {k: str(v)[:40] for k, v in raw.items()}
        if saved:
            assert raw == new
        outcome = ("saved" if saved else "failed") + ("+new" if raw == new else "+old")
        outcomes[outcome] += 1
        stored = raw
    # Both a write lost in flight and a write that landed but whose reply was lost happened.
    assert outcomes["failed+old"] >= 1, outcomes
    assert outcomes["failed+new"] >= 1, outcomes
    print(f"{target.kind}: cut saves {dict(outcomes)}")
    assert all(error.failed_ids == [reference["id"]] for error in errors)
    assert_secret_hidden(target.secret, logs, *errors)
    assert (await bounded(Item.load_external(reference))).payload == stored["payload"]


@pytest.mark.parametrize(("count", "size"), [(40, 20_000), (1_500, 300)])
async def test_a_failed_batch_says_which_records_it_may_not_have_written(
    target: Target, proxy: FaultProxy, logs: pytest.LogCaptureFixture, count: int, size: int
) -> None:
    Item = define(target.url(proxy), retries=0)
    if target.kind == "s3":
        # Concurrent puts, no chunks: a large batch shows nothing more, and moto is slow.
        count = min(count, 100)

    def batch(tag: str) -> list[Any]:
        return [Item(name=f"{tag}-{n:05}", payload=f"{n % 10}" * size) for n in range(count)]

    # How many bytes such a batch sends, so the cut can land late in it (with 1,500 records,
    # in Redis's second script call).
    await bounded(Item(name="warm").save_external())
    sent = proxy.forwarded
    await bounded(Item.save_external_many(batch("measure")))
    sent = proxy.forwarded - sent
    before = await target.raw_ids("Item")

    items = batch("cut")
    proxy.cut_after(int(sent * 0.85))
    with pytest.raises(StorageConnectionError) as caught:
        await bounded(Item.save_external_many(items))
    proxy.heal()
    assert_secret_hidden(target.secret, logs, caught.value)
    failed = set(caught.value.failed_ids)
    written = await target.raw_ids("Item") - before
    saved = [item for item in items if item.external_metadata is not None]
    # Every model without a record of this save is reported; none reported is claimed saved.
    assert {str(item.external_metadata.id) for item in saved}.isdisjoint(failed)
    assert {item.external_metadata.id for item in saved} <= written
    assert len(failed) == len(items) - len(saved)
    if target.kind == "postgresql":
        # One statement: all or nothing.
        assert not saved and len(written) in (0, len(items))
    if target.kind == "redis" and count > 1000:
        # Script calls of 1,000 records: the first is stored, the second is not.
        assert len(saved) == 1000 and len(written) == 1000
    # A record reported as failed may still have been written (its reply was lost), but a
    # record not reported was: retrying the unconfirmed ones completes the batch.
    retry = [
        item
        for item in items
        if item.external_metadata is None or str(item.external_metadata.id) in failed
    ]
    assert len(retry) == len(failed)
    await settled(lambda: Item.save_external_many(retry))
    loaded = await settled(
        lambda: Item.load_external_many(
            [{"class_name": "Item", "id": str(item.external_metadata.id)} for item in items]
        )
    )
    assert loaded == items
    print(f"{target.kind}: batch of {count}: {len(saved)} confirmed, {len(failed)} reported")


async def test_a_batch_retried_after_a_partial_failure_writes_what_is_left(
    target: Target, proxy: FaultProxy
) -> None:
    Item = define(target.url(proxy), retries=2, backoff=0.3)
    await bounded(Item(name="warm").save_external())
    items = [Item(name=f"b-{n}", payload=f"{n % 10}" * 20_000) for n in range(40)]
    before = await target.raw_ids("Item")
    proxy.cut_after(400_000)  # about half of the batch

    async def heal_after_the_cut() -> int:
        assert await wait_until(lambda: proxy.budget_exhausted, within=HANG)
        await asyncio.sleep(0.05)
        proxy.heal()  # before the first retry, 0.3 s after the failure
        return proxy.forwarded

    healer = asyncio.ensure_future(heal_after_the_cut())
    references = await bounded(Item.save_external_many(items))
    forwarded_at_heal = await healer
    retried = proxy.forwarded - forwarded_at_heal
    ids = {UUID(reference["id"]) for reference in references}
    assert await target.raw_ids("Item") - before == ids  # each record once
    assert await bounded(Item.load_external_many(references)) == items
    print(f"{target.kind}: the retry sent {retried} bytes")
    if target.kind == "s3":  # the retry sent only the records not confirmed
        assert retried < 40 * 20_000 * 0.75, retried


async def test_a_missing_record_is_not_a_connection_error(
    target: Target, proxy: FaultProxy
) -> None:
    # Guard against over-eager error mapping: through the proxy, healthy, nothing is retried.
    Item = define(target.url(proxy), retries=0)
    missing = {"class_name": "Item", "id": "00000000-0000-4000-8000-000000000000"}
    with pytest.raises(RecordNotFoundError):
        await bounded(Item.load_external(missing))
    if target.kind != "s3":  # (moto closes each connection after its response)
        assert proxy.accepted == 1
