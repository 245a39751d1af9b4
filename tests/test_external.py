"""`External[T]` fields: every shape, both paths (plain model_dump/model_validate and the
batched dump/validate API), errors, JSON schema, and the number of backend round trips."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import gc
import json
import math
import weakref
from collections.abc import Sequence
from typing import Annotated, Any, Generic, TypeVar
from uuid import UUID, uuid4

import pydantic.dataclasses
import pytest
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

import pydantic_toast
from pydantic_toast import (
    External,
    ExternalBaseModel,
    ExternalConfigDict,
    ExternalField,
    StorageBackend,
    StorageValidationError,
)
from pydantic_toast._registry import get_backend
from pydantic_toast.backends.base import Record


class Line(BaseModel):
    sku: str
    quantity: int
    price: float = 0.0


class Tag(BaseModel):
    label: str


class Note(BaseModel):
    text: str


class Order(BaseModel):
    number: int
    first: External[Line]
    lines: list[External[Line]]
    gift: External[Line] | None = None
    by_sku: dict[str, External[Line]] = {}
    attachment: External[Tag] | External[Note] | None = None


def make_order(lines: int = 3) -> Order:
    items = [Line(sku=f"sku-{i}", quantity=i, price=i * 1.5) for i in range(lines)]
    return Order(
        number=7,
        first=items[0],
        lines=items,
        gift=Line(sku="gift", quantity=1),
        by_sku={line.sku: line for line in items},
        attachment=Note(text="fragile"),
    )


class CountingStore(StorageBackend):
    """Wraps a connected backend and counts the batches that reach it."""

    def __init__(self, inner: StorageBackend) -> None:
        super().__init__(inner.url)
        self.inner = inner
        self.writes: list[int] = []
        self.reads: list[int] = []
        self.single = 0

    async def connect(self) -> None: ...

    async def disconnect(self) -> None: ...

    async def write_record(self, record: Record) -> None:
        self.single += 1
        await self.inner.write_record(record)

    async def read_record(self, class_name: str, id: UUID) -> Record | None:
        self.single += 1
        return await self.inner.read_record(class_name, id)

    async def write_records(self, records: Sequence[Record]) -> None:
        self.writes.append(len(records))
        await self.inner.write_records(records)

    async def read_records(self, class_name: str, ids: Sequence[UUID]) -> list[Record | None]:
        self.reads.append(len(ids))
        return await self.inner.read_records(class_name, ids)


def is_reference(value: Any, class_name: str) -> bool:
    return (
        isinstance(value, dict)
        and set(value) == {"class_name", "id"}
        and value["class_name"] == class_name
        # Random (version 4) for models and ExternalField(content_addressed=False) values,
        # derived from the content (version 8) for every other External value.
        and UUID(value["id"]).version in (4, 8)
    )


# --- without a storage: plain Pydantic -------------------------------------------------------


def test_without_storage_external_fields_dump_inline() -> None:
    class Plain(BaseModel):
        number: int
        first: Line
        lines: list[Line]
        gift: Line | None = None
        by_sku: dict[str, Line] = {}
        attachment: Tag | Note | None = None

    order = make_order()
    plain = Plain.model_validate(order.model_dump())
    assert order.model_dump() == plain.model_dump()
    assert order.model_dump_json() == plain.model_dump_json()
    assert order.model_dump(context={"other": 1}) == plain.model_dump()
    assert Order.model_validate(order.model_dump()) == order
    assert Order.model_validate_json(order.model_dump_json()) == order


# --- the plain path: model_dump / model_validate with a storage in the context ----------------


async def test_plain_dump_and_validate_round_trip(storage: str) -> None:
    order = make_order()
    dumped = order.model_dump(context={"storage": storage})

    assert dumped["number"] == 7
    assert is_reference(dumped["first"], "Line")
    assert all(is_reference(item, "Line") for item in dumped["lines"])
    assert is_reference(dumped["gift"], "Line")
    assert all(is_reference(item, "Line") for item in dumped["by_sku"].values())
    assert is_reference(dumped["attachment"], "Note")
    # one instance, one record, one reference
    assert dumped["first"] == dumped["lines"][0] == dumped["by_sku"]["sku-0"]

    # records are written before the dump returns: read them back with the backend
    backend = await get_backend(storage)
    record = await backend.read_record("Line", UUID(dumped["lines"][1]["id"]))
    assert record is not None
    assert Line.model_validate_json(record.data) == order.lines[1]

    assert Order.model_validate(dumped, context={"storage": storage}) == order
    as_json = order.model_dump_json(context={"storage": storage})
    assert Order.model_validate_json(as_json, context={"storage": storage}) == order


def test_plain_path_works_in_sync_code(memory_url: str) -> None:
    order = make_order()
    dumped = order.model_dump(mode="json", context={"storage": memory_url})
    assert (
        Order.model_validate(json.loads(json.dumps(dumped)), context={"storage": memory_url})
        == order
    )


async def test_batched_api_round_trip(storage: str) -> None:
    order = make_order()
    dumped = await pydantic_toast.dump(order, storage=storage)
    assert is_reference(dumped["first"], "Line")
    assert dumped["first"] == dumped["lines"][0]
    assert await pydantic_toast.validate(Order, dumped, storage=storage) == order

    as_json = await pydantic_toast.dump_json(order, storage=storage)
    assert json.loads(as_json)["attachment"]["class_name"] == "Note"
    assert await pydantic_toast.validate(Order, as_json, storage=storage) == order


def test_batched_api_sync_twins(memory_url: str) -> None:
    order = make_order()
    dumped = pydantic_toast.dump_sync(order, storage=memory_url)
    assert pydantic_toast.validate_sync(Order, dumped, storage=memory_url) == order
    as_json = pydantic_toast.dump_json_sync(order, storage=memory_url)
    assert pydantic_toast.validate_sync(Order, as_json, storage=memory_url) == order


async def test_values_and_references_mix_freely(memory_url: str) -> None:
    stored = await pydantic_toast.dump(Line(sku="stored", quantity=2), storage=memory_url)
    data = {
        "number": 1,
        "first": {"sku": "inline", "quantity": 1},
        "lines": [stored, {"sku": "inline-2", "quantity": 3}, stored],
        "gift": None,
        "attachment": {"label": "a tag"},
    }
    order = await pydantic_toast.validate(Order, data, storage=memory_url)
    assert order.first == Line(sku="inline", quantity=1)
    assert order.lines == [
        Line(sku="stored", quantity=2),
        Line(sku="inline-2", quantity=3),
        Line(sku="stored", quantity=2),
    ]
    assert order.attachment == Tag(label="a tag")
    assert Order.model_validate(data, context={"storage": memory_url}) == order


# --- errors -----------------------------------------------------------------------------------


async def test_a_reference_without_storage_is_a_validation_error_naming_the_field() -> None:
    reference = {"class_name": "Line", "id": str(uuid4())}
    with pytest.raises(ValidationError) as caught:
        Order.model_validate({"number": 1, "first": reference, "lines": []})
    (error,) = caught.value.errors()
    assert error["loc"][0] == "first"
    assert error["type"] == "external_storage_missing"
    assert "a storage is needed" in error["msg"]
    assert reference["id"] in error["msg"]
    assert "context={'storage': URL}" in error["msg"]


@pytest.mark.parametrize("batched", [False, True])
async def test_a_dangling_reference_names_the_field_and_the_id(
    memory_url: str, batched: bool
) -> None:
    missing = str(uuid4())
    data = {
        "number": 1,
        "first": {"sku": "x", "quantity": 1},
        "lines": [{"sku": "y", "quantity": 1}, {"class_name": "Line", "id": missing}],
    }

    async def attempt() -> Order:
        if batched:
            return await pydantic_toast.validate(Order, data, storage=memory_url)
        return Order.model_validate(data, context={"storage": memory_url})

    with pytest.raises(ValidationError) as caught:
        await attempt()
    (error,) = caught.value.errors()
    assert error["loc"][:2] == ("lines", 1)
    assert error["type"] == "external_not_found"
    assert error["msg"] == f"no Line record with id {missing}"


def test_a_reference_for_the_wrong_class_is_rejected(memory_url: str) -> None:
    tag = Tag(label="t")
    reference = TypeAdapter(External[Tag]).dump_python(tag, context={"storage": memory_url})
    with pytest.raises(ValidationError) as caught:
        Order.model_validate(
            {"number": 1, "first": reference, "lines": []}, context={"storage": memory_url}
        )
    assert caught.value.errors()[0]["loc"][0] == "first"


def test_a_stored_value_that_no_longer_validates(memory_url: str) -> None:
    class Loose(BaseModel):
        sku: str

    class Holder(BaseModel):
        # A random id: the record is then copied to another class name below, which a
        # content-addressed id would refuse as tampering (tests/test_content.py).
        item: Annotated[Loose, ExternalField(content_addressed=False)]

    dumped = Holder(item=Loose(sku="x")).model_dump(context={"storage": memory_url})

    class Line(BaseModel):  # the same stored name, now needing a quantity
        sku: str
        quantity: int

    class Strict(BaseModel):
        item: External[Line]

    reference = {"class_name": "Line", "id": dumped["item"]["id"]}
    copied = asyncio.run(_copy_record(memory_url, "Loose", "Line", reference["id"]))
    assert copied is not None
    assert copied.class_name == "Line"
    assert json.loads(copied.data) == {"sku": "x"}
    with pytest.raises(ValidationError) as caught:
        Strict.model_validate({"item": reference}, context={"storage": memory_url})
    error = caught.value.errors()[0]
    assert error["type"] == "external_invalid"
    assert reference["id"] in error["msg"] and "quantity" in error["msg"]


async def _copy_record(storage: str, old: str, new: str, id: str) -> Record | None:
    """Store the ``old`` record ``id`` again under class name ``new``; return what the backend
    then holds under ``new``, read back, so the caller checks the copy really landed."""
    backend = await get_backend(storage)
    record = await backend.read_record(old, UUID(id))
    assert record is not None
    record.class_name = new
    await backend.write_record(record)
    return await backend.read_record(new, UUID(id))


# --- shapes -----------------------------------------------------------------------------------


class Level3(BaseModel):
    value: int


class Level2(BaseModel):
    inner: External[Level3]
    siblings: list[External[Level3]] = []


class Level1(BaseModel):
    inner: External[Level2]


async def test_nested_external_values_several_levels_deep(memory_url: str) -> None:
    deep = Level1(inner=Level2(inner=Level3(value=3), siblings=[Level3(value=4)]))
    for dumped in (
        deep.model_dump(context={"storage": memory_url}),
        await pydantic_toast.dump(deep, storage=memory_url),
    ):
        assert set(dumped) == {"inner"} and is_reference(dumped["inner"], "Level2")
        assert Level1.model_validate(dumped, context={"storage": memory_url}) == deep
        assert await pydantic_toast.validate(Level1, dumped, storage=memory_url) == deep


T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    items: list[External[T]]  # type: ignore[valid-type]
    total: int


async def test_type_adapter_and_generic_containers(memory_url: str) -> None:
    adapter = TypeAdapter(list[External[Line]])
    lines = [Line(sku="a", quantity=1), Line(sku="b", quantity=2)]
    batched = await pydantic_toast.dump(lines, storage=memory_url, as_type=list[External[Line]])
    assert all(is_reference(item, "Line") for item in batched)
    dumped = adapter.dump_python(lines, context={"storage": memory_url})
    assert all(is_reference(item, "Line") for item in dumped)
    assert adapter.validate_python(dumped, context={"storage": memory_url}) == lines
    assert await pydantic_toast.validate(list[External[Line]], dumped, storage=memory_url) == lines

    page = Page[Line](items=lines, total=2)
    dumped_page = await pydantic_toast.dump(page, storage=memory_url)
    assert all(is_reference(item, "Line") for item in dumped_page["items"])
    assert await pydantic_toast.validate(Page[Line], dumped_page, storage=memory_url) == page


async def test_non_model_types_can_be_external(memory_url: str) -> None:
    class Matrix(BaseModel):
        rows: External[list[list[float]]]
        when: External[dt.datetime]

    matrix = Matrix(rows=[[1.0, 2.0], [3.0, 4.5]], when=dt.datetime(2024, 1, 2, tzinfo=dt.UTC))
    dumped = await pydantic_toast.dump(matrix, storage=memory_url)
    assert dumped["rows"]["class_name"] == "list_list_float"
    assert dumped["when"]["class_name"] == "datetime"
    assert await pydantic_toast.validate(Matrix, dumped, storage=memory_url) == matrix


async def test_strict_models_validate_json_on_the_native_path(memory_url: str) -> None:
    class StrictLine(BaseModel):
        model_config = ConfigDict(strict=True)
        when: dt.datetime
        sku: str

    class StrictOrder(BaseModel):
        model_config = ConfigDict(strict=True)
        line: External[StrictLine]

    order = StrictOrder(line=StrictLine(when=dt.datetime(2024, 5, 6, 7, 8, 9), sku="s"))
    as_json = order.model_dump_json()  # inline value: a datetime as a string is valid JSON-strict
    assert StrictOrder.model_validate_json(as_json) == order
    stored = await pydantic_toast.dump_json(order, storage=memory_url)
    assert await pydantic_toast.validate(StrictOrder, stored, storage=memory_url) == order


async def test_a_reference_shaped_dict_with_an_impossible_class_name_is_not_read(
    memory_url: str,
) -> None:
    """Every reference-shaped dict of the input is read before validation; one whose class
    name no record can have is left to validation (hostile input, not a storage error)."""

    class Tagged(BaseModel):
        line: External[Line]
        extra: dict[str, Any]

    bad = {"class_name": "../../etc", "id": str(uuid4())}
    value = await pydantic_toast.validate(
        Tagged, {"line": {"sku": "a", "quantity": 1}, "extra": {"x": bad}}, storage=memory_url
    )
    assert value == Tagged(line=Line(sku="a", quantity=1), extra={"x": bad})
    with pytest.raises(ValidationError) as caught:
        await pydantic_toast.validate(Tagged, {"line": bad, "extra": {}}, storage=memory_url)
    [error] = caught.value.errors()
    assert (error["type"], error["loc"]) == ("literal_error", ("line", "reference", "class_name"))
    assert error["msg"] == "Input should be 'Line'"


def test_json_schema_shows_value_or_reference() -> None:
    for mode in ("validation", "serialization"):
        schema = Order.model_json_schema(mode=mode)  # type: ignore[arg-type]
        first = schema["properties"]["first"]
        # anyOf, not oneOf: the discriminator decides, and a model whose fields all have
        # defaults would match a reference's two keys too.
        assert first["anyOf"] == [
            {"$ref": "#/$defs/LineReference"},
            {"$ref": "#/$defs/Line"},
        ], first
        reference = schema["$defs"]["LineReference"]  # a named component, written once
        assert reference["title"] == "LineReference"
        assert reference["description"] == "A reference to a stored Line."
        assert reference["required"] == ["class_name", "id"]
        assert reference["properties"]["class_name"]["const"] == "Line"
        assert reference["properties"]["id"]["format"] == "uuid"
        assert reference["additionalProperties"] is False


# --- ExternalBaseModel values ---------------------------------------------------------------


async def test_external_base_models_use_their_own_storage(memory_url: str, namespace: str) -> None:
    own = f"memory://{namespace}-customers"

    class Customer(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=own)
        name: str

    class Invoice(BaseModel):
        customer: External[Customer]
        lines: list[External[Line]]

    invoice = Invoice(customer=Customer(name="Ada"), lines=[Line(sku="a", quantity=1)])
    dumped = invoice.model_dump(context={"storage": None})  # no storage: own storage only
    assert is_reference(dumped["customer"], "Customer")
    assert dumped["lines"] == [{"sku": "a", "quantity": 1, "price": 0.0}]
    # the reference is the customer's own record, loadable directly
    assert await Customer.load_external(dumped["customer"]) == invoice.customer
    assert invoice.customer.external_metadata is not None
    assert str(invoice.customer.external_metadata.id) == dumped["customer"]["id"]
    # resolving needs no storage in the context
    assert Invoice.model_validate(dumped) == invoice

    batched = await pydantic_toast.dump(invoice, storage=memory_url)
    assert batched["customer"] == dumped["customer"]  # same instance, same record
    assert is_reference(batched["lines"][0], "Line")
    loaded = await pydantic_toast.validate(Invoice, batched, storage=memory_url)
    assert loaded == invoice
    assert loaded.customer.external_metadata is not None


# --- cycles and depth ---------------------------------------------------------------------------


class Node(BaseModel):
    name: str
    next: External[Node] | None = None


async def test_a_reference_cycle_is_a_clear_error(memory_url: str) -> None:
    backend = await get_backend(memory_url)
    a, b = uuid4(), uuid4()
    now = dt.datetime.now(dt.UTC)
    await backend.write_records(
        [
            Record(
                a,
                "Node",
                b'{"name":"a","next":{"class_name":"Node","id":"%s"}}' % str(b).encode(),
                1,
                now,
                now,
            ),
            Record(
                b,
                "Node",
                b'{"name":"b","next":{"class_name":"Node","id":"%s"}}' % str(a).encode(),
                1,
                now,
                now,
            ),
        ]
    )
    reference = {"class_name": "Node", "id": str(a)}
    for attempt in (
        lambda: pydantic_toast.validate(External[Node], reference, storage=memory_url),
        lambda: asyncio.to_thread(
            TypeAdapter(External[Node]).validate_python, reference, context={"storage": memory_url}
        ),
    ):
        with pytest.raises(ValidationError, match="reference cycle: Node") as caught:
            await attempt()
        # found two levels down, said once, as itself
        (error,) = caught.value.errors()
        assert error["type"] == "external_cycle"
        assert error["msg"] == f"reference cycle: Node {a} refers back to itself"


async def test_depth_is_bounded(memory_url: str) -> None:
    chain = Node(name="0")
    for i in range(1, 12):
        chain = Node(name=str(i), next=chain)
    dumped = await pydantic_toast.dump(chain, storage=memory_url)
    assert await pydantic_toast.validate(Node, dumped, storage=memory_url) == chain
    with pytest.raises(ValidationError) as caught:
        await pydantic_toast.validate(Node, dumped, storage=memory_url, max_depth=5)
    (error,) = caught.value.errors()
    assert error["type"] == "external_too_deep" and error["loc"] == ("next", "reference")
    assert error["msg"].startswith("references nest deeper than 5 levels at Node ")
    assert error["msg"].endswith("(pydantic_toast.validate's max_depth sets the limit)")
    assert len(str(caught.value)) < 500


# --- batching: round trips ------------------------------------------------------------------------


async def test_1000_items_cost_one_write_batch_and_one_read_batch(storage: str) -> None:
    counting = CountingStore(await get_backend(storage))
    order = make_order(1000)
    dumped = await pydantic_toast.dump(order, storage=counting)
    # 1000 lines + the gift + the note, all in one write batch
    assert counting.writes == [1002]
    assert counting.single == 0

    loaded = await pydantic_toast.validate(Order, dumped, storage=counting)
    assert loaded == order
    assert sorted(counting.reads) == [1, 1001]  # one batch per class: Line and Note
    assert counting.single == 0


async def test_a_bad_reference_among_good_ones_leaves_their_batch_whole(memory_url: str) -> None:
    """The ids of a document's references are parsed together; one that is no UUID, or a
    class name that is no string, is left out of the reads, and validation names it."""
    counting = CountingStore(await get_backend(memory_url))
    order = make_order(3)
    dumped = await pydantic_toast.dump(order, storage=counting)
    dumped["lines"] += [{"class_name": "Line", "id": "not-a-uuid"}, {"class_name": 5, "id": 1}]
    with pytest.raises(ValidationError) as caught:
        await pydantic_toast.validate(Order, dumped, storage=counting)
    refused = {error["loc"][:2] for error in caught.value.errors()}
    assert refused == {("lines", 3), ("lines", 4)}
    assert sorted(counting.reads) == [1, 4]  # the good lines and the gift, then the note
    assert counting.single == 0
    del dumped["lines"][3:]
    assert await pydantic_toast.validate(Order, dumped, storage=counting) == order


async def test_references_shared_across_levels_are_read_once(memory_url: str) -> None:
    counting = CountingStore(await get_backend(memory_url))
    tags = [Level3(value=i) for i in range(3)]
    items = [Level2(inner=tags[i % 3], siblings=tags) for i in range(50)]
    adapter = TypeAdapter(list[External[Level2]])
    dumped = await pydantic_toast.dump(items, storage=counting, as_type=list[External[Level2]])
    assert counting.writes == [53]  # one batch (the spine stores each distinct id once)
    # 50 items holding 3 distinct values are 3 content-addressed records.
    assert len({reference["id"] for reference in dumped}) == 3
    loaded = await pydantic_toast.validate(list[External[Level2]], dumped, storage=counting)
    assert loaded == items
    assert counting.reads == [3, 3]  # two levels, each record once
    assert adapter.validate_python(dumped, context={"storage": memory_url}) == items


def test_the_plain_path_inside_a_running_loop(memory_url: str) -> None:
    async def handler() -> Order:  # as a sync call inside an async framework would
        order = make_order()
        dumped = order.model_dump(context={"storage": memory_url})
        return Order.model_validate(dumped, context={"storage": memory_url})

    assert asyncio.run(handler()) == make_order()


def test_a_dropped_target_class_is_neither_kept_nor_consulted(memory_url: str) -> None:
    """The batched path's index of External targets holds them weakly: once the model that
    uses ``External[Dropped]`` is gone, so is its target, and then the class itself."""
    from pydantic_toast._external import _targets_named

    def define() -> tuple[weakref.ref[type], weakref.ref[type]]:
        class Dropped(ExternalBaseModel):
            model_config = ExternalConfigDict(storage=memory_url)
            n: int

        class Holder(BaseModel):
            item: External[Dropped]

        assert [target.model for target in _targets_named("Dropped")] == [Dropped]
        return weakref.ref(Dropped), weakref.ref(Holder)

    dropped, holder = define()
    gc.collect()
    assert holder() is None
    assert _targets_named("Dropped") == []
    # typing keeps its last 128 subscriptions (Annotated[Dropped, ...] among them): past those,
    # nothing of pydantic-toast's keeps the class.
    for i in range(200):
        Annotated[int, i]
    gc.collect()
    assert dropped() is None


async def test_a_batched_dump_stamps_its_records_once_and_a_reused_batch_afresh(
    memory_url: str,
) -> None:
    from pydantic_toast._external import DumpBatch

    class Pair(BaseModel):
        lines: list[External[Line]]

    async def stamps(dumped: dict[str, Any]) -> list[dt.datetime]:
        backend = await get_backend(memory_url)
        records = await backend.read_records("Line", [UUID(r["id"]) for r in dumped["lines"]])
        return [record.updated_at for record in records if record is not None]

    batch = DumpBatch(memory_url)
    first = Pair(lines=[Line(sku="a", quantity=1), Line(sku="b", quantity=2)])
    dumped = first.model_dump(context=batch.context)
    await batch.flush()
    first_stamps = await stamps(dumped)
    assert len(first_stamps) == 2 and first_stamps[0] == first_stamps[1]  # one moment
    await asyncio.sleep(0.002)
    later = Pair(lines=[Line(sku="c", quantity=3)]).model_dump(context=batch.context)
    await batch.flush()
    assert (await stamps(later))[0] > first_stamps[0]  # stamped when stored, not reused


# --- values that cannot be stored ------------------------------------------------------------


@dataclasses.dataclass
class Sample:
    weight: float


class Priced(BaseModel):
    price: float


class Basket(BaseModel):
    item: External[Priced] | None = None
    items: list[External[Priced]] = []
    weight: External[float] | None = None


@pytest.mark.parametrize(
    ("basket", "message"),
    [
        (Basket(item=Priced(price=float("nan"))), "Priced field price is not a finite number"),
        (
            Basket(items=[Priced(price=1), Priced(price=float("-inf"))]),
            "Priced field price is not a finite number",
        ),
        (Basket(weight=float("inf")), "float value is not a finite number"),
    ],
)
async def test_a_non_finite_float_in_an_external_value_is_refused_and_nothing_written(
    memory_url: str, basket: Basket, message: str
) -> None:
    backend = await get_backend(memory_url)
    before = [info async for info in backend.scan(None)]
    for dump_it in (
        lambda: pydantic_toast.dump(basket, storage=memory_url),
        lambda: pydantic_toast.dump_json(basket, storage=memory_url),
    ):
        with pytest.raises(StorageValidationError, match=f"^{message}: it would be stored as null"):
            await dump_it()
    assert [info async for info in backend.scan(None)] == before


class Lenient(BaseModel):
    model_config = ConfigDict(ser_json_inf_nan="strings")
    weight: float
    note: str | None = None


@pydantic.dataclasses.dataclass(config=ConfigDict(ser_json_inf_nan="strings"))
class LenientSample:
    weight: float
    note: str | None = None


class Kept(BaseModel):
    one: External[Lenient]
    many: External[list[Lenient]]
    sample: External[LenientSample]
    loose: External[dict[str, Any]]


async def test_non_finite_floats_a_config_writes_as_strings_are_stored(memory_url: str) -> None:
    nan = float("nan")
    kept = Kept(
        one=Lenient(weight=float("inf")),
        many=[Lenient(weight=nan), Lenient(weight=1.5)],
        sample=LenientSample(weight=nan),
        loose={"a": None, "b": [1.5, None]},  # nulls, and no NaN: checked in C, stored
    )
    dumped = await pydantic_toast.dump(kept, storage=memory_url)
    again = await pydantic_toast.validate(Kept, dumped, storage=memory_url)
    assert again.one.weight == float("inf") and again.loose == kept.loose
    assert math.isnan(again.many[0].weight) and math.isnan(again.sample.weight)
    refused = Kept(**{**dict(kept), "loose": {"a": nan}})
    with pytest.raises(StorageValidationError, match=r"Any field a is not a finite number"):
        await pydantic_toast.dump(refused, storage=memory_url)


async def test_a_non_finite_float_in_a_dataclass_or_an_extra_field_is_refused(
    memory_url: str,
) -> None:
    class Sampled(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=memory_url, extra="allow")
        sample: Sample

    with pytest.raises(StorageValidationError, match=r"Sampled field sample\.weight is not a"):
        await Sampled(sample=Sample(weight=float("nan"))).save_external()
    with pytest.raises(StorageValidationError, match=r"Sampled field spare is not a finite"):
        await Sampled(sample=Sample(weight=1.0), spare=float("inf")).save_external()
    kept = Sampled(sample=Sample(weight=1.0), spare=None)
    assert await Sampled.load_external(await kept.save_external()) == kept


# --- a stored model that holds its own kind ------------------------------------------------------


class StoredNode(ExternalBaseModel):
    model_config = ExternalConfigDict(storage="memory://tree", class_name="TreeNode")
    name: str
    children: list[External[StoredNode]] = []


async def test_a_stored_model_with_external_fields_of_its_own_type() -> None:
    leaf = StoredNode(name="leaf")
    root = StoredNode(name="root", children=[StoredNode(name="mid", children=[leaf])])
    dumped = await pydantic_toast.dump(root, storage="memory://tree")
    assert dumped["children"][0]["class_name"] == "TreeNode"  # the configured name, not StoredNode
    assert await pydantic_toast.validate(StoredNode, dumped, storage="memory://tree") == root
    assert await StoredNode.load_external(await root.save_external()) == root


async def test_a_cycle_or_the_depth_limit_through_stored_models_is_said_once() -> None:
    backend = await get_backend("memory://tree")
    a, b = uuid4(), uuid4()
    now = dt.datetime.now(dt.UTC)

    def node(name: str, child: UUID) -> bytes:
        return b'{"name":"%s","children":[{"class_name":"TreeNode","id":"%s"}]}' % (
            name.encode(),
            str(child).encode(),
        )

    await backend.write_records(
        [
            Record(a, "TreeNode", node("a", b), 1, now, now),
            Record(b, "TreeNode", node("b", a), 1, now, now),
        ]
    )
    reference = {"class_name": "TreeNode", "id": str(a)}
    with pytest.raises(ValidationError) as caught:
        await pydantic_toast.validate(
            StoredNode, {"name": "root", "children": [reference]}, storage="memory://tree"
        )
    (error,) = caught.value.errors()
    assert error["type"] == "external_cycle"
    assert error["msg"] == f"reference cycle: TreeNode {a} refers back to itself"
    with pytest.raises(StorageValidationError) as loaded:  # a load says it as plainly
        await StoredNode.load_external(reference)
    assert str(loaded.value).startswith("reference cycle: TreeNode ")

    chain = StoredNode(name="0")
    for depth in range(1, 6):
        chain = StoredNode(name=str(depth), children=[chain])
    dumped = await pydantic_toast.dump(chain, storage="memory://tree")
    with pytest.raises(ValidationError) as deep:
        await pydantic_toast.validate(StoredNode, dumped, storage="memory://tree", max_depth=2)
    (error,) = deep.value.errors()
    assert error["type"] == "external_too_deep"
    assert error["msg"].startswith("references nest deeper than 2 levels at TreeNode ")


class Envelope(BaseModel):
    line: External[Line]
    extra: dict[str, Any] = {}


async def test_references_no_field_stores_are_not_read(memory_url: str) -> None:
    counting = CountingStore(await get_backend(memory_url))
    dumped = await pydantic_toast.dump(Envelope(line=Line(sku="a", quantity=1)), storage=counting)
    # Reference-shaped dicts of classes no External field stores: nothing reads them.
    dumped["extra"] = {f"n{n}": {"class_name": f"Nobody{n}", "id": str(uuid4())} for n in range(50)}
    counting.reads.clear()
    again = await pydantic_toast.validate(Envelope, dumped, storage=counting)
    assert again.line == Line(sku="a", quantity=1) and len(again.extra) == 50
    assert counting.reads == [1]  # the one Line, in one batch
