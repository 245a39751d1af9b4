"""``redis+sentinel://`` against a real primary, replica and three Sentinels, started for this
module from the ``redis-server`` binary (`tests.clusters`), on loopback ports.

The shared contract suite runs here too, through the Sentinels. Then: the URL's path (service
and database), a killed primary replaced without restarting the process, and ``wait_replicas``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("redis")

import redis

from pydantic_toast import (
    ExternalBaseModel,
    ExternalConfigDict,
    StorageConnectionError,
    StorageValidationError,
)
from pydantic_toast._registry import get_backend
from pydantic_toast.backends.redis_sentinel import RedisSentinelBackend
from tests import test_contract
from tests.clusters import (
    RedisSentinels,
    delete_keys,
    redis_sentinels,
    running,
    started,
    wait_until,
)

# The whole contract suite, with `storage` (below) behind the Sentinels.
globals().update(
    {name: value for name, value in vars(test_contract).items() if name.startswith("test_")}
)


@pytest.fixture(scope="module")
def sentinels() -> Iterator[RedisSentinels]:
    yield from started(redis_sentinels, "a local Redis with Sentinels")


@pytest.fixture
def storage(sentinels: RedisSentinels, namespace: str) -> Iterator[str]:
    yield f"{sentinels.url}?prefix={namespace}"
    primary = sentinels.current_primary()
    if primary is not None:
        delete_keys(redis.Redis(port=primary), f"{namespace}:*")


def define_item(storage: str, **config: Any) -> type[ExternalBaseModel]:
    class Item(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=storage, **config)
        n: int

    return Item


async def test_the_path_names_the_service_and_the_database() -> None:
    backend = RedisSentinelBackend("redis+sentinel://u:s3cret@h1:1,h2/mymaster/3?prefix=p")
    assert backend.service == "mymaster"
    assert backend.where == "redis service 'mymaster' of the Sentinels at h1:1,h2:26379"
    client = backend._new_client()
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["db"], kwargs["password"], kwargs["username"]) == (3, "s3cret", "u")
    await client.aclose()
    await backend.disconnect()
    assert "s3cret" not in repr(backend)
    for url, message in [
        ("redis+sentinel://h:1", "is /service_name or /service_name/db, not ''"),
        ("redis+sentinel://h:1/a/b/c", "is /service_name or /service_name/db, not '/a/b/c'"),
        ("redis+sentinel://h:1/a/x", "is /service_name or /service_name/db, not '/a/x'"),
        (
            "redis+sentinel:///a",
            "names at least one Sentinel: redis+sentinel://host:port,.../service_name",
        ),
    ]:
        with pytest.raises(StorageValidationError) as caught:
            define_item(url)
        assert str(caught.value).endswith(message), str(caught.value)


async def test_a_failover_is_followed_without_restarting(
    sentinels: RedisSentinels, storage: str
) -> None:
    """The primary is SIGKILLed during saves and loads; once the Sentinels promote the
    replica, the same backend works again, within the model's retries. Writes confirmed by
    the replica (``wait_replicas=1``) before the kill are all there."""
    Durable = define_item(f"{storage}&wait_replicas=1")
    before = [Durable(n=i) for i in range(200)]
    references = await Durable.save_external_many(before)
    Item = define_item(f"{storage}&timeout=3", retries=10, retry_backoff=0.1)
    backend = await get_backend(f"{storage}&timeout=3")

    async def step() -> None:
        item = Item(n=-1)
        assert await Item.load_external(await item.save_external()) == item

    async with running(step, workers=3) as load:
        await asyncio.sleep(0.2)
        old = sentinels.primary
        sentinels.nodes.kill(old)
        killed = time.monotonic()
        await asyncio.to_thread(
            wait_until, lambda: sentinels.current_primary() == sentinels.replica, 30, "promoted"
        )
        await load.wait_done_since(killed, 20, timeout=20)
    assert not load.failures, load.failed()
    assert len(load.since(killed)) >= 20
    assert [item.n for item in await Item.load_external_many(references)] == list(range(200))  # type: ignore[attr-defined]
    assert await get_backend(f"{storage}&timeout=3") is backend

    # No replica left to confirm: a save that asks for one fails, naming why.
    Durable = define_item(f"{storage}&wait_replicas=1&wait_timeout=0.2", retries=0)
    with pytest.raises(StorageConnectionError) as caught:
        await Durable(n=1).save_external()
    assert "NotReplicatedError: 0 replicas confirmed the write within 0.2s" in str(caught.value)
