"""Garbage collection of content-addressed records, on every backend that can list records:
what is swept and what is kept, dry runs, corrupt records, roots in other storages, the
conditional delete it relies on, and a collection racing dumps."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
from pydantic import BaseModel

import pydantic_toast
from pydantic_toast import (
    External,
    ExternalBaseModel,
    ExternalConfigDict,
    GarbageReport,
    Keyring,
    StorageBackend,
    StorageValidationError,
    UnsupportedOperationError,
    collect_garbage,
    collect_garbage_sync,
    register_backend,
    use_keyring,
)
from pydantic_toast._content import content_id
from pydantic_toast._crypto import KEYS_VARIABLE, content_secret, seal_data
from pydantic_toast._errors import mask_url
from pydantic_toast._gc import _collect
from pydantic_toast._registry import get_backend
from pydantic_toast.backends.file import FileBackend
from pydantic_toast.backends.records import Record
from tests.dict_backend import DictBackend

NOW = dt.datetime.now(dt.UTC)
OLD = NOW - dt.timedelta(days=2)  # past the default grace of a day


def compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


async def put(
    backend: StorageBackend,
    class_name: str,
    data: dict[str, Any],
    *,
    when: dt.datetime = OLD,
    content_addressed: bool = True,
) -> dict[str, str]:
    """Store ``data`` as a record last written at ``when``; return its reference."""
    raw = compact(data)
    id = content_id(class_name, raw) if content_addressed else uuid4()
    await backend.write_record(Record(id, class_name, raw, 1, when, when))
    return {"class_name": class_name, "id": str(id)}


async def exists(backend: StorageBackend, reference: dict[str, str]) -> bool:
    found = await backend.read_record(reference["class_name"], UUID(reference["id"]))
    return found is not None


class World:
    """A storage holding one of each case a collection must tell apart."""

    async def build(self, backend: StorageBackend) -> None:
        self.listed = await put(backend, "Line", {"sku": "in-a-list"})
        self.deep = await put(backend, "Line", {"sku": "deep-in-dicts"})
        self.part = await put(backend, "Part", {"name": "reached-through-a-kit"})
        self.kit = await put(backend, "Kit", {"parts": [self.part], "label": "old kit"})
        self.garbage = [
            await put(backend, "Line", {"sku": "nobody's"}),
            await put(backend, "Line", {"sku": "nobody's either", "n": 2}),
        ]
        self.lost_part = await put(backend, "Part", {"name": "only-a-lost-kit's"})
        self.lost_kit = await put(backend, "Kit", {"parts": [self.lost_part]})
        self.recent = await put(backend, "Line", {"sku": "just written"}, when=NOW)
        self.plain = await put(backend, "Note", {"text": "old, alone"}, content_addressed=False)
        dangling = {"class_name": "Line", "id": str(content_id("Line", b'{"sku":"never"}'))}
        self.root = await put(
            backend,
            "Order",
            {
                "lines": [self.listed, dangling],
                "meta": {"a": {"b": [{"c": self.deep}]}},
                "kit": self.kit,
                "not_a_reference": {"class_name": "Line", "id": self.garbage[0]["id"], "x": 1},
                "no_such_class": {"class_name": "no class!", "id": self.garbage[1]["id"]},
            },
            content_addressed=False,
        )
        self.kept = [self.listed, self.deep, self.part, self.kit, self.recent, self.plain]
        self.kept.append(self.root)
        self.swept = [*self.garbage, self.lost_part, self.lost_kit]


def counts(report: GarbageReport) -> dict[str, Any]:
    return report.model_dump(exclude={"cutoff", "dry_run"})


async def test_unreachable_content_addressed_records_are_swept(storage: str) -> None:
    backend = await get_backend(storage)
    if not backend.capabilities.scan:
        with pytest.raises(UnsupportedOperationError) as caught:
            await collect_garbage(storage)
        assert str(caught.value) == (
            f"DictBackend cannot list its records, so garbage collection cannot use it ({storage})"
        )
        return
    world = World()
    await world.build(backend)
    expected = {
        "storage": mask_url(storage),
        "scanned": 11,
        "roots_scanned": 0,
        "roots": 2,
        "recent": 1,
        "reachable": 4,
        "deleted": 4,
        "refreshed": 0,
        "corrupt": 0,
    }

    dry = await collect_garbage(storage, dry_run=True)
    assert dry.dry_run is True
    assert counts(dry) == expected
    for reference in world.kept + world.swept:
        assert await exists(backend, reference), reference

    report = await collect_garbage(storage)
    assert report.dry_run is False
    assert counts(report) == expected
    assert NOW - dt.timedelta(days=1) <= report.cutoff <= dt.datetime.now(dt.UTC)
    for reference in world.kept:
        assert await exists(backend, reference), reference
    for reference in world.swept:
        assert not await exists(backend, reference), reference

    again = await collect_garbage(storage)
    assert counts(again) == {**expected, "scanned": 7, "deleted": 0}


async def test_grace_decides_what_counts_as_recent(memory_url: str) -> None:
    backend = await get_backend(memory_url)
    hour_old = await put(backend, "Line", {"sku": "an hour old"}, when=NOW - dt.timedelta(hours=1))
    report = await collect_garbage(memory_url, grace=dt.timedelta(hours=2))
    assert (report.recent, report.deleted) == (1, 0)
    report = await collect_garbage(memory_url, grace=dt.timedelta(minutes=30))
    assert (report.recent, report.deleted) == (0, 1)
    assert not await exists(backend, hour_old)


async def test_a_grace_longer_than_the_calendar_keeps_everything(memory_url: str) -> None:
    """``timedelta.max`` reads as "keep every record": the cutoff is the earliest time."""
    backend = await get_backend(memory_url)
    old = await put(backend, "Line", {"sku": "old"}, when=NOW - dt.timedelta(days=3650))
    report = await collect_garbage(memory_url, grace=dt.timedelta.max)
    assert (report.scanned, report.recent, report.deleted) == (1, 1, 0)
    assert report.cutoff == dt.datetime.min.replace(tzinfo=dt.UTC)
    assert await exists(backend, old)


async def test_dumped_values_are_kept_while_a_root_holds_them(memory_url: str) -> None:
    class Line(BaseModel):
        sku: str

    class Order(BaseModel):
        lines: list[External[Line]]

    kept = await pydantic_toast.dump(
        Order(lines=[Line(sku="a"), Line(sku="b")]), storage=memory_url
    )
    lost = await pydantic_toast.dump(Order(lines=[Line(sku="c")]), storage=memory_url)
    backend = await get_backend(memory_url)
    await put(backend, "Order", kept, when=NOW, content_addressed=False)  # only one is saved
    report = collect_garbage_sync(memory_url, grace=dt.timedelta(0))
    assert (report.roots, report.reachable, report.deleted) == (1, 2, 1)
    assert await pydantic_toast.validate(Order, kept, storage=memory_url) == Order(
        lines=[Line(sku="a"), Line(sku="b")]
    )
    assert not await exists(backend, lost["lines"][0])


async def test_a_forged_content_addressed_record_is_never_deleted(storage: str) -> None:
    backend = await get_backend(storage)
    if not backend.capabilities.scan:
        pytest.skip("a four-method backend cannot list: the sweep test covers its error")
    # A version-8 id that is not the digest of what it holds: another tool's, or tampered.
    forged = UUID(int=content_id("Line", b'{"sku":"x"}').int ^ 1)
    await backend.write_record(Record(forged, "Line", b'{"sku":"y"}', 1, OLD, OLD))
    report = await collect_garbage(storage)
    assert (report.scanned, report.corrupt, report.deleted) == (1, 1, 0)
    assert await backend.read_record("Line", forged) is not None


def break_a_record(storage: str, backend: StorageBackend, id: UUID) -> None:
    """Overwrite the stored record of ``id`` with bytes no decoder accepts."""
    if storage.startswith("sqlite"):
        import sqlite3

        with closing(sqlite3.connect(storage.removeprefix("sqlite:///"))) as database, database:
            database.execute(
                "UPDATE external_models SET schema_version = 0 WHERE id = ?", [str(id)]
            )
    elif storage.startswith("file"):
        directory = storage.removeprefix("file://")
        (Path(directory) / "Line" / f"{id}.json").write_bytes(b"not an envelope")
    else:
        import redis

        prefix = storage.partition("prefix=")[2]
        client = redis.Redis.from_url(storage.partition("?")[0])
        key = f"{prefix}:Line:{id}"
        client.set(key, b'{"created_at":"garbage"}')
        client.close()


def url_of(request: pytest.FixtureRequest) -> str:
    """The storage URL fixture named by the parameter (taken outside the event loop: the
    PostgreSQL fixture probes its server with a loop of its own)."""
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


@pytest.fixture(params=["sqlite", "file", "redis"])
def breakable_storage(request: pytest.FixtureRequest) -> str:
    return url_of(request)


async def test_corrupt_records_are_counted_and_skipped(breakable_storage: str) -> None:
    storage = breakable_storage
    backend = await get_backend(storage)
    broken = await put(backend, "Line", {"sku": "to be broken"})
    garbage = await put(backend, "Line", {"sku": "garbage"})
    root_data = {"line": broken}
    await put(backend, "Order", root_data, content_addressed=False)
    break_a_record(storage, backend, UUID(broken["id"]))
    seen: list[str] = []
    report = await _collect(storage, on_corrupt=lambda e: seen.append(str(e)))
    assert (report.scanned, report.corrupt, report.deleted, report.roots) == (3, 1, 1, 1)
    assert len(seen) == 1 and f"record {broken['id']} is corrupt" in seen[0]
    assert not await exists(backend, garbage)
    with pytest.raises(pydantic_toast.CorruptRecordError):
        await backend.read_record("Line", UUID(broken["id"]))  # still there, still broken


@pytest.fixture(params=[("memory", "sqlite"), ("redis", "postgresql")], ids=lambda p: "-".join(p))
def two_storages(request: pytest.FixtureRequest) -> tuple[str, str]:
    here, there = request.param
    return request.getfixturevalue(f"{here}_url"), request.getfixturevalue(f"{there}_url")


async def test_roots_in_another_storage_keep_what_they_reference(
    two_storages: tuple[str, str],
) -> None:
    lines_url, orders_url = two_storages
    lines, orders = await get_backend(lines_url), await get_backend(orders_url)
    wanted = [await put(lines, "Line", {"sku": f"wanted-{i}"}) for i in range(3)]
    unwanted = await put(lines, "Line", {"sku": "unwanted"})
    # The order is old and content-addressed itself: every record of a roots_from storage is
    # a root, whatever its age.
    order = await put(orders, "Order", {"lines": wanted[:2]})
    await put(orders, "Order", {"more": {"x": [wanted[2]]}}, content_addressed=False)

    report = await collect_garbage(lines_url, roots_from=[orders_url])
    assert (report.scanned, report.roots_scanned, report.reachable, report.deleted) == (4, 2, 3, 1)
    for reference in wanted:
        assert await exists(lines, reference)
    assert not await exists(lines, unwanted)
    assert await exists(orders, order)  # nothing is deleted where the roots are

    alone = await collect_garbage(lines_url)  # without the orders, the lines are garbage
    assert (alone.scanned, alone.deleted) == (3, 3)


async def test_arguments_are_checked(memory_url: str, sqlite_url: str) -> None:
    for grace in (dt.timedelta(seconds=-1), -1, float("nan"), "1d"):
        with pytest.raises(StorageValidationError) as refused:
            await collect_garbage(memory_url, grace=grace)  # type: ignore[arg-type]
        assert str(refused.value) == (
            f"grace must be a duration (a timedelta or seconds) of zero or more, not {grace!r}"
        )
    report = await collect_garbage(memory_url, grace=3600)  # seconds, as every duration
    assert report.cutoff < dt.datetime.now(dt.UTC) - dt.timedelta(seconds=3599)
    with pytest.raises(StorageValidationError) as caught:
        await collect_garbage(memory_url, roots_from=[sqlite_url, memory_url])
    assert str(caught.value) == (
        f"roots_from names the storage collected ({memory_url}): its records are roots already"
    )
    with pytest.raises(StorageValidationError, match="a storage is a URL or a StorageBackend"):
        await collect_garbage(42)  # type: ignore[arg-type]


async def test_a_report_is_json() -> None:
    report = GarbageReport(storage="memory://x", dry_run=True, cutoff=NOW, scanned=3, deleted=1)
    data = json.loads(report.model_dump_json())
    assert data == {
        "storage": "memory://x",
        "dry_run": True,
        "cutoff": NOW.isoformat().replace("+00:00", "Z"),
        "scanned": 3,
        "roots_scanned": 0,
        "roots": 0,
        "recent": 0,
        "reachable": 0,
        "deleted": 1,
        "refreshed": 0,
        "corrupt": 0,
    }
    with pytest.raises(ValueError, match="frozen"):
        report.deleted = 2  # type: ignore[misc]


# --- the conditional delete -----------------------------------------------------------------


class DeletingDictBackend(DictBackend):
    """The four methods and a first-round ``delete``."""

    async def delete(self, id: UUID, class_name: str) -> bool:
        return self.store.pop(id, None) is not None


register_backend("dictdelete", DeletingDictBackend)


@pytest.fixture(params=["memory", "sqlite", "file", "custom", "postgresql", "redis", "s3"])
def deleting_storage(request: pytest.FixtureRequest, namespace: str) -> str:
    if request.param == "custom":
        return f"dictdelete://{namespace}"
    return url_of(request)


async def test_delete_records_updated_before_keeps_what_was_written_since(
    deleting_storage: str,
) -> None:
    backend = await get_backend(deleting_storage)
    cutoff = NOW - dt.timedelta(hours=1)
    old = [await put(backend, "Line", {"n": i}) for i in range(3)]
    fresh = await put(backend, "Line", {"n": 99}, when=NOW)
    other_class = await put(backend, "Part", {"n": 0})
    ids = [UUID(r["id"]) for r in [*old, fresh]] + [UUID(other_class["id"]), uuid4()]
    assert await backend.delete_records("Line", ids, updated_before=cutoff) == 3
    assert [await exists(backend, r) for r in [*old, fresh, other_class]] == [
        False,
        False,
        False,
        True,
        True,
    ]
    assert await backend.delete_records("Line", [UUID(fresh["id"])], updated_before=NOW) == 0
    with pytest.raises(StorageValidationError, match="updated_before must be an aware datetime"):
        await backend.delete_records("Line", ids, updated_before=dt.datetime(2020, 1, 1))


async def test_a_file_record_written_again_after_its_check_is_not_deleted(
    file_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another thread or process rewrites a record between the backend's first look (stale)
    and its delete: the record stays, rewritten."""
    backend = await get_backend(file_url)
    cutoff = NOW - dt.timedelta(hours=1)
    reference = await put(backend, "Line", {"n": 1})
    id = UUID(reference["id"])
    looked = await FileBackend.get_many(backend, "Line", [id])  # stale, as first seen

    async def first_look(self: FileBackend, class_name: str, ids: Any) -> list[bytes | None]:
        # ... and, before the delete gets to it, a writer refreshes the record.
        await FileBackend.put_many(self, [Record(id, "Line", compact({"n": 1}), 1, OLD, NOW)])
        return looked

    monkeypatch.setattr(FileBackend, "get_many", first_look)
    assert await backend.delete_records("Line", [id], updated_before=cutoff) == 0
    monkeypatch.undo()
    stored = await backend.read_record("Line", id)
    assert stored is not None and stored.updated_at == NOW
    assert [name for name in os.listdir(backend.directory / "Line")] == [f"{id}.json"]


