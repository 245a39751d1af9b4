"""Records over time: schema migrations, stable names, deletion, existence, ttl and purge."""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import warnings
import weakref
from typing import Any
from uuid import UUID, uuid4

import pytest

from pydantic_toast import (
    ExternalBaseModel,
    ExternalConfigDict,
    ExternalNameWarning,
    RecordNotFoundError,
    StorageValidationError,
)
from pydantic_toast._registry import get_backend
from pydantic_toast.backends.base import Record

# --- schema versions and migrations ------------------------------------------------------------


def define_user(storage: str, version: int, **config: Any) -> type[ExternalBaseModel]:
    if version == 1:

        class User(ExternalBaseModel):
            model_config = ExternalConfigDict(storage=storage, schema_version=1, **config)
            name: str

    elif version == 2:

        class User(ExternalBaseModel):  # type: ignore[no-redef]
            model_config = ExternalConfigDict(storage=storage, schema_version=2, **config)
            full_name: str

        @User.migration(from_version=1)
        def rename(data: dict[str, Any]) -> dict[str, Any]:
            return {"full_name": data.pop("name"), **data}

    else:

        class User(ExternalBaseModel):  # type: ignore[no-redef]
            model_config = ExternalConfigDict(storage=storage, schema_version=3, **config)
            full_name: str
            initials: str

        @User.migration(from_version=1)
        def rename(data: dict[str, Any]) -> dict[str, Any]:
            return {"full_name": data.pop("name"), **data}

        @User.migration(from_version=2)
        def add_initials(data: dict[str, Any]) -> dict[str, Any]:
            initials = "".join(part[0] for part in data["full_name"].split())
            return {**data, "initials": initials}

    return User


async def test_old_records_are_migrated_step_by_step_on_load(storage: str) -> None:
    V1 = define_user(storage, 1)
    old = [
        await V1(name="Ada Lovelace").save_external(),
        await V1(name="Alan Turing").save_external(),
    ]

    V3 = define_user(storage, 3)
    loaded = await V3.load_external(old[0])
    assert loaded.model_dump() == {"full_name": "Ada Lovelace", "initials": "AL"}
    assert loaded.external_metadata is not None
    assert loaded.external_metadata.schema_version == 3
    many = await V3.load_external_many(old)
    assert [m.model_dump() for m in many] == [
        {"full_name": "Ada Lovelace", "initials": "AL"},
        {"full_name": "Alan Turing", "initials": "AT"},
    ]
    # without save_migrated the stored record keeps its version
    backend = await get_backend(storage)
    record = await backend.read_record("User", UUID(old[0]["id"]))
    assert record is not None and record.schema_version == 1


async def test_save_migrated_writes_the_upgraded_record_back(storage: str) -> None:
    reference = await define_user(storage, 1)(name="Grace Hopper").save_external()
    V2 = define_user(storage, 2, save_migrated=True)
    assert (await V2.load_external(reference)).model_dump() == {"full_name": "Grace Hopper"}
    backend = await get_backend(storage)
    record = await backend.read_record("User", UUID(reference["id"]))
    assert record is not None
    assert record.schema_version == 2
    assert b"full_name" in record.data and b'"name"' not in record.data


async def test_a_record_newer_than_the_code_is_refused(memory_url: str) -> None:
    reference = await define_user(memory_url, 2)(full_name="Ada").save_external()
    with pytest.raises(StorageValidationError, match="schema version 2, newer than this code's 1"):
        await define_user(memory_url, 1).load_external(reference)


async def test_a_missing_or_failing_migration_is_a_clear_error(memory_url: str) -> None:
    first = define_user(memory_url, 1)  # alive while the next User is defined
    reference = await first(name="Ada").save_external()

    with pytest.warns(ExternalNameWarning):  # another local class named User, same storage

        class User(ExternalBaseModel):
            model_config = ExternalConfigDict(storage=memory_url, schema_version=3)
            full_name: str

    with pytest.raises(StorageValidationError, match="no migration from version 1 to 2"):
        await User.load_external(reference)

    @User.migration(from_version=1)
    def broken(data: dict[str, Any]) -> dict[str, Any]:
        raise KeyError("surname")

    with pytest.raises(StorageValidationError, match="from version 1 failed: KeyError"):
        await User.load_external(reference)

    for version in (3, 0):
        with pytest.raises(StorageValidationError) as caught:
            User.migration(from_version=version)
        assert str(caught.value) == (
            "User: a migration goes from one of the versions 1 to 2 (below the current "
            f"schema_version 3), not from {version}"
        )
    with pytest.raises(StorageValidationError, match="User: schema_version is 1, so no version"):
        first.migration(from_version=1)


