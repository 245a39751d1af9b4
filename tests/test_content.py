"""Content-addressed records, on every backend: the same value is stored once, under an id
derived from its content, and every load proves the content against its id."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
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
from pydantic_toast._content import canonical_json, content_id
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