# --- racing dumps ---------------------------------------------------------------------------


class Item(BaseModel):
    sku: str
    quantity: int


class Basket(BaseModel):
    items: list[External[Item]]


@pytest.fixture(params=["memory", "sqlite", "file", "postgresql", "redis"])
def racing_storage(request: pytest.FixtureRequest) -> str:
    return url_of(request)


async def test_a_collection_racing_dumps_leaves_no_dangling_reference(racing_storage: str) -> None:
    storage = racing_storage
    backend = await get_backend(storage)
    values = [Item(sku=f"SKU-{i}", quantity=i) for i in range(1000)]
    # Every value stored long ago and referenced by nobody: all garbage, until dumped again.
    await backend.write_records(
        [
            Record(content_id("Item", raw), "Item", raw, 1, OLD, OLD)
            for raw in (value.model_dump_json().encode() for value in values)
        ]
    )
    # Dump n holds values n to n + 4: each value is written by a few dumps close in time, so
    # a collection deleting a value just written (without the check) leaves a reference that
    # no later dump writes again.
    next_dump = iter(range(1000))
    handed_out: list[tuple[int, dict[str, Any]]] = []
    started = asyncio.Event()

    def basket(n: int) -> Basket:
        return Basket(items=[values[(n + k) % len(values)] for k in range(5)])

    async def dumper() -> None:
        for n in next_dump:
            handed_out.append((n, await pydantic_toast.dump(basket(n), storage=storage)))
            if n >= 50:
                started.set()

    def thread_dumper() -> None:
        # Another thread, so another event loop and connection: writes that truly overlap
        # the collection's statements, even on the embedded backends.
        for n in next_dump:
            handed_out.append((n, pydantic_toast.dump_sync(basket(n), storage=storage)))

    async def collector() -> GarbageReport:
        await started.wait()
        return await collect_garbage(storage)

    *_, report = await asyncio.gather(
        *(dumper() for _ in range(5)),
        *(asyncio.to_thread(thread_dumper) for _ in range(5)),
        collector(),
    )
    assert len(handed_out) == 1000
    assert report.scanned == 1000 and report.recent + report.deleted + report.refreshed == 1000
    # Every reference a dump returned still loads, to the value it was dumped from.
    loaded = await pydantic_toast.validate(
        list[Basket], [dumped for _, dumped in handed_out], storage=storage
    )
    assert loaded == [basket(n) for n, _ in handed_out]


