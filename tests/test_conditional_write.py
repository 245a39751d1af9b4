"""The conditional write (`StorageBackend.write_records_if_unchanged`, a compare-and-set on
``updated_at``) on every backend, the four-method one included, and the two rewrites that rely
on it: key rotation and the write-back of migrated records, each with a save landing between
its read and its write."""

from __future__ import annotations

import datetime as dt
import json
import os
import resource
import signal
from typing import Any
from uuid import UUID, uuid4

import pytest

import pydantic_toast._operations as operations
import pydantic_toast._rekey as rekeying
from pydantic_toast import (
    ExternalBaseModel,
    ExternalConfigDict,
    Keyring,
    StorageBackend,
    StorageOperationError,
    StorageValidationError,
    UnsupportedOperationError,
    register_backend,
    rekey,
    use_keyring,
)
from pydantic_toast._registry import get_backend
from pydantic_toast.backends.records import Record
from tests.conftest import BACKENDS
from tests.dict_backend import DictBackend

# Tests define one stored name in several classes on purpose (a model before and after); marked
# on each, since the cluster's tests reuse them.
same_name_twice = pytest.mark.filterwarnings("ignore::pydantic_toast.ExternalNameWarning")

T0 = dt.datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC)
T1 = T0 + dt.timedelta(hours=1)
T2 = T0 + dt.timedelta(hours=2)
K1, K2 = bytes(range(32)), bytes(range(100, 132))


def line(id: UUID, n: int, updated_at: dt.datetime = T0, class_name: str = "Line") -> Record:
    return Record(id, class_name, json.dumps({"n": n}).encode(), 1, T0, updated_at)


async def stored_n(backend: StorageBackend, id: UUID, class_name: str = "Line") -> int | None:
    record = await backend.read_record(class_name, id)
    return None if record is None else int(json.loads(record.data)["n"])


# --- the primitive's contract ------------------------------------------------------------------


class DeletingDictBackend(DictBackend):
    """The four methods and a first-round ``delete``: the spine's re-read-then-write."""

    async def delete(self, id: UUID, class_name: str) -> bool:
        return self.store.pop(id, None) is not None


register_backend("dictcas", DeletingDictBackend)


@pytest.fixture(params=BACKENDS)
def storage(request: pytest.FixtureRequest, namespace: str) -> str:
    """Every backend; "custom" is a four-method one (that can delete)."""
    if request.param == "custom":
        return f"dictcas://{namespace}"
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


async def test_only_records_still_as_read_are_written(storage: str) -> None:
    backend = await get_backend(storage)
    same, changed, deleted, missing = uuid4(), uuid4(), uuid4(), uuid4()
    await backend.write_records([line(same, 1), line(changed, 1), line(deleted, 1)])
    await backend.write_record(line(changed, 2, T1))  # saved since it was read at T0
    await backend.delete_records("Line", [deleted])
    written = await backend.write_records_if_unchanged(
        [line(same, 10, T2), line(changed, 10, T2), line(deleted, 10, T2), line(missing, 10, T2)],
        [T0, T0, T0, T0],
    )
    assert written == [same]
    assert [await stored_n(backend, id) for id in (same, changed, deleted, missing)] == [
        10,
        2,
        None,
        None,
    ]
    record = await backend.read_record("Line", same)
    assert record is not None
    assert (record.created_at, record.updated_at) == (T0, T2)


async def test_the_comparison_is_exact_to_the_microsecond_in_any_timezone(storage: str) -> None:
    backend = await get_backend(storage)
    id = uuid4()
    await backend.write_record(line(id, 1))
    off_by_one = T0 + dt.timedelta(microseconds=1)
    assert await backend.write_records_if_unchanged([line(id, 2, T1)], [off_by_one]) == []
    assert await stored_n(backend, id) == 1
    elsewhere = T0.astimezone(dt.timezone(dt.timedelta(hours=5, minutes=30)))
    assert await backend.write_records_if_unchanged([line(id, 3, T1)], [elsewhere]) == [id]
    assert await stored_n(backend, id) == 3
    # written once: the record now has T1, so the same write again is refused
    assert await backend.write_records_if_unchanged([line(id, 4, T2)], [T0]) == []
    assert await stored_n(backend, id) == 3


async def test_a_record_of_another_class_under_the_id_is_left_alone(storage: str) -> None:
    backend = await get_backend(storage)
    id = uuid4()
    await backend.write_record(line(id, 1, class_name="Part"))
    written = await backend.write_records_if_unchanged([line(id, 2, T1)], [T0])
    assert written == []
    assert await stored_n(backend, id, "Part") == 1
    assert await backend.read_record("Line", id) is None


