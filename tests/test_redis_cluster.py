"""``redis+cluster://`` against a real Redis Cluster: three primaries, three replicas, started
for this module from the ``redis-server`` binary (`tests.clusters`), on loopback ports.

The shared contract suite runs here too, on the cluster. Then what only a cluster has: records
spread over every primary, slots that move (MOVED, ASK), a primary killed during a run of
saves and loads, ``wait_replicas`` (acknowledged writes survive the failover; a save no
replica confirms fails), database 0 only, and the command-line tool.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import pytest

pytest.importorskip("redis")

import redis
from redis.asyncio.connection import SSLConnection
from redis.cluster import RedisCluster as SyncCluster
from redis.crc import key_slot
from redis.exceptions import (
    ClusterError,
    RedisClusterException,
    ResponseError,
    SlotNotCoveredError,
)

from pydantic_toast import (
    ExternalBaseModel,
    ExternalConfigDict,
    RecordNotFoundError,
    StorageConnectionError,
    StorageValidationError,
)
from pydantic_toast._registry import get_backend
from pydantic_toast.backends.records import Record
from pydantic_toast.backends.redis_cluster import RedisClusterBackend
from tests import test_cli, test_conditional_write, test_contract, test_gc
from tests.clusters import (
    RedisCluster,
    delete_keys,
    redis_cluster,
    redis_command,
    running,
    started,
    wait_until,
)

# The whole contract suite, with `storage` (below) on the cluster.
globals().update(
    {name: value for name, value in vars(test_contract).items() if name.startswith("test_")}
)
# Garbage collection scans every primary and deletes by slot: its tests of one storage too.
test_unreachable_content_addressed_records_are_swept = (
    test_gc.test_unreachable_content_addressed_records_are_swept
)
test_a_forged_content_addressed_record_is_never_deleted = (
    test_gc.test_a_forged_content_addressed_record_is_never_deleted
)
test_delete_records_updated_before_keeps_what_was_written_since = (
    test_gc.test_delete_records_updated_before_keeps_what_was_written_since
)
# The conditional write runs its script once per slot: its contract on the cluster, and the
# rewrites that rely on it (rekey, the migrated write-back) with a save landing in between.
globals().update(
    {
        name: value
        for name, value in vars(test_conditional_write).items()
        if name.startswith("test_")
        and "file" not in name
        and "s3" not in name
        and "capability" not in name
        and "bad_arguments" not in name
    }
)
keyring = test_conditional_write.keyring


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    yield from started(redis_cluster, "a local Redis Cluster")


@pytest.fixture
def storage(cluster: RedisCluster, namespace: str) -> Iterator[str]:
    """A cluster storage URL with a key prefix of this test's own, deleted afterwards."""
    yield f"{cluster.url}?prefix={namespace}"
    delete_keys(SyncCluster(host="127.0.0.1", port=cluster.primaries()[0]), f"{namespace}:*")


@pytest.fixture
def deleting_storage(storage: str) -> str:
    return storage


def define_item(storage: str, **config: Any) -> type[ExternalBaseModel]:
    class Item(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=storage, **config)
        n: int
        text: str = ""

    return Item


def keys_on(port: int, pattern: str) -> list[str]:
    client = redis.Redis(port=port, decode_responses=True)
    try:
        return list(client.scan_iter(match=pattern, count=1000))
    finally:
        client.close()


def node_id(port: int) -> str:
    return redis_command(port, "CLUSTER", "MYID")


def id_in_slot(prefix: str, class_name: str, slot: int) -> UUID:
    while True:
        id = uuid4()
        if key_slot(f"{prefix}:{class_name}:{id}".encode()) == slot:
            return id


async def test_records_keep_their_keys_and_spread_over_every_primary(
    cluster: RedisCluster, storage: str, namespace: str
) -> None:
    Item = define_item(storage)
    items = [Item(n=i, text="x" * i) for i in range(300)]
    references = await Item.save_external_many(items)
    loaded = await Item.load_external_many(references)
    assert loaded == items

    found: dict[int, list[str]] = {
        port: keys_on(port, f"{namespace}:*") for port in cluster.primaries()
    }
    assert all(len(keys) > 30 for keys in found.values()), {p: len(k) for p, k in found.items()}
    stored = sorted(key for keys in found.values() for key in keys)
    assert stored == sorted(f"{namespace}:Item:{ref['id']}" for ref in references)

    # A single save, load, exists and delete, each routed by its key.
    one = Item(n=1000)
    reference = await one.save_external()
    assert await Item.load_external(reference) == one
    assert await Item.exists_external(reference)
    assert await Item.delete_external(reference)
    assert not await Item.exists_external(reference)
    assert await Item.delete_external_many(references[:100]) == 100
    assert await Item.load_external_many(references[:100], missing_ok=True) == [None] * 100