# --- encrypted records ----------------------------------------------------------------------

K1, K2 = bytes(range(32)), bytes(range(100, 132))


def b64(key: bytes) -> str:
    return base64.urlsafe_b64encode(key).rstrip(b"=").decode()


KEY_TEXTS = [
    text
    for key in (K1, K2)
    for text in (repr(key), key.hex(), base64.b64encode(key).decode(), b64(key))
]


@pytest.fixture
def keyring(monkeypatch: pytest.MonkeyPatch) -> Iterator[Keyring]:
    """Keyring k1, installed; the environment's keys out of the way."""
    monkeypatch.delenv(KEYS_VARIABLE, raising=False)
    ring = Keyring({"k1": K1}, "k1")
    use_keyring(ring)
    yield ring
    use_keyring(None)


async def put_sealed(
    backend: StorageBackend,
    keyring: Keyring,
    class_name: str,
    data: dict[str, Any],
    *,
    content_addressed: bool = True,
) -> dict[str, str]:
    """Store ``data`` encrypted as a dump or a save does, last written long ago."""
    raw = compact(data)
    id = content_id(class_name, raw, content_secret(keyring)) if content_addressed else uuid4()
    await backend.write_record(seal_data(Record(id, class_name, raw, 1, OLD, OLD), keyring))
    return {"class_name": class_name, "id": str(id)}


