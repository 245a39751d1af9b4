"""ExternalBaseModel's own behaviour: class definition checks, references, masking, and the
lifecycle of backends (one per URL and loop, connected once, closed on request and at exit)."""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import logging
import pickle
import re
import subprocess
import sys
import textwrap
import threading
import traceback
from typing import Any, ClassVar
from uuid import UUID, uuid4

import pytest
from pydantic import BaseModel, ValidationError

import pydantic_toast
from pydantic_toast import (
    ExternalBaseModel,
    ExternalConfigDict,
    StorageBackend,
    StorageConnectionError,
    StorageValidationError,
    _registry,
    register_backend,
)
from pydantic_toast._errors import CorruptRecordError, StorageOperationError, mask_url
from pydantic_toast._registry import get_backend
from pydantic_toast.backends.base import Record
from pydantic_toast.backends.records import decode_stored


class CountingBackend(StorageBackend):
    """Counts connects and disconnects; stores in memory, four methods only."""

    connects: ClassVar[int] = 0
    disconnects: ClassVar[int] = 0

    async def connect(self) -> None:
        await asyncio.sleep(0.01)  # a slow handshake invites concurrent connects
        type(self).connects += 1
        self.store: dict[UUID, dict[str, Any]] = {}

    async def disconnect(self) -> None:
        type(self).disconnects += 1

    async def save(self, id: UUID, class_name: str, data: dict[str, Any]) -> None:
        self.store[id] = data

    async def load(self, id: UUID, class_name: str) -> dict[str, Any] | None:
        return self.store.get(id)


@pytest.fixture
def counting() -> type[CountingBackend]:
    CountingBackend.connects = CountingBackend.disconnects = 0
    register_backend("counting", CountingBackend)
    return CountingBackend


# --- class definition ------------------------------------------------------------------------


def test_missing_storage_fails_at_class_definition() -> None:
    with pytest.raises(StorageValidationError) as caught:

        class NoStorage(ExternalBaseModel):
            name: str

    message = str(caught.value)
    assert "NoStorage has no storage" in message
    assert "registered schemes:" in message and "sqlite" in message and "postgresql" in message


def test_unknown_scheme_fails_at_class_definition_naming_class_and_schemes() -> None:
    with pytest.raises(StorageValidationError) as caught:

        class Unknown(ExternalBaseModel):
            model_config = ExternalConfigDict(storage="mongodb://user:hunter2pw@host/db")

    message = str(caught.value)
    assert "Unknown" in message
    assert "unknown storage scheme 'mongodb'" in message
    assert (
        "memory, postgres, postgresql, redis, redis+cluster, redis+sentinel, redis+unix, "
        "rediss, rediss+cluster, s3, sqlite" in message
    )
    assert "hunter2pw" not in message


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "has no storage"),
        ("not a url", "malformed storage URL 'not a url'"),
        ("sqlite:/no-slashes.db", "malformed storage URL"),
        ("sqlite://host/x.db", "sqlite URLs have no host"),
        ("sqlite:///:memory:", "for memory use memory://"),
        ("sqlite:///x.db?colour=blue", "unknown sqlite option"),
        ("sqlite:///x.db?table=x;drop", "table must be a table name"),
        ("sqlite:///x.db?timeout=-1", "timeout must be a positive number"),
        ("sqlite:///x.db?timeout=nan", "timeout must be a positive number"),
        ("sqlite:///x.db?timeout=soon", "timeout must be a positive number"),
        ("file://remote-host/dir", "file URLs name a local directory"),
        ("http://[::1/x", "malformed storage URL"),
        ("redis://h:99999/0", "malformed storage URL 'redis://h:99999/0': port 99999 is not"),
        # a raw '/' ends the authority early: the password's start would pass for the port
        (
            "postgresql://u:Zq9secretXy/x@h:5432/db",
            "malformed storage URL 'postgresql://u:***@h:5432/db': the port is not a number",
        ),
    ],
)
def test_malformed_urls_fail_at_class_definition(url: str, message: str) -> None:
    with pytest.raises(StorageValidationError, match=re.escape(message)) as caught:

        class Broken(ExternalBaseModel):
            model_config = ExternalConfigDict(storage=url)

    assert "Broken" in str(caught.value)
    assert "Zq9secret" not in chained_messages(caught.value)


