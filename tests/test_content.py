"""Content-addressed records, on every backend: the same value is stored once, under an id
derived from its content, and every load proves the content against its id."""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import hashlib
import json
import random
import subprocess
import sys
from typing import Annotated, Any
from uuid import UUID

import pytest
from pydantic import BaseModel, ValidationError

import pydantic_toast
from pydantic_toast import (
    External,
    ExternalBaseModel,
    ExternalConfigDict,
    ExternalField,
    StorageValidationError,
    UnsupportedOperationError,
)
from pydantic_toast._content import _fast_canonical, canonical_json, content_id, verify_content
from pydantic_toast._registry import get_backend
from pydantic_toast.backends.records import Record
from tests.dict_backend import DictBackend


class Line(BaseModel):
    sku: str
    quantity: int
    price: float
    attributes: dict[str, Any] = {}


class Order(BaseModel):
    lines: list[External[Line]]


class Private(BaseModel):
    secret: Annotated[Line, ExternalField(content_addressed=False)]


def make_order(count: int = 1000) -> Order:
    # Floats, big integers and nested keys out of order: what JSONB rewrites.
    return Order(
        lines=[
            Line(
                sku=f"SKU-{i % 250}",
                quantity=i % 250,
                price=(i % 250) * 0.25 + 1e20 * (i % 2),
                attributes={"z": 2**70, "a": [1.5e-7, -0.0, "é"], "m": {"y": 1, "b": None}},
            )
            for i in range(count)
        ]
    )


async def count_records(storage: str, class_name: str) -> int:
    backend = await get_backend(storage)
    try:
        return len([info async for info in backend.scan_records(class_name)])
    except UnsupportedOperationError:  # the four-method backend cannot list: look inside
        return len(DictBackend.stores[storage])


def test_the_id_is_the_same_in_every_process() -> None:
    data = b'{"sku":"a","quantity":2,"price":0.5,"attributes":{}}'
    here = content_id("Line", data)
    script = f"from pydantic_toast._content import content_id; print(content_id('Line', {data!r}))"
    there = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert UUID(there) == here
    assert here.version == 8 and here.variant == "specified in RFC 4122"
    assert here == UUID("e06b3f3c-d125-8729-9466-ac254fae8cc1")  # pinned: a stored id never moves


def test_the_canonical_form_ignores_how_a_store_spells_json() -> None:
    pydantic = b'{"b":1e20,"a":[1.0,100,-0.0,"\\u00e9"],"c":{"y":1,"x":null}}'
    jsonb = '{"a": [1.0, 100, 0, "é"], "b": 100000000000000000000, "c": {"x": null, "y": 1}}'
    assert canonical_json(pydantic) == canonical_json(jsonb.encode())
    assert content_id("Line", pydantic) == content_id("Line", jsonb.encode())
    assert content_id("Line", b'{"a":1}') != content_id("Line", b'{"a":2}')
    assert content_id("Line", b'{"a":1}') != content_id("Other", b'{"a":1}')
    assert content_id("Line", b'{"a":1}') != content_id("Line", b'{"a":"1"}')


# Ids computed before the fast road existed: records stored under them must still verify.
PINNED = [
    (
        "BenchLine",
        b'{"sku":"SKU-000001","quantity":2,"price":9.99}',
        None,
        "5118d0b5-0434-8e4f-a9e5-6455fa1c3c69",
    ),
    (
        "Line",
        b'{"sku":"SKU-1","quantity":1,"price":1e+20,"attributes":{"z":1180591620717411303424,'
        b'"a":[1.5e-7,-0.0,"\\u00e9"],"m":{"y":1,"b":null}}}',
        None,
        "ac5e212b-d36e-89ef-87c2-8afe954faa52",
    ),
    (
        "Line",
        '{"sku": "SKU-1", "price": 100000000000000000000, "quantity": 1, "attributes": '
        '{"a": [0.00000015, 0, "é"], "m": {"b": null, "y": 1}, '
        '"z": 1180591620717411303424}}'.encode(),
        None,
        "ac5e212b-d36e-89ef-87c2-8afe954faa52",
    ),
    (
        "Line",
        b'{"sku":"a","quantity":2,"price":0.30000000000000004,"attributes":{}}',
        None,
        "fa028f4b-93ef-8b37-80a4-fff9ab05049f",
    ),
    (
        "Line",
        b'{"sku":"a","quantity":2,"price":0.5,"attributes":{}}',
        b"k" * 32,
        "52032ad4-8ab6-897b-95c0-ff9caba9213d",
    ),
    ("list_int_", b"[1,2,3,-7,0,100]", None, "948590ec-e822-82ed-aca2-a04abb281694"),
    (
        "Note",
        b'{"text":"a\\"b\\\\c\\n\\u0001\\ud83d\\ude00 \xc3\xa9\\u2028"}',
        None,
        "3d25eaef-e718-8556-bafd-e0b301268933",
    ),
    (
        "Odd",
        b'{"nan":NaN,"inf":Infinity,"t":true,"f":false,"n":null}',
        None,
        "0389442a-64bd-80a3-bee8-d3d66f5a040c",
    ),
    (
        "Big",
        b'{"i":12345678901234567890123456789012345,"f":1.2345678901234567890123456789012345e-5,'
        b'"s":5e-324,"u":1e-400,"o":1e400}',
        None,
        "96bb1a5f-6efd-8de1-92c1-a81a6f4e1ef1",  # exact: its numbers have 35 digits
    ),
    ("Dup", b'{"a":1,"b":2,"a":3}', None, "1ed9aeda-6ea4-8a1a-a28b-69dafc5912d9"),
]


