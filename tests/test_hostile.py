"""Hostile and malformed input, tried on purpose on every backend: references that try to
leave the backend's namespace, stored data that is corrupt or hostile, and property-based
round trips and fuzzing (hypothesis)."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import os
import re
from typing import Any
from uuid import UUID, uuid4

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, create_model

from pydantic_toast import (
    ExternalBaseModel,
    ExternalConfigDict,
    ExternalStorageError,
    RecordNotFoundError,
    StorageValidationError,
)
from pydantic_toast._bridge import run_sync
from pydantic_toast._registry import get_backend
from pydantic_toast.backends.base import Record

HOSTILE_IDS: list[Any] = [
    "../../etc/passwd",
    "..",
    "/",
    "*",
    "?",
    "\x00",
    "",
    " ",
    "a" * 10_000_000,
    "00000000-0000-0000-0000-000000000000/../x",
    "00000000-0000-0000-0000-00000000000\x00",
    "%2e%2e%2f",
    "{00000000-0000-0000-0000-000000000000}x",
    [],
    {},
    1,
    1.5,
    None,
    True,
]
HOSTILE_CLASS_NAMES: list[Any] = [
    "../Victim",
    "a/b",
    "a:b",
    "*",
    "Victim ",
    "Vic\ttim",
    "Vic\x00tim",
    "Vic\ntim",
    "",
    1,
    None,
    ["Victim"],
]


def define_victim(storage: str) -> type[ExternalBaseModel]:
    class Victim(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=storage)
        secret: str

    return Victim


async def test_hostile_references_never_reach_the_backend(
    storage: str, tmp_path: Any, request: pytest.FixtureRequest
) -> None:
    Victim = define_victim(storage)
    reference = await Victim(secret="s").save_external()
    before = await _namespace_snapshot(storage, request)

    attempts = 0
    for bad_id in HOSTILE_IDS:
        for call in (Victim.load_external, Victim.exists_external, Victim.delete_external):
            with pytest.raises(StorageValidationError) as caught:
                await call({"class_name": "Victim", "id": bad_id})
            assert len(str(caught.value)) < 300
            attempts += 1
    for bad_name in HOSTILE_CLASS_NAMES:
        with pytest.raises(StorageValidationError):
            await Victim.load_external({"class_name": bad_name, "id": str(uuid4())})
        attempts += 1
    for shape in ({"class_name": 1, "id": []}, {"id": str(uuid4())}, [], "x", None, 7):
        with pytest.raises(StorageValidationError):
            await Victim.load_external(shape)  # type: ignore[arg-type]
        attempts += 1
    assert attempts == len(HOSTILE_IDS) * 3 + len(HOSTILE_CLASS_NAMES) + 6

    # the backend itself refuses unsafe class names before building a key or path
    backend = await get_backend(storage)
    for bad_name in HOSTILE_CLASS_NAMES:
        if not isinstance(bad_name, str):
            continue
        now = dt.datetime.now(dt.UTC)
        with pytest.raises(StorageValidationError):
            await backend.write_record(Record(uuid4(), bad_name, b"{}", 1, now, now))
        with pytest.raises(StorageValidationError):
            await backend.read_record(bad_name, uuid4())

    assert await _namespace_snapshot(storage, request) == before
    assert await Victim.load_external(reference) == Victim(secret="s")


async def _namespace_snapshot(storage: str, request: pytest.FixtureRequest) -> Any:
    """Everything around the backend's namespace that an attack could have touched."""
    if storage.startswith("file://"):
        root = storage.removeprefix("file://")
        parent = os.path.dirname(root)
        return sorted(
            os.path.relpath(os.path.join(d, f), parent) for d, _, fs in os.walk(parent) for f in fs
        )
    if storage.startswith("redis://"):
        import redis.asyncio as redis

        client = redis.Redis.from_url(storage.partition("?")[0])
        try:  # keys an attack would have made; other tests' keys are not ours to judge
            keys = await client.keys("*")
            return sorted(k for k in keys if b"Victim" in k or b"passwd" in k or b".." in k)
        finally:
            await client.aclose()
    if storage.startswith("s3://"):
        import boto3

        client = boto3.client(
            "s3", endpoint_url=request.getfixturevalue("s3_endpoint"), region_name="us-east-1"
        )
        buckets = sorted(b["Name"] for b in client.list_buckets()["Buckets"])
        bucket = request.getfixturevalue("s3_bucket")
        keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", []))
        return buckets, keys
    if storage.startswith("postgresql://"):
        import asyncpg

        connection = await asyncpg.connect(storage.partition("?")[0])
        try:
            tables = await connection.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
            )
            table = storage.partition("table=")[2]
            rows = await connection.fetchval(f'SELECT count(*) FROM "{table}"')
            return [t["tablename"] for t in tables], rows
        finally:
            await connection.close()
    return None