def chained_messages(error: BaseException) -> str:
    """What a traceback of ``error`` says of it and of every exception chained to it (not
    the source lines it quotes, which hold this module's own literals)."""
    texts = []
    current: BaseException | None = error
    while current is not None:
        texts.append("".join(traceback.format_exception_only(current)))
        current = current.__cause__ or (
            None if current.__suppress_context__ else current.__context__
        )
    return "\n".join(texts)


def test_storage_must_be_a_string() -> None:
    with pytest.raises(StorageValidationError, match="must be a non-empty string"):

        class Numeric(ExternalBaseModel):
            model_config = ExternalConfigDict(storage=123)  # type: ignore[typeddict-item]


@pytest.mark.parametrize("version", [0, -1, "2", True, 1.5])
def test_schema_version_must_be_a_positive_int(version: Any) -> None:
    with pytest.raises(StorageValidationError, match="schema_version must be a positive int"):

        class Versioned(ExternalBaseModel):
            model_config = ExternalConfigDict(storage="memory://x", schema_version=version)


@pytest.mark.parametrize(
    ("ttl", "shown"),
    [
        (float("inf"), "inf"),
        (float("nan"), "nan"),
        (10**20, "100000000000000000000"),
        (-1, "-1"),  # as given, not as the timedelta it makes
        (dt.timedelta(seconds=-5), "datetime.timedelta(days=-1, seconds=86395)"),
    ],
)
def test_a_ttl_no_timedelta_can_hold_is_refused_naming_the_class(ttl: Any, shown: str) -> None:
    with pytest.raises(StorageValidationError) as caught:

        class Cached(ExternalBaseModel):
            model_config = ExternalConfigDict(storage="memory://x", ttl=ttl)

    assert str(caught.value).endswith(f"Cached: ttl must be a positive duration, not {shown}")


def test_file_url_with_empty_host_is_accepted(tmp_path: Any) -> None:
    class Note(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=f"file://{tmp_path}/notes")
        text: str

    reference = Note(text="hi").save_external_sync()
    assert Note.load_external_sync(reference) == Note(text="hi")
    stored = tmp_path / "notes" / "Note" / f"{reference['id']}.json"
    assert stored.is_file()


def test_config_is_inherited_and_plain_pydantic_still_works() -> None:
    class Base(ExternalBaseModel):
        model_config = ExternalConfigDict(storage="memory://inherit", frozen=True)

    class Child(Base):
        name: str
        size: int = 0

    child = Child(name="c", size=2)
    assert child.model_dump() == {"name": "c", "size": 2}
    assert child.model_dump_json() == '{"name":"c","size":2}'
    assert Child.model_validate({"name": "c", "size": 2}) == child
    assert Child.model_validate_json('{"name":"c","size":2}') == child
    assert Child.model_json_schema()["required"] == ["name"]
    with pytest.raises(ValidationError, match="Instance is frozen") as caught:
        child.name = "d"  # type: ignore[misc]
    assert [(e["type"], e["loc"]) for e in caught.value.errors()] == [
        ("frozen_instance", ("name",))
    ]
    assert child.name == "c"
    reference = child.save_external_sync()
    assert Child.load_external_sync(reference) == child


def test_user_backend_replaces_a_builtin_scheme(tmp_path: Any) -> None:
    from pydantic_toast._registry import backend_class_for
    from pydantic_toast.backends.file import FileBackend

    class MyFiles(CountingBackend):
        pass

    register_backend("file", MyFiles)
    try:
        assert backend_class_for("file:///tmp/x") is MyFiles
    finally:
        register_backend("file", FileBackend)


def test_register_backend_rejects_non_backends() -> None:
    with pytest.raises(TypeError, match="is not a StorageBackend subclass"):
        register_backend("bad", dict)  # type: ignore[arg-type]