@pytest.mark.parametrize(("class_name", "data", "key", "pinned"), PINNED)
def test_ids_never_move(class_name: str, data: bytes, key: bytes | None, pinned: str) -> None:
    assert content_id(class_name, data, key) == UUID(pinned)


BIG = (
    b'{"i":12345678901234567890123456789012345,"f":1.2345678901234567890123456789012345e-5,'
    b'"s":5e-324,"u":1e-400,"o":1e400}'
)


def test_numbers_that_differ_in_a_far_digit_get_different_ids() -> None:
    near = b'{"n":1234567890123456789012345678901}'
    far = b'{"n":1234567890123456789012345678902}'
    assert content_id("X", near) != content_id("X", far)
    assert content_id("X", b'{"f":1.00000000000000000000000000001}') != content_id(
        "X", b'{"f":1.00000000000000000000000000002}'
    )


def test_ids_do_not_depend_on_the_callers_decimal_context() -> None:
    expected = [content_id(class_name, data, key) for class_name, data, key, _ in PINNED]
    with decimal.localcontext(decimal.Context(prec=5, Emax=10, Emin=-10)):
        assert [content_id(class_name, data, key) for class_name, data, key, _ in PINNED] == (
            expected
        )
        verify_content("Big", content_id("Big", BIG), BIG)


def test_a_record_stored_under_its_once_rounded_id_still_verifies() -> None:
    # The id BIG had when numbers were rounded to 28 digits, before they were spelled exactly.
    verify_content("Big", UUID("bf949d13-4226-8bdc-872f-6ddc1dac4f27"), BIG)
    with pytest.raises(StorageValidationError, match="does not hold the content its id names"):
        verify_content("Big", UUID("bf949d13-4226-8bdc-872f-6ddc1dac4f27"), BIG[:-2] + b"1}")


class Huge(BaseModel):
    n: int


class Holder(BaseModel):
    values: list[External[Huge]]


async def test_values_that_differ_in_a_far_digit_are_two_records(storage: str) -> None:
    values = Holder(values=[Huge(n=10**40 + 1), Huge(n=10**40 + 2)])
    dumped = await pydantic_toast.dump(values, storage=storage)
    assert dumped["values"][0]["id"] != dumped["values"][1]["id"]
    assert await pydantic_toast.validate(Holder, dumped, storage=storage) == values


def definition_id(class_name: str, data: bytes) -> UUID:
    """`content_id` spelled out over `canonical_json`, the definition alone."""
    raw = bytearray(hashlib.sha256(class_name.encode() + b"\0" + canonical_json(data)).digest())
    raw[6] = (raw[6] & 0x0F) | 0x80
    raw[8] = (raw[8] & 0x3F) | 0x80
    return UUID(bytes=bytes(raw[:16]))


def random_number(rng: random.Random) -> str:
    """A JSON number as some writer might spell it: short or long mantissas, exponents of
    every size, leading and trailing zeros, ints small and large."""
    kind = rng.randrange(6)
    if kind == 0:
        return str(rng.randint(-(10**6), 10**6))
    if kind == 1:
        return str(rng.randint(-(10**40), 10**40) // 10 ** rng.randrange(40))
    if kind == 2:
        return repr(rng.uniform(-1e6, 1e6) * 10.0 ** rng.randrange(-30, 30))
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 20)))
    point = rng.randint(0, len(digits) - 1)
    mantissa = (digits[:point] or "0") + ("." + digits[point:] if kind != 3 else "")
    mantissa = mantissa.lstrip("0") or "0"
    if mantissa.startswith("."):
        mantissa = "0" + mantissa
    exponent = rng.choice(
        [
            "",
            "",
            f"e{rng.randint(-40, 40)}",
            f"E+{rng.randint(0, 999)}",
            f"e-{rng.randint(290, 400)}",
            f"e{rng.randint(280, 330)}",
        ]
    )
    return rng.choice(["", "-"]) + mantissa + exponent