async def test_many_records_in_chunks_report_each_one(storage: str) -> None:
    backend = await get_backend(storage)
    ids = [uuid4() for _ in range(30)]
    await backend.write_records([line(id, 0) for id in ids])
    await backend.write_records([line(id, 1, T1) for id in ids[::3]])  # changed meanwhile
    written = await backend.write_records_if_unchanged(
        [line(id, 5, T2) for id in ids], [T0] * len(ids)
    )
    assert written == [id for i, id in enumerate(ids) if i % 3]
    assert [await stored_n(backend, id) for id in ids] == [
        1 if i % 3 == 0 else 5 for i in range(len(ids))
    ]


@pytest.mark.parametrize(
    ("records", "updated_at", "message"),
    [
        ([line(UUID(int=1), 1)], [T0, T0], "needs one updated_at per record: 1 records, 2"),
        ([line("nope", 1)], [T0], "a record id is a UUID, not str"),  # type: ignore[arg-type]
        (
            [line(UUID(int=1), 1), line(UUID(int=1), 2)],
            [T0, T0],
            f"Line record {UUID(int=1)} is given twice to one conditional write",
        ),
        (
            [line(UUID(int=1), 1)],
            [dt.datetime(2024, 1, 2)],
            f"updated_at of Line record {UUID(int=1)} must be an aware datetime",
        ),
        ([line(UUID(int=1), 1, class_name="../x")], [T0], "invalid class name '../x'"),
    ],
)
async def test_bad_arguments_are_refused_before_any_write(
    memory_url: str, records: list[Record], updated_at: list[dt.datetime], message: str
) -> None:
    backend = await get_backend(memory_url)
    with pytest.raises(StorageValidationError, match=message.replace("(", r"\(")):
        await backend.write_records_if_unchanged(records, updated_at)
    assert [info async for info in backend.scan_records()] == []


async def test_the_capability_is_declared_by_the_engines_that_are_atomic() -> None:
    from pydantic_toast.backends.file import FileBackend
    from pydantic_toast.backends.memory import MemoryBackend
    from pydantic_toast.backends.postgresql import PostgreSQLBackend
    from pydantic_toast.backends.redis import RedisBackend
    from pydantic_toast.backends.s3 import S3Backend
    from pydantic_toast.backends.sqlite import SQLiteBackend

    engines = [
        MemoryBackend,
        SQLiteBackend,
        FileBackend,
        PostgreSQLBackend,
        RedisBackend,
        S3Backend,
    ]
    assert [engine.capabilities.conditional_write for engine in engines] == [True] * 6
    assert DictBackend.capabilities.conditional_write is False
    with pytest.raises(UnsupportedOperationError, match="DictBackend has no conditional write"):
        await DictBackend("dictstore://x").put_unchanged([line(uuid4(), 1)], [T0])


# --- rekey with a save landing between its read and its write ----------------------------------


@pytest.fixture
def keyring() -> Any:
    ring = Keyring({"k1": K1}, "k1")
    use_keyring(ring)
    yield ring
    use_keyring(None)


@same_name_twice
async def test_a_save_during_rekey_is_kept_and_reported_as_changed(
    storage: str, keyring: Keyring, monkeypatch: pytest.MonkeyPatch
) -> None:
    class User(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=storage, encrypt=True)
        email: str

    users = [User(email=f"user{i}@example.com") for i in range(4)]
    references = await User.save_external_many(users)
    if storage.startswith("dictcas:"):  # a four-method backend cannot list its records
        with pytest.raises(UnsupportedOperationError, match="does not support listing"):
            await rekey(User)
        return
    use_keyring(Keyring({"k1": K1, "k2": K2}, "k2"))
    read = rekeying._read

    async def read_then_someone_saves(name: str, ids: list[UUID], backend: Any) -> Any:
        found = await read(name, ids, backend)
        # ... and before rekey writes its batch back, an application saves one of them.
        edited = await User.load_external(references[1])
        edited.email = "edited@example.com"  # type: ignore[attr-defined]
        await edited.save_external()
        return found

    monkeypatch.setattr(rekeying, "_read", read_then_someone_saves)
    report = await rekey(User)
    monkeypatch.undo()
    assert (report.scanned, report.rekeyed, report.changed, report.skipped) == (4, 3, 1, 0)
    use_keyring(Keyring({"k2": K2}, "k2"))  # the save used the primary key: nothing is left
    loaded = await User.load_external_many(references)
    assert [user.email for user in loaded] == [  # type: ignore[attr-defined]
        "user0@example.com",
        "edited@example.com",
        "user2@example.com",
        "user3@example.com",
    ]
    again = await rekey(User)
    assert (again.rekeyed, again.changed, again.skipped) == (0, 0, 4)