def test_a_backend_without_save_or_load_is_refused() -> None:
    class Half(StorageBackend):
        async def connect(self) -> None: ...

        async def disconnect(self) -> None: ...

    with pytest.raises(TypeError, match="Half must implement save"):
        Half("half://x")


# --- references ------------------------------------------------------------------------------


class Thing(ExternalBaseModel):
    model_config = ExternalConfigDict(storage="memory://things")
    value: int


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"class_name": "Thing", "id": str(uuid4())}, True),
        ({"class_name": "Thing", "id": uuid4()}, True),
        ({"class_name": "Other", "id": str(uuid4())}, True),
        ({"class_name": "Thing", "id": "nope"}, False),
        ({"class_name": "Thing", "id": str(uuid4()), "x": 1}, False),
        ({"class_name": 1, "id": str(uuid4())}, False),
        ({"id": str(uuid4())}, False),
        ({"class_name": "Thing", "id": "a" * 1_000_000}, False),
        ([("class_name", "Thing")], False),
        ("Thing", False),
        (None, False),
    ],
)
def test_is_external_reference(data: Any, expected: bool) -> None:
    assert ExternalBaseModel.is_external_reference(data) is expected


def test_is_external_reference_on_a_subclass_checks_the_class() -> None:
    reference = {"class_name": "Thing", "id": str(uuid4())}
    assert Thing.is_external_reference(reference)
    assert not Thing.is_external_reference({**reference, "class_name": "Other"})


def test_errors_are_named_where_users_import_them_from() -> None:
    error = pydantic_toast.StorageConnectionError("down", "redis://:pw@h/0", failed_ids=["a"])
    line = traceback.format_exception(error)[-1]
    assert line == "pydantic_toast.StorageConnectionError: down (redis://:***@h/0)\n"
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is pydantic_toast.StorageConnectionError and copy.failed_ids == ["a"]


async def test_a_reference_that_was_not_awaited_says_so() -> None:
    pending = Thing(value=1).save_external()
    with pytest.raises(StorageValidationError) as caught:
        await Thing.load_external(pending)  # type: ignore[arg-type]
    assert str(caught.value) == (
        "Thing: a reference must be a mapping with 'class_name' and 'id', not coroutine "
        "(a coroutine: is an await missing?)"
    )
    await pending


async def test_operations_on_the_base_class_itself_say_it_has_no_storage() -> None:
    reference = await Thing(value=1).save_external()
    calls = {
        "load_external": lambda: ExternalBaseModel.load_external(reference),
        "load_external_many": lambda: ExternalBaseModel.load_external_many([reference]),
        "delete_external": lambda: ExternalBaseModel.delete_external(reference),
        "save_external": lambda: ExternalBaseModel().save_external(),
        "purge_external": lambda: ExternalBaseModel.purge_external(),
    }
    for name, call in calls.items():
        with pytest.raises(StorageValidationError) as raised:
            await call()
        assert str(raised.value) == (
            "ExternalBaseModel has no storage: call this on a subclass that sets "
            "model_config = ExternalConfigDict(storage=...)"
        ), name
    with pytest.raises(StorageValidationError, match="ExternalBaseModel has no storage"):
        ExternalBaseModel.load_external_sync(reference)
    assert await Thing.load_external(reference) == Thing(value=1)  # subclasses unaffected


def test_a_copy_is_a_new_record_and_equality_ignores_metadata() -> None:
    thing = Thing(value=1)
    reference = thing.save_external_sync()
    assert thing == Thing(value=1)  # metadata takes no part in equality
    copy = thing.model_copy()
    assert copy.external_metadata is None
    assert copy.save_external_sync() != reference