@pytest.mark.parametrize(
    ("stored", "message"),
    [
        (b"not json at all", ""),
        (b'{"secret": 1}', "no longer validates"),
        (b"[1, 2, 3]", ""),
        (b'"just a string"', ""),
        (b"[" * 100_000 + b"]" * 100_000, ""),
        (
            b'{"secret": "' + b"x" * 5_000_000 + b'", "extra": ' + b"[" * 5000 + b"]" * 5000 + b"}",
            "",
        ),
    ],
    ids=["garbage", "wrong-type", "array", "string", "deeply-nested", "huge-and-nested"],
)
async def test_corrupt_stored_data_is_a_clear_error(
    storage: str, stored: bytes, message: str
) -> None:
    Victim = define_victim(storage)
    id = uuid4()
    now = dt.datetime.now(dt.UTC)
    backend = await get_backend(storage)
    try:
        await backend.write_record(Record(id, "Victim", stored, 1, now, now))
    except ExternalStorageError:
        # PostgreSQL's JSONB (and a dict-based custom backend) refuse invalid JSON on write:
        # nothing corrupt can be stored there in the first place.
        assert storage.startswith(("postgresql://", "dictstore://"))
        return
    with pytest.raises(StorageValidationError) as caught:
        await Victim.load_external({"class_name": "Victim", "id": str(id)})
    assert str(id) in str(caught.value)
    assert "Victim" in str(caught.value)
    assert message in str(caught.value)
    assert len(str(caught.value)) < 20_000


async def test_a_record_of_another_class_under_the_id(storage: str) -> None:
    Victim = define_victim(storage)
    id = uuid4()
    now = dt.datetime.now(dt.UTC)
    backend = await get_backend(storage)
    await backend.write_record(Record(id, "Intruder", b'{"secret":"x"}', 1, now, now))
    # A forged reference cannot tell "no such id" from "an id of another class": every
    # backend answers "not found", naming neither the other class nor the record's content.
    with pytest.raises(RecordNotFoundError) as caught:
        await Victim.load_external({"class_name": "Victim", "id": str(id)})
    assert str(caught.value).startswith(f"no Victim record with id {id}")
    assert "Intruder" not in str(caught.value) and "secret" not in str(caught.value)
    assert caught.value.id == str(id)
    assert not await Victim.exists_external({"class_name": "Victim", "id": str(id)})
    assert await backend.read_record("Intruder", id) is not None  # still there for its class


# --- property-based --------------------------------------------------------------------------

FIELD_TYPES: dict[str, tuple[Any, st.SearchStrategy[Any]]] = {
    "text": (str, st.text(max_size=50)),
    "number": (int, st.integers(min_value=-(2**63), max_value=2**63 - 1)),
    "ratio": (float, st.floats(allow_nan=False, allow_infinity=False)),
    "flag": (bool, st.booleans()),
    "maybe": (str | None, st.none() | st.text(max_size=10)),
    "when": (dt.datetime, st.datetimes(timezones=st.just(dt.UTC))),
    "naive": (dt.datetime, st.datetimes()),
    "day": (dt.date, st.dates()),
    "clock": (dt.time, st.times()),
    "span": (
        dt.timedelta,
        st.timedeltas(min_value=dt.timedelta(days=-999), max_value=dt.timedelta(days=999)),
    ),
    "money": (
        decimal.Decimal,
        st.decimals(
            allow_nan=False, allow_infinity=False, places=4, min_value=-(10**12), max_value=10**12
        ),
    ),
    "uid": (UUID, st.uuids()),
    "items": (list[int], st.lists(st.integers(-1000, 1000), max_size=5)),
    "mapping": (
        dict[str, float],
        st.dictionaries(
            st.text(max_size=5), st.floats(allow_nan=False, allow_infinity=False), max_size=4
        ),
    ),
}


class Inner(BaseModel):
    label: str
    values: list[float]