async def test_created_at_is_kept_per_key_by_single_and_batch_saves(storage: str) -> None:
    Item = define_item(storage)
    items = [Item(n=i) for i in range(50)]
    references = await Item.save_external_many(items)
    created = [item.external_metadata.created_at for item in items]  # type: ignore[union-attr]
    await asyncio.sleep(0.002)
    for item in items:
        item.n += 1  # type: ignore[attr-defined]
    await Item.save_external_many(items)
    await items[0].save_external()
    loaded = await Item.load_external_many(references)
    assert [item.external_metadata.created_at for item in loaded] == created  # type: ignore[union-attr]
    assert all(
        item.external_metadata.updated_at > first  # type: ignore[union-attr]
        for item, first in zip(loaded, created, strict=True)
    )
    assert [item.n for item in loaded] == [i + 1 for i in range(50)]  # type: ignore[attr-defined]


async def test_ttl_is_set_on_every_node(cluster: RedisCluster, namespace: str) -> None:
    Item = define_item(f"{cluster.url}?prefix={namespace}", ttl=60)
    references = await Item.save_external_many([Item(n=i) for i in range(30)])
    client = SyncCluster(host="127.0.0.1", port=cluster.primaries()[0])
    try:
        ttls = [client.pttl(f"{namespace}:Item:{ref['id']}") for ref in references]
        client.delete(*(f"{namespace}:Item:{ref['id']}" for ref in references[:1]))
        for ref in references[1:]:
            client.delete(f"{namespace}:Item:{ref['id']}")
    finally:
        client.close()
    assert all(55_000 < ttl <= 60_000 for ttl in ttls), ttls


async def test_the_cli_lists_counts_and_purges_across_the_cluster(storage: str) -> None:
    """``stats``, ``ls`` and ``purge`` see the records of every primary."""
    invoices, _ = await test_cli.populate(storage)  # two invoices look 45 days old
    stats = json.loads(test_cli.cli(storage, "--json", "stats").stdout)
    assert {row["class_name"]: row["records"] for row in stats} == {"Invoice": 5, "Receipt": 2}
    listed = json.loads(test_cli.cli(storage, "--json", "ls", "Invoice").stdout)
    assert {row["id"] for row in listed} == {reference["id"] for reference in invoices}
    purged = test_cli.cli(storage, "purge", "Invoice", "--older-than", "30d")
    assert purged.returncode == 0, purged.stderr
    assert purged.stdout.startswith("deleted 2 Invoice records not updated since")
    left = await get_backend(storage)
    assert sorted([info.id async for info in left.scan_records("Invoice")]) == sorted(
        UUID(reference["id"]) for reference in invoices[2:]
    )