# --- masking ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql://user:pa%40ss@db:5432/app", "postgresql://user:***@db:5432/app"),
        ("redis://:hunter2@[::1]:6379/0", "redis://:***@[::1]:6379/0"),
        (
            "postgresql://user@db/app?password=x&sslmode=require",
            "postgresql://user@db/app?password=***&sslmode=require",
        ),
        ("sqlite:////var/data/app.db", "sqlite:////var/data/app.db"),
        ("s3://bucket/p?aws_secret_access_key=k", "s3://bucket/p?aws_secret_access_key=***"),
        ("redis://user:pw@h/0?prefix=app", "redis://user:***@h/0?prefix=app"),
        ("postgresql://u:p#ss/w?rd@host/db", "postgresql://u:***@host/db"),
        ("s3://bucket/token=abc?token=abc", "s3://bucket/token=abc?token=***"),
        # drivers decode option names: this one is "password"
        ("postgresql://h/db?pass%77ord=k3y&x=1", "postgresql://h/db?pass%77ord=***&x=1"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


class LeakyBackend(StorageBackend):
    """A backend whose driver quotes the whole DSN in its errors, as some drivers do."""

    async def connect(self) -> None:
        raise ConnectionRefusedError(f"could not reach {self.url}")

    async def disconnect(self) -> None: ...

    async def save(self, id: UUID, class_name: str, data: dict[str, Any]) -> None: ...

    async def load(self, id: UUID, class_name: str) -> dict[str, Any] | None:
        return None


async def test_passwords_never_appear_in_errors_reprs_or_tracebacks() -> None:
    register_backend("leaky", LeakyBackend)

    class Secretive(ExternalBaseModel):
        model_config = ExternalConfigDict(storage="leaky://admin:Sup3rS3cret@db.internal:99/x")
        value: int

    with pytest.raises(StorageConnectionError) as caught:
        await Secretive(value=1).save_external()
    error = caught.value
    # It failed while connecting: the record is unconfirmed, as a batch would say.
    (failed,) = error.failed_ids
    assert str(UUID(failed)) == failed
    shown = "".join(traceback.format_exception(error))
    assert "Sup3rS3cret" not in str(error) + repr(error)
    assert "db.internal" in str(error)
    assert "admin:***@db.internal" in error.url
    assert isinstance(error.__cause__, OSError)
    # The chained driver error is the driver's own text; what the library adds is clean.
    assert shown.count("Sup3rS3cret") <= 1
    backend = LeakyBackend("leaky://admin:Sup3rS3cret@db.internal:99/x")
    assert "Sup3rS3cret" not in repr(backend)
    settings = repr(Secretive.__external_settings__)
    assert "Sup3rS3cret" not in settings and "leaky://admin:***@db.internal:99/x" in settings


class PickyBackend(LeakyBackend):
    """A backend whose constructor refuses its URL quoting it whole, password and all."""

    def __init__(self, url: str) -> None:
        raise ValueError(f"cannot use {url}")


def test_a_custom_backend_quoting_its_url_at_class_definition_is_scrubbed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_registry, "_registered", dict(_registry._registered))
    register_backend("picky", PickyBackend)
    with pytest.raises(StorageValidationError) as caught:

        class Refused(ExternalBaseModel):
            model_config = ExternalConfigDict(storage="picky://u:Zq9secretXy@host/bad")

    assert str(caught.value).endswith(
        ".Refused: invalid storage URL 'picky://u:***@host/bad': cannot use picky://u:***@host/bad"
    )
    assert "Zq9secretXy" not in chained_messages(caught.value)


# --- lifecycle -------------------------------------------------------------------------------


async def test_one_backend_per_url_connected_once_under_concurrency(
    counting: type[CountingBackend],
) -> None:
    backends = await asyncio.gather(*(get_backend("counting://a") for _ in range(50)))
    assert len({id(b) for b in backends}) == 1
    assert counting.connects == 1
    assert await get_backend("counting://b") is not backends[0]
    assert counting.connects == 2


async def test_aclose_closes_and_the_next_call_reconnects(counting: type[CountingBackend]) -> None:
    class Counted(ExternalBaseModel):
        model_config = ExternalConfigDict(storage="counting://close")
        value: int

    await Counted(value=1).save_external()
    await pydantic_toast.aclose()
    assert counting.disconnects == 1
    await Counted(value=2).save_external()
    assert counting.connects == 2