# --- stable names ---------------------------------------------------------------------------------


def test_class_name_config_sets_the_stored_name(memory_url: str) -> None:
    class User(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=memory_url, class_name="billing.User")
        name: str

    reference = User(name="a").save_external_sync()
    assert reference["class_name"] == "billing.User"
    assert User.load_external_sync(reference) == User(name="a")

    # Moved and renamed, the class still finds its records. (Both classes exist in this one
    # process, which is a name clash: for classes defined in functions, a warning.)
    with pytest.warns(ExternalNameWarning):

        class Renamed(ExternalBaseModel):
            model_config = ExternalConfigDict(storage=memory_url, class_name="billing.User")
            name: str

    assert Renamed.load_external_sync(reference) == Renamed(name="a")


def test_invalid_stable_names_are_refused() -> None:
    with pytest.raises(StorageValidationError, match="invalid class name 'a/b'"):

        class Slashed(ExternalBaseModel):
            model_config = ExternalConfigDict(storage="memory://names", class_name="a/b")


def test_two_module_level_classes_with_one_name_collide(tmp_path: Any) -> None:
    import subprocess
    import sys

    (tmp_path / "billing.py").write_text(
        "from pydantic_toast import ExternalBaseModel, ExternalConfigDict\n"
        "class User(ExternalBaseModel):\n"
        "    model_config = ExternalConfigDict(storage='memory://shared')\n"
        "    plan: str\n"
    )
    (tmp_path / "crm.py").write_text(
        "from pydantic_toast import ExternalBaseModel, ExternalConfigDict\n"
        "class User(ExternalBaseModel):\n"
        "    model_config = ExternalConfigDict(storage='memory://shared')\n"
        "    email: str\n"
    )
    script = (
        "import importlib, billing\n"
        "importlib.reload(billing)\n"  # redefining the same class is no collision
        "try:\n"
        "    import crm\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("StorageValidationError crm.User and billing.User both store")
    assert "ExternalConfigDict(class_name=...)" in result.stdout


def test_local_classes_with_one_name_only_warn(memory_url: str) -> None:
    def first() -> type:
        class Clash(ExternalBaseModel):
            model_config = ExternalConfigDict(storage=memory_url)

        return Clash

    def second() -> type:
        class Clash(ExternalBaseModel):
            model_config = ExternalConfigDict(storage=memory_url)

        return Clash

    kept = first()  # alive while the second class is defined
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first()  # the same class again: no warning
    gc.collect()  # that definition is gone, and the first one still holds the name
    with pytest.warns(ExternalNameWarning, match="both store records as 'Clash'") as caught:
        second()
    assert kept.__name__ == "Clash"
    assert caught[0].filename == __file__  # the warning points at the class statement


def define_at_top_level(module: str, storage: str) -> type[ExternalBaseModel]:
    """A class ``Clash`` as module ``module`` would define it (no ``<locals>`` in its name)."""
    namespace: dict[str, Any] = {
        "__name__": module,
        "ExternalBaseModel": ExternalBaseModel,
        "ExternalConfigDict": ExternalConfigDict,
        "storage": storage,
    }
    exec(
        "class Clash(ExternalBaseModel):\n"
        "    model_config = ExternalConfigDict(storage=storage)\n"
        "    n: int = 0\n",
        namespace,
    )
    return namespace["Clash"]  # type: ignore[no-any-return]


def test_a_name_is_free_again_once_its_class_is_garbage_collected(memory_url: str) -> None:
    billing = define_at_top_level("billing", memory_url)
    with pytest.raises(StorageValidationError) as caught:
        define_at_top_level("crm", memory_url)
    assert str(caught.value) == (
        f"crm.Clash and billing.Clash both store records as 'Clash' in {memory_url}; "
        "give one a stable name: ExternalConfigDict(class_name=...)"
    )
    gone = weakref.ref(billing)
    del billing, caught
    gc.collect()
    assert gone() is None
    crm = define_at_top_level("crm", memory_url)  # no error: nothing else stores as Clash
    assert crm.__external_settings__.class_name == "Clash"
    with pytest.raises(StorageValidationError) as caught:
        define_at_top_level("billing", memory_url)  # crm.Clash is alive: a collision again
    assert str(caught.value).startswith("billing.Clash and crm.Clash both store records")


def test_local_classes_do_not_warn_about_a_collected_class_of_their_name(memory_url: str) -> None:
    def define(field: str) -> type:
        return type(
            "Clash",
            (ExternalBaseModel,),
            {
                "__module__": __name__,
                "__qualname__": f"{field}.<locals>.Clash",
                "__annotations__": {field: "int"},
                "model_config": ExternalConfigDict(storage=memory_url),
            },
        )

    gone = weakref.ref(define("a"))
    gc.collect()
    assert gone() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        define("b")  # no warning: the other Clash is gone


# --- deletion and existence -----------------------------------------------------------------------


async def test_delete_and_exists(storage: str) -> None:
    class Doc(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=storage)
        title: str

    doc = Doc(title="a")
    reference = await doc.save_external()
    other = await Doc(title="b").save_external()
    assert await Doc.exists_external(reference)
    try:
        assert await doc.delete_external() is True
    except NotImplementedError:
        assert storage.startswith("dictstore://")
        return
    assert not await Doc.exists_external(reference)
    assert doc.external_metadata is None  # a later save creates a new record
    with pytest.raises(RecordNotFoundError):
        await Doc.load_external(reference)
    assert await Doc.delete_external(reference) is False  # missing is no error by default
    with pytest.raises(RecordNotFoundError, match=reference["id"]):
        await Doc.delete_external(reference, missing_ok=False)
    assert await Doc.load_external(other) == Doc(title="b")
    assert await Doc.delete_external(other) is True

    refs = await Doc.save_external_many([Doc(title=str(i)) for i in range(5)])
    assert (
        await Doc.delete_external_many([*refs[:3], {"class_name": "Doc", "id": str(uuid4())}]) == 3
    )
    with pytest.raises(RecordNotFoundError):
        await Doc.delete_external_many([refs[0], refs[3]], missing_ok=False)
    assert not await Doc.exists_external(refs[3])  # the existing one was still deleted


def test_delete_sync_twins(memory_url: str) -> None:
    class Doc(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=memory_url)
        title: str

    doc = Doc(title="a")
    reference = doc.save_external_sync()
    assert Doc.exists_external_sync(reference)
    assert doc.delete_external_sync() is True
    assert not Doc.exists_external_sync(reference)
    reference = doc.save_external_sync()
    assert Doc.delete_external_sync(reference) is True
    assert Doc.delete_external_many_sync([reference]) == 0


# --- time to live and purge ----------------------------------------------------------------------


async def _age(storage: str, class_name: str, reference: dict[str, str], days: int) -> None:
    """Make a record look ``days`` old, as if saved back then."""
    backend = await get_backend(storage)
    record = await backend.read_record(class_name, UUID(reference["id"]))
    assert record is not None
    then = dt.datetime.now(dt.UTC) - dt.timedelta(days=days)
    await backend.delete_records(class_name, [record.id])
    await backend.write_record(Record(record.id, class_name, record.data, 1, then, then))


async def test_expired_records_load_as_missing(storage: str) -> None:
    class Session(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=storage, ttl=dt.timedelta(days=1))
        token: str

    fresh = await Session(token="fresh").save_external()
    stale = await Session(token="stale").save_external()
    try:
        await _age(storage, "Session", stale, days=2)
    except NotImplementedError:
        assert storage.startswith("dictstore://")
        return
    assert await Session.load_external(fresh) == Session(token="fresh")
    with pytest.raises(RecordNotFoundError):
        await Session.load_external(stale)
    assert not await Session.exists_external(stale)
    assert await Session.load_external_many([stale, fresh], missing_ok=True) == [
        None,
        Session(token="fresh"),
    ]


async def test_purge_deletes_records_not_updated_since(storage: str) -> None:
    class Event(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=storage)
        n: int

    class Other(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=storage)
        n: int

    refs = await Event.save_external_many([Event(n=i) for i in range(6)])
    other = await Other(n=1).save_external()
    try:
        for reference in refs[:4]:
            await _age(storage, "Event", reference, days=40)
        await _age(storage, "Other", other, days=40)
        purged = await Event.purge_external(older_than=dt.timedelta(days=30))
    except NotImplementedError:
        assert storage.startswith("dictstore://")
        return
    assert purged == 4
    assert await Event.load_external_many(refs, missing_ok=True) == [None] * 4 + [
        Event(n=4),
        Event(n=5),
    ]
    assert await Other.exists_external(other)  # other classes are untouched
    with pytest.raises(StorageValidationError, match="needs before, or older_than as a positive"):
        await Event.purge_external()


@pytest.fixture(params=["postgresql", "redis", "s3"])
def network_storage(request: pytest.FixtureRequest) -> str:
    """A fresh storage URL on each backend that waits on a server, so yields to the loop."""
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


async def test_concurrent_deletes_and_loads(network_storage: str) -> None:
    """Loads and the delete of the same ids overlap: every load sees the whole model or
    `RecordNotFoundError`, never a torn or other error, and afterwards every record is gone.

    Network backends yield to the event loop while a query is in flight, so the readers of an
    id keep loads in flight while its delete runs; the test checks that they really did.
    """
    storage = network_storage

    class Item(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=storage)
        n: int
        body: str

    def make(i: int) -> Item:
        return Item(n=i, body=f"{i}:" + "x" * 4000)

    count, readers_per_id, max_loads = 20, 2, 500
    refs = await Item.save_external_many([make(i) for i in range(count)])
    loads_in_flight = [0] * count
    seen_a_model = [asyncio.Event() for _ in range(count)]
    load_overlapped_delete = [False] * count

    async def reader(i: int) -> list[Item | RecordNotFoundError]:
        """Load id ``i`` again and again until it is gone."""
        outcomes: list[Item | RecordNotFoundError] = []
        for _ in range(max_loads):
            loads_in_flight[i] += 1
            try:
                outcome: Item | RecordNotFoundError = await Item.load_external(refs[i])
            except RecordNotFoundError as exc:
                outcome = exc
            finally:
                loads_in_flight[i] -= 1
            outcomes.append(outcome)
            if isinstance(outcome, RecordNotFoundError):
                return outcomes
            seen_a_model[i].set()
        pytest.fail(f"id {i} still loads after {max_loads} loads: was it ever deleted?")

    async def deleter(i: int) -> bool:
        await seen_a_model[i].wait()  # a reader has loaded it and is loading it again
        load_overlapped_delete[i] = loads_in_flight[i] > 0
        return await Item.delete_external(refs[i])

    results = await asyncio.wait_for(
        asyncio.gather(
            *(reader(i) for i in range(count) for _ in range(readers_per_id)),
            *(deleter(i) for i in range(count)),
        ),
        timeout=60,
    )
    per_reader, deleted = results[: count * readers_per_id], results[count * readers_per_id :]

    assert deleted == [True] * count  # each id deleted once, and it was there to delete
    assert all(load_overlapped_delete), "a delete ran with no load of its id in flight"
    for index, outcomes in enumerate(per_reader):
        i = index // readers_per_id
        *found, missing = outcomes
        assert all(model == make(i) for model in found)  # the whole model, never a part
        assert isinstance(missing, RecordNotFoundError)
        assert missing.ids == [refs[i]["id"]]

    for ref in refs:
        assert not await Item.exists_external(ref)
        with pytest.raises(RecordNotFoundError):
            await Item.load_external(ref)
    backend_ = await get_backend(storage)
    assert [info async for info in backend_.scan_records("Item")] == []


def test_a_subclass_stores_under_its_own_name(memory_url: str) -> None:
    class User(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=memory_url, class_name="billing.User")
        name: str

    class Admin(User):
        level: int = 1

    assert User.__external_settings__.class_name == "billing.User"
    assert Admin.__external_settings__.class_name == "Admin"
    reference = Admin(name="root").save_external_sync()
    assert Admin.load_external_sync(reference) == Admin(name="root")


async def test_exists_and_delete_respect_the_class(storage: str) -> None:
    class Order(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=storage)
        n: int

    class Invoice(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=storage)
        n: int

    order = await Order(n=1).save_external()
    disguised = {"class_name": "Invoice", "id": order["id"]}
    assert not await Invoice.exists_external(disguised)
    try:
        assert await Invoice.delete_external(disguised) is False
    except NotImplementedError:
        assert storage.startswith("dictstore://")
        return
    assert await Order.exists_external(order)


async def test_delete_many_names_every_missing_id(memory_url: str) -> None:
    class Doc(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=memory_url)
        n: int

    present = await Doc(n=1).save_external()
    gone = [str(uuid4()), str(uuid4())]
    with pytest.raises(RecordNotFoundError) as caught:
        await Doc.delete_external_many(
            [present, *({"class_name": "Doc", "id": id} for id in gone)], missing_ok=False
        )
    assert caught.value.ids == gone
    assert not await Doc.exists_external(present)  # the existing one was deleted