@pytest.fixture(params=["memory", "sqlite", "file", "postgresql", "redis", "s3"])
def listing_storage(request: pytest.FixtureRequest) -> str:
    return url_of(request)


class Sealed:
    """An encrypted order referencing plain and encrypted content-addressed lines, and
    garbage of both kinds."""

    async def build(self, backend: StorageBackend, keyring: Keyring) -> None:
        self.plain_line = await put(backend, "Line", {"sku": "plain, held"})
        self.sealed_line = await put_sealed(backend, keyring, "Card", {"number": "held"})
        self.deep = await put(backend, "Part", {"name": "held by a sealed line"})
        self.sealed_kit = await put_sealed(backend, keyring, "Kit", {"parts": [self.deep]})
        self.order = await put_sealed(
            backend,
            keyring,
            "Order",
            {"lines": [self.plain_line, self.sealed_line], "kit": self.sealed_kit},
            content_addressed=False,
        )
        self.plain_garbage = await put(backend, "Line", {"sku": "plain, nobody's"})
        self.sealed_garbage = await put_sealed(backend, keyring, "Card", {"number": "nobody's"})
        self.kept = [self.plain_line, self.sealed_line, self.deep, self.sealed_kit, self.order]
        self.swept = [self.plain_garbage, self.sealed_garbage]
        self.all = self.kept + self.swept