async def test_moved_and_ask_redirections_are_followed(
    cluster: RedisCluster, storage: str, namespace: str
) -> None:
    """Slots the client's map places wrongly: moved whole (MOVED), or in migration (ASK).
    Single and batch saves follow the redirection; a save that waits for replicas too, with
    its WAIT on the node that took the write."""
    backend = await get_backend(storage)
    waiting = await get_backend(f"{storage}&wait_replicas=1")
    await backend.write_record(record())  # both clients have their slot map now
    await waiting.write_record(record())
    for ask in (False, True):
        slot = key_slot(f"{namespace}:{uuid4()}".encode())
        source = next(port for port in cluster.primaries() if _serves(port, slot))
        target = next(port for port in cluster.primaries() if port != source)
        if ask:
            redis_command(target, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", node_id(source))
            redis_command(source, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", node_id(target))
        else:
            _move_slot(cluster, slot, target)
        single, pair, waited = (
            record(id_in_slot(namespace, "Batch", slot)),
            [record(id_in_slot(namespace, "Batch", slot)), record()],
            record(id_in_slot(namespace, "Batch", slot)),
        )
        await backend.write_record(single)
        await backend.write_records(pair)
        await waiting.write_record(waited)  # sent again where the reply says, WAIT there
        if ask:
            _move_slot(cluster, slot, target)
        expected = [f"{namespace}:Batch:{r.id}" for r in (single, pair[0], waited)]
        assert set(expected) <= set(keys_on(target, f"{namespace}:Batch:*"))
        assert not set(expected) & set(keys_on(source, f"{namespace}:Batch:*"))
        ids = [single.id, pair[0].id, pair[1].id, waited.id]
        loaded = await backend.read_records("Batch", ids)
        assert [r.data if r else None for r in loaded] == [b'{"n":0}'] * 4


def record(id: UUID | None = None) -> Record:
    now = datetime.now(UTC)
    return Record(id or uuid4(), "Batch", b'{"n":0}', 1, now, now)


def _owner(port: int, slot: int) -> int | None:
    """The port of the primary that serves ``slot``, as the node on ``port`` sees it."""
    client = redis.Redis(port=port)
    try:
        for start, end, primary, *_ in client.execute_command("CLUSTER SLOTS"):
            if start <= slot <= end:
                return int(primary[1])
    finally:
        client.close()
    return None


def _serves(port: int, slot: int) -> bool:
    return _owner(port, slot) == port


def _move_slot(cluster: RedisCluster, slot: int, target: int) -> None:
    """Give a slot without keys left at its owner to ``target`` as a resharding does, and
    wait until every node, replicas too, says so. The target takes it while importing, which
    gives it a new config epoch: an older view gossiped by a node not yet told cannot win
    the slot back (and send clients from node to node until redis-py gives up)."""
    source = next(port for port in cluster.primaries() if _serves(port, slot))
    redis_command(target, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", node_id(source))
    target_id = node_id(target)
    for port in [target, source, *(p for p in cluster.primaries() if p not in (target, source))]:
        assert redis_command(port, "CLUSTER", "SETSLOT", str(slot), "NODE", target_id) == "OK"
    live = cluster.nodes.live()
    wait_until(
        lambda: all(_owner(port, slot) == target for port in live),
        10,
        f"every node gives slot {slot} to {target}",
    )


async def test_a_cluster_has_only_database_0() -> None:
    for url, shown in [
        ("redis+cluster://127.0.0.1:7000/1", "'1'"),
        ("redis+cluster://127.0.0.1:7000?db=2", "'2'"),
    ]:
        with pytest.raises(StorageValidationError) as caught:
            define_item(url)
        assert str(caught.value).endswith(
            f".Item: a Redis Cluster has only database 0; the URL asks for {shown}"
        )
    assert RedisClusterBackend("redis+cluster://127.0.0.1:7000/0").where == (
        "redis cluster at 127.0.0.1:7000"
    )
    with pytest.raises(StorageValidationError, match="names at least one node"):
        RedisClusterBackend("redis+cluster:///")
    with pytest.raises(StorageValidationError, match="unknown redis cluster option 'prefx'"):
        RedisClusterBackend("redis+cluster://h:1,h:2?prefx=a")
    with pytest.raises(StorageValidationError, match="wait_replicas must be an integer 0-100"):
        RedisClusterBackend("redis+cluster://h:1?wait_replicas=-1")
    backend = RedisClusterBackend("rediss+cluster://u:s3cret@h:1,h:2?socket_keepalive=true")
    client = backend._new_client()
    assert client.connection_kwargs["connection_class"] is SSLConnection
    assert client.connection_kwargs["socket_keepalive"] is True
    assert client.connection_kwargs["password"] == "s3cret"
    await client.aclose()
    # The slot map read while a failover is under way is transient; a misuse is not.
    for message, transient in [
        ("startup_nodes could not agree on a valid slots cache: 1 vs 2", True),
        ("Redis Cluster cannot be connected. Please provide at least one reachable node", True),
        ("All slots are not covered after query all startup_nodes. 5461 of 16384", True),
        ("Too many targets for command ('SCAN',)", False),
    ]:
        assert backend.is_transient(RedisClusterException(message)) is transient
    # A slot whose primary was just killed, and redirections that outlast redis-py's own
    # patience while slots move, pass once the slot map is read again.
    assert backend.is_transient(SlotNotCoveredError('Slot "866" is not covered by the cluster.'))
    assert backend.is_transient(ClusterError("TTL exhausted."))
    assert not backend.is_transient(ResponseError("WRONGTYPE Operation against a key"))
    assert "s3cret" not in repr(backend) and "s3cret" not in backend.where


async def test_a_killed_primary_is_replaced_without_restarting(
    cluster: RedisCluster, storage: str
) -> None:
    """Saves and loads run while a primary is SIGKILLed; once its replica is promoted they
    succeed again, the same backend and process, within the model's retries."""
    Item = define_item(storage, retries=8, retry_backoff=0.1)
    steps = itertools.count()

    async def step() -> None:
        item = Item(n=next(steps))
        reference = await item.save_external()
        assert await Item.load_external(reference) == item
        batch = [Item(n=i) for i in range(20)]
        assert await Item.load_external_many(await Item.save_external_many(batch)) == batch

    backend = await get_backend(storage)
    # A RecordNotFoundError is a record acknowledged by the primary, killed before its
    # replica had it: what a failover loses without wait_replicas.
    async with running(step, workers=4, tolerated=(RecordNotFoundError,)) as load:
        await asyncio.sleep(0.3)
        victim = cluster.primaries()[0]
        cluster.nodes.kill(victim)
        killed = time.monotonic()
        try:
            await asyncio.to_thread(cluster.wait_ok, 30)
            await asyncio.sleep(0.5)
            recovered = await load.wait_done_since(killed, 20, timeout=20)
        finally:
            await load.stop()
            await asyncio.to_thread(cluster.rejoin, victim)  # a replica of its successor
    assert not load.failures, load.failed()
    assert len(recovered) >= 20
    assert victim in cluster.replicas()
    assert all(killed - 1 < moment < recovered[-1] for moment in load.lost)
    assert await get_backend(storage) is backend  # the same backend, never reopened


async def test_wait_replicas_keeps_acknowledged_writes_through_a_failover(
    cluster: RedisCluster, storage: str
) -> None:
    Item = define_item(f"{storage}&wait_replicas=1", retries=8, retry_backoff=0.1)
    items = [Item(n=i, text="payload") for i in range(300)]
    references = await Item.save_external_many(items)
    singles = [Item(n=1000 + i) for i in range(10)]
    references += [await item.save_external() for item in singles]
    victim = cluster.primaries()[1]
    cluster.nodes.kill(victim)  # at once: nothing more is replicated
    try:
        await asyncio.to_thread(cluster.wait_ok, 30)
        assert await Item.load_external_many(references) == [*items, *singles]
    finally:
        await asyncio.to_thread(cluster.rejoin, victim)


async def test_a_write_no_replica_confirms_fails(cluster: RedisCluster, storage: str) -> None:
    Item = define_item(f"{storage}&wait_replicas=1&wait_timeout=0.3", retries=0)
    # Connect first: a stopped startup node would stall connecting.
    assert not await Item.exists_external({"class_name": "Item", "id": str(uuid4())})
    replicas = cluster.replicas()
    assert len(replicas) == 3
    stopped = [cluster.nodes.processes[port].pid for port in replicas]
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    started = time.monotonic()
    try:
        with pytest.raises(StorageConnectionError) as single:
            await Item(n=1).save_external()
        with pytest.raises(StorageConnectionError) as batch:
            await Item.save_external_many([Item(n=i) for i in range(30)])
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    assert time.monotonic() - started < 0.9  # within the node timeout: nobody fails over
    for caught in (single, batch):
        message = str(caught.value)
        assert "NotReplicatedError: 0 replicas confirmed the write within 0.3s" in message
        assert "wait_replicas=1 asks for more" in message
    assert len(batch.value.failed_ids) == 30
    Patient = define_item(f"{storage}&wait_replicas=1", retries=5)
    await Patient(n=2).save_external()  # replicas back (catching up): confirmed again
    with pytest.raises(StorageValidationError, match="must be shorter than timeout"):
        define_item(f"{storage}&wait_replicas=1&wait_timeout=5&timeout=5")
