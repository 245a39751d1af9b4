"""The behavioural contract every backend keeps, run against each one.

Embedded backends, a four-method custom backend and the real PostgreSQL, Redis and S3 (moto)
servers all prove the same things: whole-value round trips of every common field type, re-save,
metadata, not-found, validation of references and of stored data, concurrency and batches.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import json
from decimal import Decimal
from typing import Any
from uuid import UUID, uuid4

import pytest
from pydantic import BaseModel

from pydantic_toast import (
    ExternalBaseModel,
    ExternalConfigDict,
    RecordNotFoundError,
    StorageValidationError,
)
from pydantic_toast._registry import get_backend
from pydantic_toast.backends.base import Record


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Priority(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Address(BaseModel):
    street: str
    city: str
    zip_code: str | None = None


class Tag(BaseModel):
    name: str
    weight: float


def define_profile(storage: str) -> type[ExternalBaseModel]:
    class Profile(ExternalBaseModel):
        # base64 keeps arbitrary bytes round-tripping through JSON
        model_config = ExternalConfigDict(
            storage=storage, ser_json_bytes="base64", val_json_bytes="base64"
        )

        name: str
        age: int
        score: float
        active: bool
        uid: UUID
        joined: dt.datetime
        local_time: dt.datetime
        birthday: dt.date
        alarm: dt.time
        session: dt.timedelta
        balance: Decimal
        color: Color
        priority: Priority
        address: Address
        tags: list[Tag]
        by_name: dict[str, Tag]
        nickname: str | None = None
        middle_name: str | None = None
        raw: bytes = b""
        numbers: tuple[int, ...] = ()
        unicode: str = ""

    return Profile


def sample_profile(cls: type[ExternalBaseModel]) -> ExternalBaseModel:
    return cls(
        name="Ada Lovelace",
        age=36,
        score=99.5,
        active=True,
        uid=uuid4(),
        joined=dt.datetime(
            2024, 2, 29, 12, 30, 15, 123456, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30))
        ),
        local_time=dt.datetime(2025, 1, 1, 0, 0, 0, 1),
        birthday=dt.date(1815, 12, 10),
        alarm=dt.time(6, 45, 30, 500),
        session=dt.timedelta(days=2, seconds=5, microseconds=7),
        balance=Decimal("12345678901234567890.123456789"),
        color=Color.GREEN,
        priority=Priority.HIGH,
        address=Address(street="1 Analytical Way", city="London"),
        tags=[Tag(name="math", weight=1.5), Tag(name="poetry", weight=-0.25)],
        by_name={"first": Tag(name="engine", weight=3.0)},
        nickname="Countess",
        raw=b"\x00\x01binary\xff",
        numbers=(1, 2, 3),
        unicode='naïve café — 数学 🚀 "quoted" \\ back',
    )


async def test_round_trip_keeps_every_field_type(storage: str) -> None:
    Profile = define_profile(storage)
    profile = sample_profile(Profile)

    reference = await profile.save_external()
    loaded = await Profile.load_external(reference)

    assert loaded == profile
    assert loaded.model_dump() == profile.model_dump()
    assert type(loaded) is Profile
    assert reference == {"class_name": "Profile", "id": reference["id"]}
    assert UUID(reference["id"]).version == 4


async def test_metadata_is_readable_after_save_and_load(storage: str) -> None:
    Profile = define_profile(storage)
    profile = sample_profile(Profile)
    assert profile.external_metadata is None
    before = dt.datetime.now(dt.UTC)

    reference = await profile.save_external()
    saved = profile.external_metadata
    loaded = (await Profile.load_external(reference)).external_metadata

    assert saved is not None and loaded is not None
    assert saved.id == loaded.id == UUID(reference["id"])
    assert loaded.class_name == "Profile"
    assert loaded.schema_version == 1
    assert before <= loaded.created_at == loaded.updated_at <= dt.datetime.now(dt.UTC)
    assert loaded.created_at.tzinfo is not None
    assert (loaded.created_at, loaded.updated_at) == (saved.created_at, saved.updated_at)


async def test_resave_keeps_id_and_created_at_and_moves_updated_at(storage: str) -> None:
    Profile = define_profile(storage)
    profile = sample_profile(Profile)
    first = await profile.save_external()
    created = profile.external_metadata
    assert created is not None
    await asyncio.sleep(0.002)

    profile.name = "Augusta Ada King"  # type: ignore[attr-defined]
    second = await profile.save_external()
    loaded = await Profile.load_external(second)

    assert second == first
    assert loaded == profile
    assert loaded.name == "Augusta Ada King"  # type: ignore[attr-defined]
    metadata = loaded.external_metadata
    assert metadata is not None
    assert metadata.created_at == created.created_at
    assert metadata.updated_at > created.updated_at


async def test_resaving_a_loaded_model_updates_the_same_record(storage: str) -> None:
    Profile = define_profile(storage)
    reference = await sample_profile(Profile).save_external()
    loaded = await Profile.load_external(reference)
    loaded.age = 37  # type: ignore[attr-defined]
    assert await loaded.save_external() == reference
    assert (await Profile.load_external(reference)).age == 37  # type: ignore[attr-defined]


async def test_schema_version_is_stored(storage: str) -> None:
    class Versioned(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=storage, schema_version=3)
        value: int

    loaded = await Versioned.load_external(await Versioned(value=1).save_external())
    assert loaded.external_metadata is not None
    assert loaded.external_metadata.schema_version == 3


async def test_missing_record_is_record_not_found(storage: str) -> None:
    Profile = define_profile(storage)
    missing = uuid4()
    with pytest.raises(RecordNotFoundError) as caught:
        await Profile.load_external({"class_name": "Profile", "id": str(missing)})
    assert caught.value.id == str(missing)
    assert caught.value.class_name == "Profile"
    assert str(missing) in str(caught.value)
    assert "Profile" in str(caught.value)


async def test_reference_for_another_class_is_rejected(storage: str) -> None:
    Profile = define_profile(storage)

    class Other(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=storage)
        value: int

    reference = await Other(value=1).save_external()
    with pytest.raises(StorageValidationError, match="reference is for class 'Other', not Profile"):
        await Profile.load_external(reference)


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ({"class_name": "Profile", "id": "not-a-uuid"}, "invalid id 'not-a-uuid'"),
        ({"class_name": "Profile", "id": "../../etc/passwd"}, "invalid id"),
        ({"class_name": "Profile", "id": "*"}, "invalid id"),
        ({"class_name": "Profile", "id": "\x00"}, "invalid id"),
        ({"class_name": "Profile", "id": "a" * 10_000_000}, "invalid id 'aaaa"),
        ({"class_name": "Profile", "id": []}, "invalid id"),
        ({"class_name": "Profile", "id": None}, "invalid id"),
        ({"class_name": 1, "id": str(uuid4())}, "reference is for class 1"),
        ({"class_name": "../Profile", "id": str(uuid4())}, "reference is for class"),
        ({"class_name": "Profile"}, "invalid id None"),
        ({"class_name": "Profile", "id": str(uuid4()), "extra": 1}, "only 'class_name' and 'id'"),
        ("Profile", "must be a mapping"),
        (None, "must be a mapping"),
    ],
)
async def test_malformed_references_are_rejected_before_any_io(
    storage: str, reference: Any, message: str
) -> None:
    Profile = define_profile(storage)
    with pytest.raises(StorageValidationError, match=message.replace("*", r"\*")) as caught:
        await Profile.load_external(reference)
    assert len(str(caught.value)) < 300


async def test_stored_data_that_no_longer_validates(storage: str) -> None:
    def define(kind: type) -> type[ExternalBaseModel]:
        class Thing(ExternalBaseModel):
            model_config = ExternalConfigDict(storage=storage)
            value: kind  # type: ignore[valid-type]

        return Thing

    reference = await define(str)(value="not a number").save_external()  # type: ignore[call-arg]
    with pytest.raises(StorageValidationError) as caught:
        await define(int).load_external(reference)
    assert f"stored Thing record {reference['id']} no longer validates" in str(caught.value)


async def test_a_model_that_cannot_be_json_is_a_clear_error(storage: str) -> None:
    class Blob(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=storage)
        raw: bytes

    with pytest.raises(StorageValidationError, match="Blob cannot be serialized to JSON"):
        await Blob(raw=b"\xff\xfe").save_external()


async def test_500_concurrent_saves_and_loads(storage: str) -> None:
    class Item(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=storage)
        index: int
        label: str

    items = [Item(index=i, label=f"item-{i}") for i in range(500)]
    references = await asyncio.gather(*(item.save_external() for item in items))
    assert len({reference["id"] for reference in references}) == 500
    loaded = await asyncio.gather(*(Item.load_external(reference) for reference in references))
    assert loaded == items


async def test_batch_record_operations_keep_order_and_report_missing(storage: str) -> None:
    backend = await get_backend(storage)
    now = dt.datetime.now(dt.UTC)
    records = [Record(uuid4(), "Batch", b'{"n":%d}' % i, 1, now, now) for i in range(50)]
    await backend.write_records(records)
    missing = uuid4()
    ids = [records[3].id, missing, records[0].id, *(r.id for r in records[10:])]
    found = await backend.read_records("Batch", ids)
    assert found[1] is None
    # Compared as JSON values: PostgreSQL's JSONB normalizes whitespace and key order.
    assert [json.loads(r.data) if r else None for r in found] == [
        {"n": 3},
        None,
        {"n": 0},
        *({"n": n} for n in range(10, 50)),
    ]


def test_sync_twins_in_a_plain_thread(storage: str) -> None:
    Profile = define_profile(storage)
    profile = sample_profile(Profile)
    reference = profile.save_external_sync()
    assert Profile.load_external_sync(reference) == profile


async def test_sync_twins_inside_a_running_loop(storage: str) -> None:
    Profile = define_profile(storage)
    profile = sample_profile(Profile)
    reference = profile.save_external_sync()  # as a Jupyter cell or a sync handler would
    assert Profile.load_external_sync(reference) == profile
    assert await Profile.load_external(reference) == profile


async def test_delete_records_counts_what_existed(storage: str) -> None:
    backend = await get_backend(storage)
    now = dt.datetime.now(dt.UTC)
    records = [Record(uuid4(), "Gone", b'{"n":%d}' % i, 1, now, now) for i in range(5)]
    await backend.write_records(records)
    try:
        deleted = await backend.delete_records("Gone", [records[0].id, records[1].id, uuid4()])
    except NotImplementedError:
        assert storage.startswith("dictstore://"), "only four-method backends may lack delete"
        return
    assert deleted == 2
    found = await backend.read_records("Gone", [r.id for r in records])
    assert [r is None for r in found] == [True, True, False, False, False]


async def test_save_and_load_many_keep_order_and_identity(storage: str) -> None:
    class Row(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=storage)
        index: int
        text: str

    rows = [Row(index=i, text="x" * (i % 50)) for i in range(1000)]
    references = await Row.save_external_many([*rows, rows[0]])
    assert len(references) == 1001
    assert references[-1] == references[0]  # an instance listed twice is written once
    assert len({r["id"] for r in references}) == 1000
    assert all(row.external_metadata is not None for row in rows)

    loaded = await Row.load_external_many(reversed(references[:1000]))
    assert loaded == rows[::-1]
    twice = await Row.load_external_many([references[5], references[5]])
    assert twice[0] is twice[1]
    assert twice[0] == rows[5]
    nowhere = {"class_name": "Row", "id": str(uuid4())}
    asked = [nowhere, references[7], nowhere, references[5], references[7]]
    mixed = await Row.load_external_many(asked, missing_ok=True)
    assert mixed == [None, rows[7], None, rows[5], rows[7]]
    assert mixed[1] is mixed[4]

    rows[1].text = "changed"
    again = await Row.save_external_many(rows[:2])
    assert again == references[:2]
    assert (await Row.load_external(references[1])).text == "changed"


async def test_load_many_reports_every_missing_id(storage: str) -> None:
    class Row(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=storage)
        index: int

    present = await Row.save_external_many([Row(index=1), Row(index=2)])
    gone = [{"class_name": "Row", "id": str(uuid4())} for _ in range(2)]
    with pytest.raises(RecordNotFoundError) as caught:
        await Row.load_external_many([present[0], gone[0], present[1], gone[1]])
    assert caught.value.ids == [gone[0]["id"], gone[1]["id"]]
    assert gone[0]["id"] in str(caught.value) and gone[1]["id"] in str(caught.value)

    loaded = await Row.load_external_many([gone[0], present[1]], missing_ok=True)
    assert loaded == [None, Row(index=2)]


async def test_concurrent_single_loads_each_get_their_own_result(storage: str) -> None:
    class Row(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=storage)
        index: int

    references = await Row.save_external_many([Row(index=i) for i in range(64)])
    missing = {"class_name": "Row", "id": str(uuid4())}
    results = await asyncio.gather(
        *(Row.load_external(r) for r in references),
        Row.load_external(missing),
        Row.load_external(references[3]),
        return_exceptions=True,
    )
    assert results[:64] == [Row(index=i) for i in range(64)]
    assert isinstance(results[64], RecordNotFoundError)
    assert results[64].id == missing["id"]
    assert results[65] == Row(index=3)