async def test_an_encrypted_root_keeps_what_it_references(
    listing_storage: str, keyring: Keyring
) -> None:
    backend = await get_backend(listing_storage)
    world = Sealed()
    await world.build(backend, keyring)
    expected = {
        "storage": mask_url(listing_storage),
        "scanned": 7,
        "roots_scanned": 0,
        "roots": 1,
        "recent": 0,
        "reachable": 4,
        "deleted": 2,
        "refreshed": 0,
        "corrupt": 0,
    }
    assert counts(await collect_garbage(listing_storage, dry_run=True)) == expected
    assert counts(await collect_garbage(listing_storage)) == expected
    for reference in world.kept:
        assert await exists(backend, reference), reference
    for reference in world.swept:
        assert not await exists(backend, reference), reference


async def test_an_unreferenced_encrypted_value_is_deleted_after_a_key_rotation(
    listing_storage: str, keyring: Keyring
) -> None:
    backend = await get_backend(listing_storage)
    old = await put_sealed(backend, keyring, "Card", {"number": "under k1"})
    # The primary key changes; k1 stays to read what it sealed (and keyed the id of).
    rotated = Keyring({"k2": K2, "k1": K1}, "k2")
    use_keyring(rotated)
    new = await put_sealed(backend, rotated, "Card", {"number": "under k2"})
    report = await collect_garbage(listing_storage)
    assert (report.scanned, report.deleted, report.corrupt) == (2, 2, 0)
    assert not await exists(backend, old) and not await exists(backend, new)