@st.composite
def models(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any]]:
    names = draw(
        st.lists(st.sampled_from(sorted(FIELD_TYPES)), min_size=1, max_size=6, unique=True)
    )
    fields = {name: (FIELD_TYPES[name][0], ...) for name in names}
    values = {name: draw(FIELD_TYPES[name][1]) for name in names}
    if draw(st.booleans()):
        fields["inner"] = (list[Inner], ...)
        values["inner"] = draw(
            st.lists(
                st.builds(
                    Inner,
                    label=st.text(max_size=5),
                    values=st.lists(st.floats(allow_nan=False, allow_infinity=False), max_size=3),
                ),
                max_size=3,
            )
        )
    return fields, values


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=models())
@example(case=({"text": (str, ...)}, {"text": "nul \x00"}))  # round trips, or refused on jsonb
def test_arbitrary_models_round_trip(
    storage: str, case: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    fields, values = case

    class Stored(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=storage)

    Model = create_model("Arbitrary", __base__=Stored, **fields)
    instance = Model(**values)
    if storage.startswith("postgresql://") and "\\u0000" in instance.model_dump_json():
        # jsonb cannot hold NUL: the documented outcome is a refused save (README).
        with pytest.raises(
            StorageValidationError, match=r"PostgreSQL at .* could not save Arbitrary record"
        ):
            instance.save_external_sync()
        return
    loaded = Model.load_external_sync(instance.save_external_sync())
    assert loaded == instance


anything = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.uuids().map(str),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3)
    ),
    max_leaves=10,
)


def expected_is_reference(data: Any, class_name: str | None = None) -> bool:
    """What `is_external_reference` must answer, written out independently: a mapping of
    exactly ``class_name`` (a string, ``class_name`` when given) and a UUID string ``id``;
    asked of `ExternalBaseModel` itself (no ``class_name``), the signed shape too: a string
    ``sig`` and an optional integer ``exp``."""
    if not isinstance(data, dict):
        return False
    extra = set(data) - {"class_name", "id"}
    if class_name is None and extra and extra <= {"sig", "exp"}:
        exp = data.get("exp")
        if not isinstance(data.get("sig"), str):
            return False
        if "exp" in data and (not isinstance(exp, int) or isinstance(exp, bool)):
            return False
    elif extra:
        return False
    if "class_name" not in data or "id" not in data:
        return False
    if not isinstance(data["class_name"], str) or not isinstance(data["id"], str):
        return False
    if UUID_SPELLING.fullmatch(data["id"]) is None:
        return False
    return class_name is None or data["class_name"] == class_name


# The spellings of a UUID an id may have: hyphenated (also in braces or as a URN) or plain hex.
_HEX = "[0-9a-fA-F]"
_HYPHENATED = f"{_HEX}{{8}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{12}}"
UUID_SPELLING = re.compile(
    f"{_HEX}{{32}}|{_HYPHENATED}|\\{{{_HYPHENATED}\\}}|urn:uuid:{_HYPHENATED}"
)


FUZZED_ID = "7b0f5a52-3a57-4c43-9a0e-4a3cb0f1c2d4"


@settings(max_examples=200, deadline=None)
@given(
    data=st.one_of(
        anything,
        st.fixed_dictionaries({"class_name": anything, "id": anything}),
        st.fixed_dictionaries({"class_name": st.text(max_size=20), "id": st.uuids().map(str)}),
        st.fixed_dictionaries({"class_name": st.just("Fuzzed"), "id": st.text(max_size=40)}),
        st.fixed_dictionaries({"class_name": st.just("Fuzzed"), "id": st.uuids().map(str)}),
    )
)
@example(data={"class_name": "Fuzzed", "id": FUZZED_ID})  # a reference to Fuzzed
@example(data={"class_name": "Other", "id": FUZZED_ID})  # a reference, not to Fuzzed
@example(data={"class_name": "Fuzzed", "id": FUZZED_ID, "x": 1})  # one key too many
@example(data={"class_name": "Fuzzed", "id": FUZZED_ID, "sig": "x" * 43})  # signed shape
@example(data={"class_name": "Fuzzed", "id": FUZZED_ID, "sig": "x", "exp": True})
@example(data={"class_name": "Fuzzed", "id": "not-a-uuid"})
@example(data={"class_name": "Fuzzed", "id": FUZZED_ID.upper()})  # uppercase: a UUID
@example(data={"class_name": "Fuzzed", "id": " " + FUZZED_ID[1:]})  # UUID() would take it
@example(data={"class_name": "Fuzzed", "id": FUZZED_ID[:-1] + "\u0661"})  # an Arabic 1
@example(data={"class_name": "Fuzzed", "id": "7b0f5a523a57-4c43-9a0e-4a3c-b0f1c2d4"})
@example(data=["class_name", "id"])
def test_fuzzed_references_raise_only_the_librarys_errors(data: Any) -> None:
    assert ExternalBaseModel.is_external_reference(data) is expected_is_reference(data)
    is_ours = expected_is_reference(data, "Fuzzed")
    assert Fuzzed.is_external_reference(data) is is_ours
    # A reference to Fuzzed names a record that does not exist; anything else is malformed
    # or names another class. Any other exception fails the test.
    expected_error = RecordNotFoundError if is_ours else StorageValidationError
    with pytest.raises(expected_error):
        run_sync(Fuzzed.load_external(data))