def test_backends_close_when_their_loop_shuts_down(counting: type[CountingBackend]) -> None:
    class Counted(ExternalBaseModel):
        model_config = ExternalConfigDict(storage="counting://loop")
        value: int

    async def use() -> None:
        await Counted(value=1).save_external()
        await Counted(value=2).save_external()

    asyncio.run(use())
    assert (counting.connects, counting.disconnects) == (1, 1)
    asyncio.run(use())  # a new loop gets its own backend
    assert (counting.connects, counting.disconnects) == (2, 2)


def test_sync_calls_reuse_one_backend(counting: type[CountingBackend]) -> None:
    class Counted(ExternalBaseModel):
        model_config = ExternalConfigDict(storage="counting://sync")
        value: int

    references = [Counted(value=i).save_external_sync() for i in range(20)]
    assert [Counted.load_external_sync(r).value for r in references] == list(range(20))
    assert counting.connects == 1
    pydantic_toast.close()
    assert counting.disconnects == 1


def test_sync_api_from_eight_threads(sqlite_url: str) -> None:
    class Shared(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=sqlite_url)
        thread: int
        index: int

    results: dict[int, list[Shared]] = {}
    errors: list[BaseException] = []

    def work(thread: int) -> None:
        try:
            refs = [Shared(thread=thread, index=i).save_external_sync() for i in range(50)]
            results[thread] = [Shared.load_external_sync(r) for r in refs]
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert all(not thread.is_alive() for thread in threads)
    for n in range(8):
        assert results[n] == [Shared(thread=n, index=i) for i in range(50)]


async def test_a_sync_call_from_inside_a_backend_is_a_clear_error() -> None:
    class Reentrant(StorageBackend):
        async def connect(self) -> None: ...

        async def disconnect(self) -> None: ...

        async def save(self, id: UUID, class_name: str, data: dict[str, Any]) -> None:
            Thing(value=1).save_external_sync()

        async def load(self, id: UUID, class_name: str) -> dict[str, Any] | None:
            return None

    register_backend("reentrant", Reentrant)

    class Inner(ExternalBaseModel):
        model_config = ExternalConfigDict(storage="reentrant://x")
        value: int

    # A bug in a custom backend is permanent: raised at once, never retried.
    with pytest.raises(StorageOperationError, match="called from inside an async operation"):
        Inner(value=1).save_external_sync()


async def test_1000_concurrent_saves_on_the_embedded_default(sqlite_url: str) -> None:
    class Event(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=sqlite_url)
        index: int
        payload: dict[str, list[int]]

    events = [Event(index=i, payload={"values": list(range(i % 7))}) for i in range(1000)]
    references = await asyncio.gather(*(event.save_external() for event in events))
    assert len({r["id"] for r in references}) == 1000
    loaded = await asyncio.gather(*(Event.load_external(r) for r in references))
    assert loaded == events

    import sqlite3
    from contextlib import closing

    path = sqlite_url.removeprefix("sqlite:///")
    with closing(sqlite3.connect(path)) as raw:
        assert raw.execute("SELECT count(*) FROM external_models").fetchone() == (1000,)


def test_interpreter_exit_with_open_backends_is_clean(tmp_path: Any) -> None:
    script = textwrap.dedent(
        f"""
        import asyncio
        from pydantic_toast import ExternalBaseModel, ExternalConfigDict

        class Item(ExternalBaseModel):
            model_config = ExternalConfigDict(storage="sqlite:///{tmp_path}/exit.db")
            value: int

        reference = Item(value=1).save_external_sync()

        async def main():
            await Item(value=2).save_external()
            print(Item.load_external_sync(reference).value)

        asyncio.run(main())
        print("done")
        """
    )
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "done"]
    assert result.stderr == ""


