"""A multi-host PostgreSQL URL through a failover: a primary made by ``initdb`` and a streaming
standby made by ``pg_basebackup -R``, both in a temporary directory on free loopback ports
(`tests.clusters`; never the system server). The primary is stopped and the standby promoted
while saves and loads run: the pool drops its dead connections and the next operations go to
the new primary, in the same process, within the model's retries.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from pydantic_toast import ExternalBaseModel, ExternalConfigDict, StorageValidationError
from pydantic_toast._registry import get_backend
from pydantic_toast.backends.postgresql import PostgreSQLBackend
from tests.clusters import PostgresPair, Unavailable, postgres_pair, running, started

asyncpg = pytest.importorskip("asyncpg")


@pytest.fixture(scope="module")
def pair() -> Iterator[PostgresPair]:
    yield from started(
        postgres_pair, "a local PostgreSQL primary and standby", (Unavailable, RuntimeError)
    )


def test_a_multi_host_url_reaches_asyncpg_whole() -> None:
    backend = PostgreSQLBackend(
        "postgresql://app:s3cret@db1:5432,db2:5433/app?target_session_attrs=read-write&table=t"
    )
    assert backend._dsn == "postgresql://app@db1:5432,db2:5433/app?target_session_attrs=read-write"
    assert backend.where == "PostgreSQL at db1:5432,db2:5433/app"
    assert "s3cret" not in repr(backend)
    with pytest.raises(StorageValidationError) as caught:
        PostgreSQLBackend("postgresql://db1,db2/app?target_session_attrs=primry")
    assert str(caught.value) == (
        "PostgreSQL option target_session_attrs must be one of any, primary, standby, "
        "prefer-standby, read-write, read-only, not 'primry'"
    )


async def _caught_up(pair: PostgresPair) -> None:
    """Until the standby has replayed everything the primary wrote."""
    primary = await asyncpg.connect(host="127.0.0.1", port=pair.primary_port, user="postgres")
    standby = await asyncpg.connect(host="127.0.0.1", port=pair.standby_port, user="postgres")
    try:
        lsn = await primary.fetchval("SELECT pg_current_wal_lsn()")
        deadline = time.monotonic() + 20
        while not await standby.fetchval("SELECT pg_last_wal_replay_lsn() >= $1", lsn):
            assert time.monotonic() < deadline, "the standby did not catch up"
            await asyncio.sleep(0.05)
    finally:
        await primary.close()
        await standby.close()


async def test_operations_move_to_the_promoted_standby(pair: PostgresPair, namespace: str) -> None:
    storage = f"{pair.url}&table={namespace}&timeout=3"

    class Item(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=storage, retries=8, retry_backoff=0.1)
        n: int

    before = [Item(n=i) for i in range(100)]
    references = await Item.save_external_many(before)
    await _caught_up(pair)
    backend = await get_backend(storage)

    async def step() -> None:
        item = Item(n=-1)
        assert await Item.load_external(await item.save_external()) == item
        batch = [Item(n=i) for i in range(10)]
        assert await Item.load_external_many(await Item.save_external_many(batch)) == batch

    async with running(step, workers=3) as load:
        await asyncio.sleep(0.3)
        # The order of a failover that loses nothing: stop the primary (fast: its standby
        # gets every WAL record first), then promote the standby. Promoting first would
        # leave two primaries for a moment, and what the old one acknowledged then would be
        # lost.
        await asyncio.to_thread(pair.stop_primary)
        await asyncio.to_thread(pair.promote_standby)
        switched = time.monotonic()
        await load.wait_done_since(switched, 10, timeout=30)
    assert not load.failures, load.failed()
    assert len(load.since(switched)) >= 10
    assert await Item.load_external_many(references) == before
    assert await get_backend(storage) is backend

    # What was written after the switch is on the former standby.
    connection = await asyncpg.connect(host="127.0.0.1", port=pair.standby_port, user="postgres")
    try:
        assert not await connection.fetchval("SELECT pg_is_in_recovery()")
        rows = await connection.fetchval(f'SELECT count(*) FROM "{namespace}"')
    finally:
        await connection.close()
    assert rows >= 100 + 11 * len(load.since(switched))
