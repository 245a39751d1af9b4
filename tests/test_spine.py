"""The rules the shared record path (`StorageBackend`'s public operations) enforces, on every
backend, the four-method custom one included: a rule that holds on one backend holds on all.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import datetime as dt
import errno
import gc
import json
import pickle
import sqlite3
import tracemalloc
from contextlib import closing
from typing import Any
from uuid import UUID, uuid4

import pytest
from pydantic import BaseModel

from pydantic_toast import (
    CorruptRecordError,
    ExternalBaseModel,
    ExternalConfigDict,
    ExternalStorageError,
    RecordNotFoundError,
    StorageBackend,
    StorageConnectionError,
    StorageOperationError,
    StorageValidationError,
    UnsupportedOperationError,
    register_backend,
)
from pydantic_toast._registry import get_backend
from pydantic_toast.backends.records import Record

T0 = dt.datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC)
T1 = T0 + dt.timedelta(days=1)


def define_item(storage: str, **config: Any) -> type[ExternalBaseModel]:
    class Item(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=storage, **config)
        name: str

    return Item


# --- the created_at rule ---------------------------------------------------------------------


async def test_a_first_write_over_a_stored_record_keeps_its_created_at(storage: str) -> None:
    backend = await get_backend(storage)
    id = uuid4()
    await backend.write_record(Record(id, "Item", b'{"name":"first"}', 1, T0, T0))
    # A write that believes it is the first (created_at == updated_at), as a retried first
    # save or a content-addressed value is: the stored created_at wins, and the caller is told.
    again = Record(id, "Item", b'{"name":"second"}', 1, T1, T1)
    await backend.write_record(again)
    assert again.created_at == T0
    stored = await backend.read_record("Item", id)
    assert stored is not None
    assert (stored.created_at, stored.updated_at) == (T0, T1)
    assert json.loads(stored.data) == {"name": "second"}  # JSONB keeps its own spacing


async def test_a_batch_keeps_each_stored_created_at(storage: str) -> None:
    backend = await get_backend(storage)
    old, new = uuid4(), uuid4()
    await backend.write_record(Record(old, "Item", b'{"name":"old"}', 1, T0, T0))
    batch = [
        Record(old, "Item", b'{"name":"old2"}', 1, T1, T1),
        Record(new, "Item", b'{"name":"new"}', 1, T1, T1),
    ]
    await backend.write_records(batch)
    assert [record.created_at for record in batch] == [T0, T1]
    stored = await backend.read_records("Item", [old, new])
    assert [(r.created_at, r.updated_at) for r in stored if r] == [(T0, T1), (T1, T1)]


# --- class filtering ---------------------------------------------------------------------------


async def test_an_id_of_another_class_is_unknown_to_every_operation(storage: str) -> None:
    Item = define_item(storage)
    backend = await get_backend(storage)
    id = uuid4()
    await backend.write_record(Record(id, "Other", b'{"name":"x"}', 1, T0, T0))
    reference = {"class_name": "Item", "id": str(id)}
    with pytest.raises(RecordNotFoundError, match=f"^no Item record with id {id}") as caught:
        await Item.load_external(reference)
    assert "Other" not in str(caught.value)
    assert await Item.exists_external(reference) is False
    assert await Item.load_external_many([reference], missing_ok=True) == [None]
    assert await backend.read_record("Other", id) is not None


# --- the edge of time --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "moment",
    [dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC), dt.datetime(1, 1, 1, tzinfo=dt.UTC)],
)
async def test_records_at_the_edge_of_time_load_on_a_ttl_class(
    storage: str, moment: dt.datetime
) -> None:
    Item = define_item(storage, ttl=3600)
    backend = await get_backend(storage)
    id = uuid4()
    await backend.write_record(Record(id, "Item", b'{"name":"edge"}', 1, moment, moment))
    reference = {"class_name": "Item", "id": str(id)}
    if moment.year == 9999:  # updated "in the future": not expired
        assert await Item.load_external(reference) == Item(name="edge")
        assert await Item.exists_external(reference) is True
        assert await Item.load_external_many([reference]) == [Item(name="edge")]
    else:  # updated at the dawn of time: long expired
        with pytest.raises(RecordNotFoundError):
            await Item.load_external(reference)
        assert await Item.exists_external(reference) is False
        assert await Item.load_external_many([reference], missing_ok=True) == [None]


@pytest.mark.parametrize("edge", ["infinity", "-infinity"])
async def test_postgresql_infinity_timestamps_load_on_a_ttl_class(
    postgresql_url: str, namespace: str, edge: str
) -> None:
    import asyncpg

    Item = define_item(postgresql_url, ttl=3600)
    reference = await Item(name="x").save_external()
    connection = await asyncpg.connect(postgresql_url.partition("?")[0])
    try:
        await connection.execute(
            f"UPDATE \"{namespace}\" SET created_at = '{edge}', updated_at = '{edge}'"
        )
    finally:
        await connection.close()
    if edge == "infinity":
        loaded = await Item.load_external(reference)
        assert loaded == Item(name="x")
        assert loaded.external_metadata is not None
        assert loaded.external_metadata.updated_at == dt.datetime.max.replace(tzinfo=dt.UTC)
        assert await Item.exists_external(reference) is True
    else:
        with pytest.raises(RecordNotFoundError):
            await Item.load_external(reference)
        assert await Item.exists_external(reference) is False
        assert await Item.load_external_many([reference], missing_ok=True) == [None]


# --- corrupt SQLite rows -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("schema_version", "'one'"),
        ("schema_version", "x'01'"),
        ("schema_version", "0"),
        ("created_at", "'garbage'"),
        ("updated_at", "'2024-01-02T03:04:05'"),  # no zone
        ("updated_at", "12"),
        ("class_name", "x'00'"),
    ],
)
async def test_corrupt_sqlite_rows_are_corrupt_record_errors(
    sqlite_url: str, column: str, value: str
) -> None:
    Item = define_item(sqlite_url, ttl=3600)
    reference = await Item(name="x").save_external()
    path = sqlite_url.removeprefix("sqlite:///")
    with closing(sqlite3.connect(path)) as connection, connection:
        connection.execute(f"UPDATE external_models SET {column} = {value}")
    with pytest.raises(CorruptRecordError) as caught:
        await Item.load_external(reference)
    assert str(caught.value).startswith(f"stored Item record {reference['id']} is corrupt")
    assert caught.value.class_name == "Item" and caught.value.id == reference["id"]
    with pytest.raises(CorruptRecordError):
        await Item.exists_external(reference)


async def test_sqlite_data_stored_as_a_blob_still_loads(sqlite_url: str) -> None:
    Item = define_item(sqlite_url)
    reference = await Item(name="blob").save_external()
    with closing(sqlite3.connect(sqlite_url.removeprefix("sqlite:///"))) as connection, connection:
        connection.execute("UPDATE external_models SET data = CAST(data AS BLOB)")
    assert await Item.load_external(reference) == Item(name="blob")


# --- no buffer outlives its error --------------------------------------------------------------


async def test_a_failed_decompression_keeps_no_buffer_alive(file_url: str) -> None:
    import zstandard

    Item = define_item(file_url)
    backend = await get_backend(file_url)
    id = uuid4()
    declared = 64 << 20
    frame = zstandard.ZstdCompressor().compress(b"\x00" * (declared + 4096))
    head = (
        f'{{"created_at":"{T0.isoformat()}","updated_at":"{T0.isoformat()}",'
        f'"schema_version":1,"class_name":"Item","codec":"zstd","size":{declared}}}\n'
    ).encode()
    path = backend.directory / "Item" / f"{id}.json"  # type: ignore[attr-defined]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(head + frame)
    gc.collect()
    tracemalloc.start()
    try:
        errors = []
        for _ in range(4):
            with pytest.raises(CorruptRecordError, match="not the declared") as caught:
                await Item.load_external({"class_name": "Item", "id": str(id)})
            errors.append(caught.value)
        gc.collect()
        held, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(errors) == 4
    assert held < 8 << 20, f"{held:,} bytes still held by four errors"


# --- options: one parser, one set of rules -----------------------------------------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite:///x.db?table=a&table=b", "sqlite option 'table' is given twice in the URL"),
        ("file:///tmp/x?fsync=true&fsync=false", "file option 'fsync' is given twice"),
        ("postgresql://h/db?table=a&table=b", "PostgreSQL option 'table' is given twice"),
        ("redis://h/0?prefix=a&prefix=b", "redis option 'prefix' is given twice"),
        ("s3://bucket?region=a&region=b", "S3 option 'region' is given twice"),
        ("s3://bucket?timeout=inf", "S3 option timeout must be a positive number of seconds"),
        ("redis://h/0?timeout=inf", "redis option timeout must be a positive number of seconds"),
        ("postgresql://h/db?timeout=inf", "PostgreSQL option timeout must be a positive number"),
        ("sqlite:///x.db?timout=3", "unknown sqlite option 'timout': did you mean 'timeout'?"),
        ("postgresql://h/db?sslmod=require", "unknown PostgreSQL option 'sslmod'"),
        ("file:///tmp/x?fsync=perhaps", "file option fsync must be true or false"),
        ("memory://x?anything=1", "unknown memory option 'anything'"),
    ],
)
def test_options_follow_one_set_of_rules(url: str, message: str) -> None:
    with pytest.raises(StorageValidationError, match=message.replace("?", r"\?")):
        define_item(url)


def test_an_empty_class_name_is_refused() -> None:
    with pytest.raises(StorageValidationError, match="invalid class name ''"):
        define_item("memory://x", class_name="")


def test_a_config_typo_is_refused_with_a_suggestion() -> None:
    with pytest.raises(
        StorageValidationError, match=r"unknown ExternalConfigDict key 'tll'.*'ttl'"
    ):
        define_item("memory://x", tll=60)
    with pytest.raises(StorageValidationError, match=r"'schema_verison'.*'schema_version'"):
        define_item("memory://x", schema_verison=2)


async def test_a_value_that_cannot_round_trip_is_refused_at_save(storage: str) -> None:
    class Reading(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=storage)
        values: list[float]

    with pytest.raises(StorageValidationError, match=r"Reading field values\.1 is not a finite"):
        await Reading(values=[1.0, float("nan")]).save_external()

    class Counted(ExternalBaseModel):  # no float: nothing to check, and saved first
        model_config = ExternalConfigDict(storage=storage)
        count: int

    class Measured(Counted):  # its own check, not its base's
        weight: float

    await Counted(count=1).save_external()
    with pytest.raises(StorageValidationError, match=r"Measured field weight is not a finite"):
        await Measured(count=1, weight=float("inf")).save_external()

    class Lenient(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=storage, ser_json_inf_nan="strings")
        value: float

    loaded = await Lenient.load_external(await Lenient(value=float("inf")).save_external())
    assert loaded.value == float("inf")


class Reading(BaseModel):
    value: float
    spare: float | None = None
    note: str = "n" * 40


class Readings(BaseModel):
    first: Reading = Reading(value=0)
    last: Reading = Reading(value=0)
    series: dict[str, list[float]] = {}


class Tree(BaseModel):
    weight: float
    children: list[Tree] = []


Tree.model_rebuild()


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        ({"readings": [{"value": 1.0}] * 60 + [{"value": float("nan")}]}, "readings.60.value"),
        ({"readings": [{"value": 1.0, "spare": float("-inf")}] * 60}, "readings.0.spare"),
        ({"pair": {"first": {"value": 2}, "last": {"value": float("inf")}}}, "pair.last.value"),
        ({"pair": {"series": {"a": [1.0] * 300 + [float("nan")]}}}, "pair.series.a.300"),
        ({"tree": {"weight": 1, "children": [{"weight": float("nan")}]}}, "tree.children.0"),
    ],
)
async def test_a_non_finite_float_anywhere_in_a_large_model_is_refused(
    memory_url: str, fields: dict[str, Any], where: str
) -> None:
    class Large(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=memory_url)
        readings: list[Reading] = []
        pair: Readings = Readings()
        text: str = "t" * 4000

    class LargeTree(Large):  # recursive: its floats are found another way
        tree: Tree = Tree(weight=0)

    cls = LargeTree if "tree" in fields else Large
    # Finite values stay storable, also when their sum overflows or an optional one is None.
    big = cls(readings=[{"value": 1e308, "spare": None}] * 60)
    assert await cls.load_external(await big.save_external()) == big
    with pytest.raises(StorageValidationError, match=rf"{cls.__name__} field {where}\b.* not a"):
        await cls.model_validate(fields).save_external()


# --- errors that decide retries ----------------------------------------------------------------


class Flaky(StorageBackend):
    """A four-method backend that fails as it is told, counting attempts."""

    failure: BaseException | None = None
    attempts = 0

    async def connect(self) -> None: ...

    async def disconnect(self) -> None: ...

    async def save(self, id: UUID, class_name: str, data: dict[str, Any]) -> None:
        type(self).attempts += 1
        if self.failure is not None:
            raise self.failure

    async def load(self, id: UUID, class_name: str) -> dict[str, Any] | None:
        return None


@pytest.mark.parametrize(
    ("failure", "kind", "attempts"),
    [
        (ConnectionResetError(errno.ECONNRESET, "reset"), StorageConnectionError, 3),
        (TimeoutError("slow"), StorageConnectionError, 3),
        (OSError(errno.ENOSPC, "No space left on device"), StorageOperationError, 1),
        (PermissionError(errno.EACCES, "Permission denied"), StorageOperationError, 1),
        (ValueError("a bug in the backend"), StorageOperationError, 1),
        (TypeError("another bug"), StorageOperationError, 1),
    ],
)
async def test_only_transient_failures_are_retried(
    failure: BaseException, kind: type[ExternalStorageError], attempts: int
) -> None:
    register_backend("flakyspine", Flaky)
    Item = define_item("flakyspine://x", retry_backoff=0.001)
    Flaky.failure, Flaky.attempts = failure, 0
    with pytest.raises(kind) as caught:
        await Item(name="x").save_external()
    assert Flaky.attempts == attempts
    assert caught.value.__cause__ is failure
    assert type(failure).__name__ in str(caught.value)
    if kind is StorageOperationError:
        assert not isinstance(caught.value, StorageConnectionError)


async def test_a_closed_backend_is_a_permanent_error(storage: str) -> None:
    backend = await get_backend(storage)
    fresh = type(backend)(backend.url)
    if storage.startswith(("memory://", "file://", "dictstore://")):
        pytest.skip("nothing to close: these backends hold no connection")
    with pytest.raises(StorageOperationError, match="not connected"):
        await fresh.read_record("Item", uuid4())


async def test_a_four_method_backend_says_what_it_cannot_do() -> None:
    backend = Flaky("flakyspine://x")
    with pytest.raises(UnsupportedOperationError, match="does not support deleting"):
        await backend.delete_records("Item", [uuid4()])
    with pytest.raises(NotImplementedError):
        [info async for info in backend.scan_records("Item")]


@pytest.mark.parametrize(
    "error",
    [
        RecordNotFoundError("Item", [str(UUID(int=1)), str(UUID(int=2))], "redis://u:pw@h/0"),
        StorageConnectionError("boom", "postgresql://u:s3cretPW@h/db", failed_ids=["a"]),
        StorageOperationError("refused", "s3://bucket", failed_ids=["b"]),
        UnsupportedOperationError("cannot", "x://y"),
        StorageValidationError("bad"),
        CorruptRecordError("Item", UUID(int=3), "garbage"),
    ],
)
def test_every_error_survives_copy_and_pickle(error: ExternalStorageError) -> None:
    for clone in (copy.copy(error), copy.deepcopy(error), pickle.loads(pickle.dumps(error))):
        assert type(clone) is type(error)
        assert str(clone) == str(error)
        assert clone.__dict__ == error.__dict__
        assert "s3cretPW" not in str(clone) and "s3cretPW" not in repr(clone)
    if isinstance(error, RecordNotFoundError):
        assert pickle.loads(pickle.dumps(error)).ids == error.ids


def test_the_public_names_are_pinned() -> None:
    import pydantic_toast

    assert sorted(pydantic_toast.__all__) == [
        "CorruptRecordError",
        "External",
        "ExternalBaseModel",
        "ExternalConfigDict",
        "ExternalField",
        "ExternalMetadata",
        "ExternalNameWarning",
        "ExternalReference",
        "ExternalStorageError",
        "GarbageReport",
        "Keyring",
        "RecordNotFoundError",
        "RekeyReport",
        "StorageBackend",
        "StorageConnectionError",
        "StorageOperationError",
        "StorageValidationError",
        "UnsupportedOperationError",
        "aclose",
        "close",
        "collect_garbage",
        "collect_garbage_sync",
        "dump",
        "dump_json",
        "dump_json_sync",
        "dump_sync",
        "register_backend",
        "rekey",
        "rekey_sync",
        "use_keyring",
        "validate",
        "validate_sync",
    ]
    for name in pydantic_toast.__all__:
        assert getattr(pydantic_toast, name) is not None


# --- found by review: each of these failed before its fix ---------------------------------


async def test_a_failed_mixed_batch_names_every_unconfirmed_record(
    file_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pydantic_toast.backends.file import FileBackend

    Item = define_item(file_url, retries=0)
    old = Item(name="old")
    reference = await old.save_external()
    old.name = "changed"  # type: ignore[attr-defined]
    new = Item(name="new")

    async def refused(self: FileBackend, records: Any) -> list[bool]:
        raise ConnectionResetError(errno.ECONNRESET, "reset")

    monkeypatch.setattr(FileBackend, "put_new", refused)
    with pytest.raises(StorageConnectionError) as caught:
        await Item.save_external_many([old, new])
    assert set(caught.value.failed_ids) == {reference["id"], str(new._external_pending_id)}  # type: ignore[attr-defined]
    assert (await Item.load_external(reference)).name == "old"  # type: ignore[attr-defined]
    monkeypatch.undo()
    await Item.save_external_many([old, new])  # saving again completes the batch
    assert await Item.load_external(reference) == old


async def test_one_corrupt_record_fails_only_its_own_coalesced_load(
    redis_url: str, namespace: str
) -> None:
    import redis.asyncio as aioredis

    Item = define_item(redis_url)
    references = await Item.save_external_many([Item(name=f"n{i}") for i in range(20)])
    bad = uuid4()
    raw = aioredis.Redis.from_url(redis_url.partition("?")[0])
    try:
        await raw.set(f"{namespace}:Item:{bad}", b"garbage")
    finally:
        await raw.aclose()
    results = await asyncio.gather(
        *(Item.load_external(r) for r in [*references, {"class_name": "Item", "id": str(bad)}]),
        return_exceptions=True,
    )
    assert results[:20] == [Item(name=f"n{i}") for i in range(20)]
    assert isinstance(results[20], CorruptRecordError) and str(bad) in str(results[20])


async def test_purge_refuses_an_age_that_is_not_positive(memory_url: str) -> None:
    Item = define_item(memory_url)
    await Item(name="fresh").save_external()
    for age in (dt.timedelta(days=-1), dt.timedelta(0), -5, "30d"):
        with pytest.raises(StorageValidationError, match="positive duration"):
            await Item.purge_external(older_than=age)  # type: ignore[arg-type]
    assert await Item.purge_external(older_than=3600) == 0  # seconds, as ttl takes them


def test_postgresql_dsn_parameters_are_checked_at_definition() -> None:
    for query in ("sslmode=bogus", "target_session_attrs=nonsense"):
        with pytest.raises(StorageValidationError, match="must be one of"):
            define_item(f"postgresql://h/db?{query}")


def test_a_custom_options_model_refuses_unknown_options() -> None:
    from pydantic_toast.backends import BackendOptions, Seconds

    class KVOptions(BackendOptions):
        label = "kv"
        timeout: Seconds = 5.0

    class KV(Flaky):
        options_model = KVOptions

    assert KV("kv://x?timeout=2").options.timeout == 2  # type: ignore[attr-defined]
    with pytest.raises(StorageValidationError, match="unknown kv option 'Timeout'"):
        KV("kv://x?Timeout=3")
    with pytest.raises(StorageValidationError, match="unknown kv option 'pollsize'"):
        KV("kv://x", pollsize=3)


async def test_delete_external_takes_an_instance_or_a_reference(storage: str) -> None:
    Item = define_item(storage)
    a, b = Item(name="a"), Item(name="b")
    reference_a, reference_b = await a.save_external(), await b.save_external()
    with pytest.raises(StorageValidationError, match="deletes the model's own record"):
        await a.delete_external(reference_b)
    if storage.startswith("dictstore://"):
        return  # a four-method backend cannot delete
    results = await asyncio.gather(a.delete_external(), a.delete_external())
    assert sorted(results) == [False, True] or results == [True, True]
    assert await Item.exists_external(reference_a) is False
    assert await Item.exists_external(reference_b) is True


async def test_a_short_password_in_a_custom_backends_message_is_masked() -> None:
    import traceback

    class Quoting(Flaky):
        async def save(self, id: UUID, class_name: str, data: dict[str, Any]) -> None:
            raise RuntimeError(f"could not reach {self.url}")

    register_backend("leakyquote", Quoting)
    Item = define_item("leakyquote://user:pw9@db.internal:99/x", retries=0)
    with pytest.raises(StorageOperationError) as caught:
        await Item(name="x").save_external()
    shown = "".join(traceback.format_exception(caught.value))
    assert "pw9" not in shown and "pw9" not in repr(caught.value)
    assert "user:***@db.internal" in str(caught.value)


async def test_a_library_error_is_never_its_own_cause(sqlite_url: str) -> None:
    from pydantic_toast.backends.sqlite import SQLiteBackend

    backend = SQLiteBackend(sqlite_url)  # never connected
    with pytest.raises(StorageOperationError, match="not connected") as caught:
        [info async for info in backend.scan_records("Item")]
    assert caught.value.__cause__ is not caught.value


async def test_a_wrapper_that_overrides_only_the_batch_operations(memory_url: str) -> None:
    inner = await get_backend(memory_url)

    class Wrapper(StorageBackend):
        async def connect(self) -> None: ...

        async def disconnect(self) -> None: ...

        async def write_records(self, records: Any) -> None:
            await inner.write_records(records)

        async def read_records(self, class_name: str, ids: Any) -> list[Record | None]:
            return await inner.read_records(class_name, ids)

    wrapper = Wrapper("wrapper://x")
    id = uuid4()
    await wrapper.write_record(Record(id, "Item", b'{"name":"w"}', 1, T0, T0))
    stored = await wrapper.read_record("Item", id)
    assert stored is not None and stored.data == b'{"name":"w"}'


def test_the_sync_twins_are_named_and_documented_as_themselves() -> None:
    import inspect

    Item = define_item("memory://twins")
    twin = Item.load_external_sync
    assert twin.__name__ == "load_external_sync"
    assert twin.__doc__ is not None and twin.__doc__.startswith("`load_external` for synchronous")
    assert "RecordNotFoundError" in twin.__doc__  # the async method's documentation follows
    assert list(inspect.signature(twin).parameters) == ["reference"]
    assert not inspect.iscoroutinefunction(twin) and not hasattr(twin, "__wrapped__")
    assert Item.delete_external.__doc__ is not None
    assert Item.delete_external.__doc__.startswith("Delete a record")


async def test_a_keyword_replaces_a_redis_driver_option_of_the_url(redis_url: str) -> None:
    from pydantic_toast.backends.redis import RedisBackend

    backend = RedisBackend(f"{redis_url}&client_name=fromurl", client_name="fromkw")
    await backend.open()
    try:
        assert backend._client is not None
        assert await backend._client.client_getname() in ("fromkw", b"fromkw")
    finally:
        await backend.disconnect()


def test_a_record_copy_keeps_every_field() -> None:
    values = {field.name: object() for field in dataclasses.fields(Record)}
    record = Record(**values)
    copied = record.copy()
    assert copied is not record
    assert {name: getattr(copied, name) for name in values} == values


# --- the envelope read by position -----------------------------------------------------------

_HEADER = (
    b'{"created_at":"2024-01-02T03:04:05.678901+00:00","updated_at":"2024-01-02T03:04:06.'
    b'000001+05:00","schema_version":%s,"class_name":"%s","data":{"n":1}}'
)


def _by_json(raw: bytes, id: UUID) -> Record:
    """What the envelope says, read by a JSON parser: what the positional read must match."""
    stored = json.loads(raw)
    return Record(
        id,
        stored["class_name"],
        json.dumps(stored["data"], separators=(",", ":")).encode(),
        stored["schema_version"],
        dt.datetime.fromisoformat(stored["created_at"]),
        dt.datetime.fromisoformat(stored["updated_at"]),
    )


@pytest.mark.parametrize(
    ("version", "name"),
    [(b"1", b"Doc"), (b"2147483647", b"_a.b-C9"), (b"12", b"N" * 200), (b" 3", b"Doc")],
)
def test_an_envelope_decodes_as_its_json_says(version: bytes, name: bytes) -> None:
    from pydantic_toast.backends.records import decode_stored

    id = uuid4()
    raw = _HEADER % (version, name)
    for _ in range(2):  # the second read finds name and moments already read
        assert decode_stored(raw, id, name.decode()) == _by_json(raw, id)


@pytest.mark.parametrize(
    ("version", "name"),
    [
        (b"0", b"Doc"),
        (b"01", b"Doc"),
        (b"-1", b"Doc"),
        (b"2147483648", b"Doc"),
        (b"1", b"9Doc"),
        (b"1", b"Do c"),
        (b"1", b"N" * 201),
        (b"1", b""),
    ],
)
def test_an_envelope_with_a_bad_header_is_corrupt(version: bytes, name: bytes) -> None:
    from pydantic_toast._errors import CorruptRecordError
    from pydantic_toast.backends.records import decode_stored

    id = uuid4()
    with pytest.raises(CorruptRecordError, match=f"stored Doc record {id} is corrupt"):
        decode_stored(_HEADER % (version, name), id, "Doc")


def test_envelopes_sharing_a_header_keep_their_own_data_and_ends() -> None:
    from pydantic_toast._errors import CorruptRecordError
    from pydantic_toast.backends.records import decode_stored

    first, second, broken = uuid4(), uuid4(), uuid4()
    raw = _HEADER % (b"1", b"Doc")
    assert decode_stored(raw, first, "Doc") == _by_json(raw, first)
    other = raw.replace(b'{"n":1}', b'{"n":2,"data":3}')  # the header read before, other data
    assert decode_stored(other, second, "Doc") == _by_json(other, second)
    with pytest.raises(CorruptRecordError, match=f"stored Doc record {broken} is corrupt"):
        decode_stored(raw + b" ", broken, "Doc")  # the same header, not ended by a brace


def test_an_envelope_with_a_naive_or_broken_timestamp_is_corrupt() -> None:
    from pydantic_toast._errors import CorruptRecordError
    from pydantic_toast.backends.records import decode_stored

    id = uuid4()
    good = _HEADER % (b"1", b"Doc")
    for broken in (
        good.replace(b"+00:00", b"      ", 1),  # same width, no zone
        good.replace(b"03:04:05", b"03:04:65", 1),
        good.replace(b"+05:00", b"+05:0x", 1),
    ):
        with pytest.raises(CorruptRecordError, match=f"stored Doc record {id} is corrupt"):
            decode_stored(broken, id, "Doc")