def test_a_model_with_a_nested_plain_model() -> None:
    class Inner(BaseModel):
        x: int

    class Outer(ExternalBaseModel):
        model_config = ExternalConfigDict(storage="memory://nested")
        inner: Inner
        inners: list[Inner]

    outer = Outer(inner=Inner(x=1), inners=[Inner(x=2)])
    assert Outer.load_external_sync(outer.save_external_sync()) == outer


def test_records_from_a_custom_backend_that_are_not_records(
    counting: type[CountingBackend],
) -> None:
    class Counted(ExternalBaseModel):
        model_config = ExternalConfigDict(storage="counting://shape")
        value: int

    reference = Counted(value=1).save_external_sync()

    async def corrupt() -> None:
        backend = await get_backend("counting://shape")
        await backend.save(UUID(reference["id"]), "Counted", {"value": 1})

    from pydantic_toast._bridge import run_sync

    run_sync(corrupt())
    with pytest.raises(StorageValidationError, match="is corrupt"):
        Counted.load_external_sync(reference)


def test_stored_dicts_of_wrong_shapes_are_corrupt_records() -> None:
    id = uuid4()
    for stored in ([], {"data": []}, {"class_name": "X", "data": {}, "schema_version": "1"}):
        with pytest.raises(CorruptRecordError, match=f"stored X record {id} is corrupt"):
            decode_stored(stored, id, "X")


# --- coalescing ------------------------------------------------------------------------------


class BatchCounting(CountingBackend):
    """Counts single and batch reads, and can be told to fail or to wait a loop turn."""

    single_reads: ClassVar[int] = 0
    batch_reads: ClassVar[list[int]] = []
    fail: ClassVar[bool] = False
    pause: ClassVar[bool] = False

    async def read_record(self, class_name: str, id: UUID) -> Record | None:
        type(self).single_reads += 1
        return (await self.read_records(class_name, [id]))[0]

    async def read_records(self, class_name: str, ids: Any) -> list[Record | None]:
        if self.fail:
            raise StorageConnectionError("the server went away", self.url)
        if self.pause:  # as a remote store would: the read is in flight for a while
            await asyncio.sleep(0)
        type(self).batch_reads.append(len(ids))
        return [await StorageBackend.read_record(self, class_name, id) for id in ids]


@pytest.fixture
def batch_counting() -> type[BatchCounting]:
    BatchCounting.single_reads = 0
    BatchCounting.batch_reads = []
    BatchCounting.fail = False
    BatchCounting.pause = False
    register_backend("batchcounting", BatchCounting)
    return BatchCounting


async def test_loads_in_one_loop_turn_go_out_as_one_batch(
    batch_counting: type[BatchCounting],
) -> None:
    class Row(ExternalBaseModel):
        model_config = ExternalConfigDict(storage="batchcounting://coalesce")
        index: int

    references = await Row.save_external_many([Row(index=i) for i in range(64)])
    batch_counting.pause = True  # reads wait, as on a remote store
    loaded = await asyncio.gather(*(Row.load_external(r) for r in references))
    assert loaded == [Row(index=i) for i in range(64)]
    # The first load of the turn goes out at once, alone; the 63 issued after it, as one batch.
    assert batch_counting.single_reads == 1
    assert batch_counting.batch_reads == [1, 63]

    # A lone load is sent at once as a single read.
    assert await asyncio.wait_for(Row.load_external(references[0]), timeout=1) == Row(index=0)
    assert batch_counting.single_reads == 2
    assert batch_counting.batch_reads == [1, 63, 1]


async def test_tasks_that_keep_loading_keep_going_out_as_batches(
    batch_counting: type[BatchCounting],
) -> None:
    class Row(ExternalBaseModel):
        model_config = ExternalConfigDict(storage="batchcounting://rounds")
        index: int

    references = await Row.save_external_many([Row(index=i) for i in range(64)])
    batch_counting.pause = True

    async def keep_loading(index: int) -> list[Row]:
        return [await Row.load_external(references[index]) for _ in range(5)]

    loaded = await asyncio.gather(*(keep_loading(i) for i in range(64)))
    assert loaded == [[Row(index=i)] * 5 for i in range(64)]
    # Each round's loads are issued while the previous reads are under way, so they gather:
    # the very first load alone, then batches (not a lone first load in every round, which
    # split the tasks into ever more, smaller reads).
    assert batch_counting.single_reads == 1
    assert sum(batch_counting.batch_reads) == 64 * 5
    assert len(batch_counting.batch_reads) <= 10, batch_counting.batch_reads