def random_json(rng: random.Random, depth: int = 0) -> str:
    kind = rng.randrange(9 if depth < 3 else 5)
    if kind <= 1:
        return random_number(rng)
    if kind == 2:
        text = "".join(
            rng.choice(
                [
                    "a",
                    "1",
                    "é",
                    "😀",
                    '\\"',
                    "\\\\",
                    "\\n",
                    "\\u0001",
                    "\\u00e9",
                    "\\ud83d\\ude00",
                    "1234567890123456",
                    "e400",
                ]
            )
            for _ in range(rng.randrange(4))
        )
        return f'"{text}"'
    if kind == 3:
        return rng.choice(["true", "false", "null", "NaN", "-Infinity"])
    if kind == 4:
        return "0.0" if rng.randrange(2) else "-0"
    if kind <= 6:
        items = [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
        return "[" + rng.choice([",", ", "]).join(items) + "]"
    keys = rng.sample(["a", "b", "sku", "é", "B", "a1", "price", "z"], rng.randrange(5))
    pairs = [f'"{key}"{rng.choice([":", ": "])}{random_json(rng, depth + 1)}' for key in keys]
    return "{" + ",".join(pairs) + "}"


def test_the_fast_road_writes_the_definitions_bytes() -> None:
    rng = random.Random(20261201)
    fast = 0
    for _ in range(20000):
        data = random_json(rng).encode()
        canonical = _fast_canonical(data)
        if canonical is not None:
            fast += 1
            assert canonical == canonical_json(data), data
    assert fast > 10000  # most records take it
    for class_name, data, key, pinned in PINNED:
        if key is None:
            assert definition_id(class_name, data) == UUID(pinned)


def test_the_fast_road_takes_what_pydantic_writes() -> None:
    line = Line(sku="SKU-1", quantity=3, price=9.99, attributes={"a": [1, "x", None, 2.5e-7]})
    data = line.model_dump_json().encode()
    assert _fast_canonical(data) == canonical_json(data)
    assert content_id("Line", data) == definition_id("Line", data)


@pytest.mark.parametrize(
    "data",
    [
        b'{"price":0.10000000000000001}',  # parses to 0.1, which is another number
        b'{"price":1.0000000000000002,"n":1}',
        b'{"price":0.0,"tiny":1e-400}',  # underflows to zero
        b"[1e400]",
        b"[5e-324]",
        b"[NaN]",
        b'{"id":12345678901234567890123456789012345}',  # beyond 28 digits
        b'"\\ud800"',  # a lone surrogate: the definition refuses it
        b"\xef\xbb\xbf{}",
    ],
)
def test_numbers_the_fast_road_cannot_vouch_for_take_the_definition(data: bytes) -> None:
    canonical = _fast_canonical(data)
    if canonical is not None:
        assert canonical == canonical_json(data)
    try:
        expected: UUID | type[Exception] = definition_id("Line", data)
    except ValueError as exc:
        expected = type(exc)
    if isinstance(expected, UUID):
        assert content_id("Line", data) == expected
    else:
        with pytest.raises(expected):
            content_id("Line", data)


async def test_an_unchanged_order_dumped_again_writes_no_new_record(storage: str) -> None:
    order = make_order()
    first = await pydantic_toast.dump(order, storage=storage)
    assert len({reference["id"] for reference in first["lines"]}) == 250  # distinct values
    assert all(UUID(reference["id"]).version == 8 for reference in first["lines"])
    stored = await count_records(storage, "Line")
    assert stored == 250
    backend = await get_backend(storage)
    some = UUID(first["lines"][0]["id"])
    before = await backend.read_record("Line", some)
    await asyncio.sleep(0.01)
    assert await pydantic_toast.dump(order, storage=storage) == first
    assert await pydantic_toast.dump_json(order, storage=storage) == json.dumps(
        first, separators=(",", ":")
    )
    small = Order(lines=order.lines[:5])  # the plain path writes one value at a time
    assert small.model_dump(context={"storage": storage})["lines"] == first["lines"][:5]
    assert await count_records(storage, "Line") == stored
    after = await backend.read_record("Line", some)
    assert before is not None and after is not None
    assert after.created_at == before.created_at  # the first write's
    assert after.updated_at > before.updated_at  # refreshed: a collection sees it as recent
    assert await pydantic_toast.validate(Order, first, storage=storage) == order
    assert Order.model_validate(first, context={"storage": storage}) == order


async def test_content_that_does_not_match_its_id_is_refused(storage: str) -> None:
    order = make_order(2)
    dumped = await pydantic_toast.dump(order, storage=storage)
    id = UUID(dumped["lines"][0]["id"])
    backend = await get_backend(storage)
    now = dt.datetime.now(dt.UTC)
    forged = Line(sku="SKU-0", quantity=999, price=0.0).model_dump_json().encode()
    await backend.write_record(Record(id, "Line", forged, 1, now, now))
    with pytest.raises(ValidationError) as caught:
        await pydantic_toast.validate(Order, dumped, storage=storage)
    error = caught.value.errors()[0]
    assert error["type"] == "external_invalid"
    assert f"stored Line record {id} does not hold the content its id names" in error["msg"]
    with pytest.raises(ValidationError, match="does not hold the content its id names"):
        Order.model_validate(dumped, context={"storage": storage})


async def test_an_opted_out_value_gets_a_random_id_per_dump(storage: str) -> None:
    value = Private(secret=Line(sku="s", quantity=1, price=1.0))
    first = await pydantic_toast.dump(value, storage=storage)
    second = await pydantic_toast.dump(value, storage=storage)
    assert UUID(first["secret"]["id"]).version == 4
    assert first["secret"]["id"] != second["secret"]["id"]
    assert await pydantic_toast.validate(Private, second, storage=storage) == value


def define_note(storage: str, **config: Any) -> type[ExternalBaseModel]:
    class Note(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=storage, content_addressed=True, **config)
        text: str
        score: float = 0.0

    return Note


async def test_a_model_class_can_opt_in(storage: str) -> None:
    Note = define_note(storage)
    a, b = Note(text="same", score=1e20), Note(text="same", score=1e20)
    reference = await a.save_external()
    assert await b.save_external() == reference
    assert UUID(reference["id"]).version == 8
    assert await count_records(storage, "Note") == 1
    assert await Note.load_external(reference) == a
    a.text = "changed"  # type: ignore[attr-defined]
    moved = await a.save_external()
    assert moved != reference and await count_records(storage, "Note") == 2
    assert await Note.load_external(reference) == b  # the old state is still what it was

    backend = await get_backend(storage)
    stored = await backend.read_record("Note", UUID(reference["id"]))
    assert stored is not None
    stored.data = json.dumps({"text": "forged", "score": 1e20}).encode()
    await backend.write_record(stored)
    with pytest.raises(StorageValidationError, match="does not hold the content its id names"):
        await Note.load_external(reference)


async def test_models_keep_their_identity_by_default(storage: str) -> None:
    class Plain(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=storage)
        text: str

    model = Plain(text="x")
    reference = await model.save_external()
    model.text = "y"
    assert await model.save_external() == reference  # saved in place
    assert UUID(reference["id"]).version == 4
    assert await Plain(text="y").save_external() != reference


async def test_an_older_content_addressed_record_migrates_under_its_id(storage: str) -> None:
    backend = await get_backend(storage)
    old = json.dumps({"body": "hello"}, separators=(",", ":")).encode()
    id = content_id("Memo", old)
    now = dt.datetime.now(dt.UTC)
    await backend.write_record(Record(id, "Memo", old, 1, now, now))

    class Memo(ExternalBaseModel):
        model_config = ExternalConfigDict(
            storage=storage, content_addressed=True, schema_version=2, save_migrated=True
        )
        text: str

    @Memo.migration(from_version=1)
    def rename(data: dict[str, Any]) -> dict[str, Any]:
        return {"text": data["body"]}

    reference = {"class_name": "Memo", "id": str(id)}
    loaded = await Memo.load_external(reference)
    assert loaded == Memo(text="hello")
    assert loaded.external_metadata is not None and loaded.external_metadata.id == id
    stored = await backend.read_record("Memo", id)
    assert (stored is not None and stored.data == old) or json.loads(stored.data) == {
        "body": "hello"
    }
    assert await Memo.load_external(reference) == Memo(text="hello")  # still verifies