async def test_the_keyring_of_a_registered_class_opens_its_records(
    memory_url: str, keyring: Keyring
) -> None:
    own = Keyring({"own": K2}, "own")

    class Item(BaseModel):
        sku: str

    class Receipt(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=memory_url, encrypt=True, keyring=own)
        lines: list[External[Item]]

    class Cart(BaseModel):
        order: External[Receipt]

    cart = Cart(order=Receipt(lines=[Item(sku="a"), Item(sku="b")]))
    dumped = await pydantic_toast.dump(cart, storage=memory_url)
    lost = await put(await get_backend(memory_url), "Item", {"sku": "lost"})
    use_keyring(None)  # only the class knows its keyring
    report = await collect_garbage(memory_url, grace=dt.timedelta(0))
    assert (report.scanned, report.roots, report.reachable, report.deleted) == (4, 1, 2, 1)
    assert await pydantic_toast.validate(Cart, dumped, storage=memory_url) == cart
    assert not await exists(await get_backend(memory_url), lost)


def tamper(record: Record) -> Record:
    sealed = json.loads(record.data)
    text = sealed["ct"]
    sealed["ct"] = text[:-6] + ("A" if text[-6] != "A" else "B") + text[-5:]
    return Record(record.id, record.class_name, compact(sealed), 1, OLD, OLD)