async def test_a_failed_batch_fails_every_caller_and_the_next_one_works(
    batch_counting: type[BatchCounting],
) -> None:
    class Row(ExternalBaseModel):
        model_config = ExternalConfigDict(storage="batchcounting://failing")
        index: int

    references = await Row.save_external_many([Row(index=i) for i in range(3)])
    batch_counting.fail = True
    results = await asyncio.gather(
        *(Row.load_external(r) for r in references), return_exceptions=True
    )
    assert all(isinstance(r, StorageConnectionError) for r in results)
    batch_counting.fail = False
    assert await asyncio.gather(*(Row.load_external(r) for r in references)) == [
        Row(index=i) for i in range(3)
    ]


async def test_a_cancelled_load_does_not_disturb_the_others(
    batch_counting: type[BatchCounting],
) -> None:
    class Row(ExternalBaseModel):
        model_config = ExternalConfigDict(storage="batchcounting://cancel")
        index: int

    references = await Row.save_external_many([Row(index=i) for i in range(3)])
    batch_counting.pause = True
    tasks = [asyncio.create_task(Row.load_external(r)) for r in references]
    await asyncio.sleep(0)
    tasks[1].cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert done[0] == Row(index=0)
    assert isinstance(done[1], asyncio.CancelledError)
    assert done[2] == Row(index=2)


async def test_a_cancelled_first_load_leaves_the_batch_behind_it_alone(
    batch_counting: type[BatchCounting],
) -> None:
    class Row(ExternalBaseModel):
        model_config = ExternalConfigDict(storage="batchcounting://leader")
        index: int

    references = await Row.save_external_many([Row(index=i) for i in range(3)])
    batch_counting.pause = True
    tasks = [asyncio.create_task(Row.load_external(r)) for r in references]
    await asyncio.sleep(0)  # task 0's read is in flight; tasks 1 and 2 gathered behind it
    tasks[0].cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(done[0], asyncio.CancelledError)
    assert done[1:] == [Row(index=1), Row(index=2)]
    assert batch_counting.batch_reads == [2]  # task 0's read never completed


# --- retries ---------------------------------------------------------------------------------


class Flaky(CountingBackend):
    """Fails its next ``failures`` operations with a connection error, then works."""

    failures: ClassVar[int] = 0
    attempts: ClassVar[int] = 0

    async def read_record(self, class_name: str, id: UUID) -> Record | None:
        return await self._maybe_fail(StorageBackend.read_record(self, class_name, id))

    async def write_record(self, record: Record) -> None:
        await self._maybe_fail(StorageBackend.write_record(self, record))

    async def _maybe_fail(self, operation: Any) -> Any:
        type(self).attempts += 1
        if type(self).failures > 0:
            type(self).failures -= 1
            operation.close()
            raise StorageConnectionError("connection reset by peer", self.url)
        return await operation


@pytest.fixture
def flaky() -> type[Flaky]:
    Flaky.failures = Flaky.attempts = 0
    register_backend("flaky", Flaky)
    return Flaky


async def test_transient_failures_are_retried_with_backoff(flaky: type[Flaky]) -> None:
    class Row(ExternalBaseModel):
        model_config = ExternalConfigDict(storage="flaky://retry", retry_backoff=0.001)
        index: int

    flaky.failures = 2
    reference = await Row(index=1).save_external()
    assert flaky.attempts == 3
    flaky.failures, flaky.attempts = 2, 0
    assert await Row.load_external(reference) == Row(index=1)
    assert flaky.attempts == 3
    flaky.failures, flaky.attempts = 3, 0  # one more than the retries
    with pytest.raises(StorageConnectionError, match="connection reset by peer"):
        await Row.load_external(reference)
    assert flaky.attempts == 3


