"""Shared fixtures: the real services the backends are tested against, and per-test namespaces.

PostgreSQL and Redis are the ones running on this machine; S3 is moto's standalone server,
started here on a free loopback port. Where a service is missing the tests that need it skip,
saying why, except in CI (``CI=true``), where a missing service is a failure.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

POSTGRES_URL = os.environ.get(
    "TOAST_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("TOAST_TEST_REDIS", "redis://127.0.0.1:6379/0")


def service_missing(what: str, why: str) -> None:
    """Skip on a laptop, fail in CI: backend tests never skip silently where they must run."""
    message = f"{what} is not available ({why})"
    if CI:
        pytest.fail(f"{message}; CI=true requires it (.ci/run starts it)", pytrace=False)
    pytest.skip(message)


@pytest.fixture
def namespace() -> str:
    """A name no other test uses: table names, key prefixes, bucket and store names."""
    return f"t{uuid.uuid4().hex[:16]}"


# --- PostgreSQL ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_server() -> str:
    try:
        import asyncpg
    except ImportError as exc:
        service_missing("asyncpg", str(exc))

    async def probe() -> None:
        connection = await asyncpg.connect(POSTGRES_URL, timeout=5)
        await connection.close()

    try:
        asyncio.run(probe())
    except Exception as exc:  # noqa: BLE001 - any failure means "not available"
        service_missing(f"PostgreSQL at {POSTGRES_URL}", f"{type(exc).__name__}: {exc}")
    return POSTGRES_URL


@pytest.fixture
def postgresql_url(postgres_server: str, namespace: str) -> Iterator[str]:
    """A PostgreSQL storage URL with a table of this test's own, dropped afterwards."""
    import asyncpg

    yield f"{postgres_server}?table={namespace}"

    async def drop() -> None:
        connection = await asyncpg.connect(postgres_server)
        try:
            await connection.execute(f'DROP TABLE IF EXISTS "{namespace}"')
        finally:
            await connection.close()

    asyncio.run(drop())


# --- Redis --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server() -> str:
    try:
        import redis
    except ImportError as exc:
        service_missing("redis-py", str(exc))
    try:
        client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
        client.ping()
        client.close()
    except Exception as exc:  # noqa: BLE001 - any failure means "not available"
        service_missing(f"Redis at {REDIS_URL}", f"{type(exc).__name__}: {exc}")
    return REDIS_URL


@pytest.fixture
def redis_url(redis_server: str, namespace: str) -> Iterator[str]:
    """A Redis storage URL with a key prefix of this test's own, deleted afterwards."""
    import redis

    yield f"{redis_server}?prefix={namespace}"
    client = redis.Redis.from_url(redis_server)
    try:
        keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


# --- RabbitMQ -----------------------------------------------------------------------------

AMQP_URL = os.environ.get("TOAST_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//")


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    """The local RabbitMQ, as a Celery and kombu broker URL."""
    try:
        from kombu import Connection
    except ImportError as exc:
        service_missing("kombu", str(exc))
    try:
        with Connection(AMQP_URL, connect_timeout=5) as connection:
            connection.ensure_connection(max_retries=1)
    except Exception as exc:  # noqa: BLE001 - any failure means "not available"
        service_missing(f"RabbitMQ at {AMQP_URL}", f"{type(exc).__name__}: {exc}")
    return AMQP_URL


# --- S3 on moto's standalone server ---------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server over HTTP on a free loopback port, for the whole session."""
    try:
        import aiobotocore  # noqa: F401
        import moto.server  # noqa: F401
    except ImportError as exc:
        service_missing("aiobotocore and moto[server]", str(exc))
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                service_missing("moto's S3 server", f"it did not start on port {port}")
            time.sleep(0.1)
    old = {key: os.environ.get(key) for key in _AWS_TEST_ENV}
    os.environ.update(_AWS_TEST_ENV)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


_AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture
def s3_bucket(s3_endpoint: str, namespace: str) -> str:
    """A fresh bucket on the moto server."""
    import boto3

    client: Any = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=namespace)
    return namespace


@pytest.fixture
def s3_url(s3_endpoint: str, s3_bucket: str) -> str:
    return f"s3://{s3_bucket}/models?endpoint_url={s3_endpoint}"


# --- every backend -------------------------------------------------------------------------

BACKENDS = ["memory", "sqlite", "file", "custom", "postgresql", "redis", "s3"]


@pytest.fixture(params=BACKENDS)
def storage(request: pytest.FixtureRequest, namespace: str) -> str:
    """A fresh storage URL on each backend in turn; "custom" is a four-method backend."""
    if request.param == "custom":
        from tests import dict_backend  # noqa: F401 - registers dictstore://

        return f"dictstore://{namespace}"
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


# --- Embedded --------------------------------------------------------------------------------


@pytest.fixture
def memory_url(namespace: str) -> Iterator[str]:
    from pydantic_toast.backends.memory import MemoryBackend

    url = f"memory://{namespace}"
    yield url
    MemoryBackend.clear(url)


@pytest.fixture
def sqlite_url(tmp_path: Any) -> str:
    return f"sqlite:///{tmp_path}/models.db"


@pytest.fixture
def file_url(tmp_path: Any) -> str:
    return f"file://{tmp_path}/records"