async def test_a_collection_that_cannot_open_a_record_deletes_nothing(
    listing_storage: str, keyring: Keyring
) -> None:
    backend = await get_backend(listing_storage)
    world = Sealed()
    await world.build(backend, keyring)
    order = f"stored Order record {world.order['id']}"

    def refused(why: str) -> str:
        # Only the order is read: what it references is unknown, so nothing else is.
        return (
            "garbage collection stopped before deleting anything: 1 encrypted record could "
            f"not be opened, so what it references is unknown; the first: {order} {why}. "
            "Install the keyring that sealed it (pydantic_toast.use_keyring(...), "
            "ExternalConfigDict(keyring=...) on the class, or PYDANTIC_TOAST_KEYS=id:base64url-key)"
            " and run again"
        )

    use_keyring(None)
    with pytest.raises(StorageValidationError) as caught:
        await collect_garbage(listing_storage, dry_run=True)
    assert str(caught.value) == refused("is encrypted under key id 'k1', and no keyring is set")
    use_keyring(Keyring({"k2": K2}, "k2"))
    with pytest.raises(StorageValidationError) as caught:
        await collect_garbage(listing_storage)
    assert str(caught.value) == refused(
        "is encrypted under key id 'k1', which the keyring lacks (it holds 'k2')"
    )
    for text in KEY_TEXTS:
        assert text not in str(caught.value)

    use_keyring(keyring)
    stored = await backend.read_record("Order", UUID(world.order["id"]))
    assert stored is not None
    await backend.write_record(tamper(stored))
    with pytest.raises(StorageValidationError) as caught:
        await collect_garbage(listing_storage)
    assert str(caught.value) == refused(
        "does not decrypt under key id 'k1': it was tampered with, or copied from another "
        "record, class or schema version"
    )
    for reference in world.all:
        assert await exists(backend, reference), reference


async def test_unreferenced_encrypted_values_that_cannot_be_opened_stop_the_sweep(
    memory_url: str, keyring: Keyring, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = await get_backend(memory_url)
    plain = await put(backend, "Line", {"sku": "plain garbage"})
    sealed = await put_sealed(backend, keyring, "Card", {"number": "sealed garbage"})
    use_keyring(None)
    with pytest.raises(StorageValidationError) as caught:
        await collect_garbage(memory_url)
    assert str(caught.value) == (
        "garbage collection stopped before deleting anything: 1 encrypted record could not be "
        "opened, so what it references is unknown; the first: stored Card record "
        f"{sealed['id']} is encrypted under key id 'k1', and no keyring is set. Install the "
        "keyring that sealed it (pydantic_toast.use_keyring(...), ExternalConfigDict(keyring=...)"
        " on the class, or PYDANTIC_TOAST_KEYS=id:base64url-key) and run again"
    )
    monkeypatch.setenv(KEYS_VARIABLE, f"k1={b64(K1)}")  # set, but not as id:key
    with pytest.raises(StorageValidationError) as caught:
        await collect_garbage(memory_url, dry_run=True)
    assert (
        "encrypted under key id 'k1', and no keyring is set "
        "(PYDANTIC_TOAST_KEYS: entry 1 is not id:base64url-key). Install"
    ) in str(caught.value)
    assert b64(K1) not in str(caught.value)
    assert await exists(backend, plain) and await exists(backend, sealed)


async def test_the_gc_command_opens_encrypted_records_with_the_environments_keys(
    sqlite_url: str, keyring: Keyring
) -> None:
    backend = await get_backend(sqlite_url)
    world = Sealed()
    await world.build(backend, keyring)
    env = {key: value for key, value in os.environ.items() if key != KEYS_VARIABLE}
    command = [sys.executable, "-m", "pydantic_toast", "--storage", sqlite_url, "gc"]

    refused = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.startswith(
        "error: garbage collection stopped before deleting anything: 1 encrypted record "
        f"could not be opened, so what it references is unknown; the first: stored Order "
        f"record {world.order['id']} is encrypted under key id 'k1', and no keyring is set."
    )
    assert "PYDANTIC_TOAST_KEYS=id:base64url-key" in refused.stderr

    env[KEYS_VARIABLE] = f"k2:{b64(K2)}"  # the wrong key: named by id, never shown
    wrong = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert wrong.returncode == 1
    assert "under key id 'k1', which the keyring lacks (it holds 'k2')" in wrong.stderr
    for text in KEY_TEXTS:
        assert text not in wrong.stderr + wrong.stdout + refused.stderr

    async def left() -> set[str]:
        return {str(info.id) async for info in backend.scan_records(None)}

    assert await left() == {reference["id"] for reference in world.all}

    env[KEYS_VARIABLE] = f"k1:{b64(K1)}"
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"scanned 7 records in {mask_url(sqlite_url)}",
        "kept 1 not content-addressed, 0 written within 1d, 4 referenced",
        "deleted 2 content-addressed records that nothing references",
    ]
    assert await left() == {reference["id"] for reference in world.kept}