async def test_retries_can_be_turned_off(flaky: type[Flaky]) -> None:
    class Row(ExternalBaseModel):
        model_config = ExternalConfigDict(storage="flaky://off", retries=0)
        index: int

    flaky.failures = 1
    with pytest.raises(StorageConnectionError):
        await Row(index=1).save_external()
    assert flaky.attempts == 1
    assert await Row.load_external(await Row(index=2).save_external()) == Row(index=2)


@pytest.mark.parametrize(("retries", "backoff"), [(-1, 0.1), ("2", 0.1), (1, "fast")])
def test_retry_settings_are_checked(retries: Any, backoff: Any) -> None:
    with pytest.raises(StorageValidationError, match="retries must be a count"):

        class Row(ExternalBaseModel):
            model_config = ExternalConfigDict(
                storage="memory://r", retries=retries, retry_backoff=backoff
            )


def test_sync_calls_in_the_main_thread_and_in_a_running_loop_share_the_store(
    sqlite_url: str,
) -> None:
    class Note(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=sqlite_url)
        text: str

    reference = Note(text="main thread").save_external_sync()  # the main thread's own loop

    async def inside_a_loop() -> Note:
        return Note.load_external_sync(reference)  # the bridge thread's loop

    assert asyncio.run(inside_a_loop()) == Note(text="main thread")
    result: list[Note] = []
    worker = threading.Thread(target=lambda: result.append(Note.load_external_sync(reference)))
    worker.start()
    worker.join(timeout=30)
    assert result == [Note(text="main thread")]


def test_a_main_thread_sync_call_returns_raises_and_is_cancelled_when_interrupted() -> None:
    from pydantic_toast._bridge import run_sync

    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    async def fail() -> None:
        await asyncio.sleep(0)
        raise ValueError("from the coroutine")

    assert threading.current_thread() is threading.main_thread()
    assert run_sync(answer()) == 42
    with pytest.raises(ValueError, match="from the coroutine"):
        run_sync(fail())

    cancelled: list[bool] = []

    async def interrupted() -> None:
        def ctrl_c() -> None:
            raise KeyboardInterrupt

        asyncio.get_running_loop().call_later(0.01, ctrl_c)
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    with pytest.raises(KeyboardInterrupt):
        run_sync(interrupted())
    assert cancelled == [True]  # not left half-run on the loop
    assert run_sync(answer()) == 42  # and the loop serves the next call


def test_a_ctrl_c_inside_a_main_thread_sync_call_is_raised_and_not_logged_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Ctrl-C landing while the coroutine's own code runs ends its task with the interrupt;
    the caller gets it raised, and the loop does not log it later as never retrieved."""
    from pydantic_toast._bridge import run_sync

    async def busy() -> None:
        await asyncio.sleep(0)
        raise KeyboardInterrupt  # what the signal handler raises in the coroutine's step

    async def answer() -> int:
        return 42

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        with pytest.raises(KeyboardInterrupt):
            run_sync(busy())
        gc.collect()  # a task's unretrieved exception is logged when it is collected
        assert run_sync(answer()) == 42
        gc.collect()
    assert [record.getMessage() for record in caplog.records] == []


async def test_a_failed_first_save_and_a_retry_write_one_record(flaky: type[Flaky]) -> None:
    class Row(ExternalBaseModel):
        model_config = ExternalConfigDict(storage="flaky://orphans", retries=0)
        index: int

    row = Row(index=1)
    flaky.failures = 1
    with pytest.raises(StorageConnectionError):
        await row.save_external()  # the server may or may not have stored it
    assert row.external_metadata is None
    reference = await row.save_external()
    twice = await asyncio.gather(row.save_external(), Row(index=2).save_external())
    assert twice[0] == reference  # the same id from the first attempt on: no orphan
    fresh = Row(index=3)
    first, second = await asyncio.gather(fresh.save_external(), fresh.save_external())
    assert first == second  # two saves of a new instance at once: one record