# --- the write-back of migrated records --------------------------------------------------------


@same_name_twice
async def test_a_save_during_a_migrated_write_back_is_not_overwritten(
    storage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    class User(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=storage, class_name="User")
        name: str

    reference = await User(name="Grace Hopper").save_external()

    class User2(ExternalBaseModel):
        model_config = ExternalConfigDict(
            storage=storage, class_name="User", schema_version=2, save_migrated=True
        )
        full_name: str

    @User2.migration(from_version=1)
    def rename(data: dict[str, Any]) -> dict[str, Any]:
        return {"full_name": data["name"]}

    backend = await get_backend(storage)
    id = UUID(reference["id"])
    write_back = operations._write_back

    async def someone_saves_first(cls: Any, migrated: list[Record]) -> None:
        # Between the load's read and its write-back, a newer process saves the record.
        saved = Record(id, "User", b'{"full_name":"Grace B. Hopper"}', 2, T0, T2)
        await backend.write_record(saved)
        await write_back(cls, migrated)

    monkeypatch.setattr(operations, "_write_back", someone_saves_first)
    loaded = await User2.load_external(reference)
    monkeypatch.undo()
    assert loaded.full_name == "Grace Hopper"  # type: ignore[attr-defined]
    stored = await backend.read_record("User", id)
    assert stored is not None
    assert (json.loads(stored.data), stored.schema_version, stored.updated_at) == (
        {"full_name": "Grace B. Hopper"},
        2,
        T2,
    )


# --- engines that check, then write: a save between the two -----------------------------------


async def test_a_file_saved_after_the_first_look_is_not_overwritten(
    file_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another thread or process saves the record between the file backend's first look
    (unchanged) and its swap: the save stays."""
    from pydantic_toast.backends.file import FileBackend

    backend = await get_backend(file_url)
    id = uuid4()
    await backend.write_record(line(id, 1))
    looked = await FileBackend.get_many(backend, "Line", [id])

    async def first_look(self: FileBackend, class_name: str, ids: Any) -> list[bytes | None]:
        await FileBackend.put_many(self, [line(id, 2, T1)])
        return looked

    monkeypatch.setattr(FileBackend, "get_many", first_look)
    assert await backend.write_records_if_unchanged([line(id, 3, T2)], [T0]) == []
    monkeypatch.undo()
    assert await stored_n(backend, id) == 2
    assert sorted(os.listdir(backend.directory / "Line")) == [f"{id}.json"]


async def test_a_file_write_that_fails_leaves_the_record_as_it_was(file_url: str) -> None:
    """The file backend moves the record aside to check it; when writing the new one fails
    (here the file size limit, as a full disk would), the old one goes back in place."""
    backend = await get_backend(file_url)
    id = uuid4()
    await backend.write_record(line(id, 1))
    big = Record(id, "Line", json.dumps({"n": 2, "pad": "x" * 100_000}).encode(), 1, T0, T1)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG, not the signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, hard))
    try:
        with pytest.raises(StorageOperationError) as caught:
            await backend.write_records_if_unchanged([big], [T0])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert str(caught.value) == (
        f"directory {backend.directory} could not save Line record {id}: "
        f"OSError: [Errno 27] File too large ({file_url})"
    )
    assert caught.value.failed_ids == [str(id)]
    assert await stored_n(backend, id) == 1
    assert sorted(os.listdir(backend.directory / "Line")) == [f"{id}.json"]


async def test_an_s3_object_saved_after_it_was_read_is_not_overwritten(
    s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """S3 refuses the write (``If-Match`` on the ETag read) when another client replaced the
    object after it was read."""
    from pydantic_toast.backends.s3 import S3Backend

    backend = await get_backend(s3_url)
    id = uuid4()
    await backend.write_record(line(id, 1))
    get_object = S3Backend._get_object

    async def read_then_someone_saves(self: S3Backend, class_name: str, id: UUID) -> Any:
        found = await get_object(self, class_name, id)
        await S3Backend.put_many(self, [line(id, 2, T1)])
        return found

    monkeypatch.setattr(S3Backend, "_get_object", read_then_someone_saves)
    assert await backend.write_records_if_unchanged([line(id, 3, T2)], [T0]) == []
    monkeypatch.undo()
    assert await stored_n(backend, id) == 2