class Fuzzed(ExternalBaseModel):
    model_config = ExternalConfigDict(storage="memory://fuzzed")
    value: int


def test_json_dumps_of_references_is_plain() -> None:
    reference = Fuzzed(value=1).save_external_sync()
    assert json.loads(json.dumps(reference)) == reference


def test_a_batch_of_references_is_checked_as_each_one_is() -> None:
    from pydantic_toast._references import reference_ids

    texts = [FUZZED_ID, FUZZED_ID.upper(), "{" + FUZZED_ID + "}", FUZZED_ID.replace("-", "")]
    batch = [{"class_name": "Fuzzed", "id": text} for text in texts]
    assert reference_ids(batch, "Fuzzed") == [UUID(FUZZED_ID)] * 4
    mixed = [*batch, {"class_name": "Fuzzed", "id": UUID(FUZZED_ID)}]  # a UUID, not a string
    assert reference_ids(mixed, "Fuzzed") == [UUID(FUZZED_ID)] * 5
    assert reference_ids([], "Fuzzed") == []
    for bad, message in [
        ({"class_name": "Fuzzed", "id": " " + FUZZED_ID[1:]}, "Fuzzed: invalid id ' b0f5a52-"),
        ({"class_name": "Fuzzed", "id": "x" * 65}, "Fuzzed: invalid id 'xxxxxxxx"),
        ({"class_name": "Other", "id": FUZZED_ID}, "reference is for class 'Other', not Fuzzed"),
        ({"class_name": "Fuzzed", "id": FUZZED_ID, "x": 1}, "a reference has only"),
        ({"class_name": "Fuzzed"}, "Fuzzed: invalid id None: not a UUID"),
    ]:
        with pytest.raises(StorageValidationError, match=re.escape(message)):
            reference_ids([*batch, bad, *batch], "Fuzzed")
        with pytest.raises(StorageValidationError, match=re.escape(message)):
            run_sync(Fuzzed.load_external_many([*batch, bad]))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.uuids().map(str)
        | st.uuids()
        | st.text(max_size=70)
        | st.sampled_from([FUZZED_ID.upper(), "{" + FUZZED_ID + "}", "x" * 65, " " + FUZZED_ID])
        | st.integers()
        | st.none(),
        max_size=8,
    )
)
def test_ids_parsed_together_are_the_ids_parsed_alone(values: list[Any]) -> None:
    from pydantic_toast._references import parse_id, parse_ids

    assert parse_ids(values) == [parse_id(value) for value in values]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.uuids(), max_size=4))
def test_ids_are_spelled_as_str_spells_them(ids: list[UUID]) -> None:
    from pydantic_toast.backends.records import id_text, id_texts

    assert [id_text(id) for id in ids] == id_texts(ids) == [str(id) for id in ids]


def test_invalid_stored_data_is_described_without_its_values_and_within_bounds() -> None:
    from pydantic import ValidationError

    from pydantic_toast._errors import invalid_data

    class Wide(BaseModel):
        values: dict[str, int]

    data = {"values": {f"k{n}-" + "x" * 10_000: "y" * 10_000 for n in range(1000)}}
    with pytest.raises(ValidationError) as caught:
        Wide.model_validate_json(json.dumps(data))
    text = invalid_data(caught.value)
    key = ("k0-" + "x" * 100)[:40]  # a location's parts are cut to 40 characters
    assert text.startswith(
        f"1000 validation errors: values.{key}: Input should be a valid integer, unable to "
        "parse string as an integer; values.k1-"
    )
    assert text.endswith("; and 995 more")
    assert "yyyy" not in text and len(text) < 1000

    class Many(BaseModel):
        values: list[int]

    with pytest.raises(ValidationError) as caught:  # so many that none is listed
        Many.model_validate_json(json.dumps({"values": ["x"] * 200_000}))
    assert invalid_data(caught.value) == "200000 validation errors (too many to list)"


def test_a_corrupt_listing_entry_names_the_class_its_key_names() -> None:
    from pydantic_toast import CorruptRecordError
    from pydantic_toast.backends.records import StoredInfo, decode_info

    id = uuid4()
    for class_name, shown in (
        ("Invoice", f"stored Invoice record {id}"),
        (None, f"stored record {id}"),
        ("../x", f"stored record {id}"),
    ):
        with pytest.raises(CorruptRecordError) as caught:
            decode_info(StoredInfo(id, class_name, 10, None, head=b"junk"), None)
        assert str(caught.value).startswith(f"{shown} is corrupt: "), str(caught.value)
