"""The payloads: one model shape, scaled from about 200 bytes to 50 MB of JSON.

A `Doc` has a few scalar fields and a list of `Item`s, so both serialization and validation do
real work; big payloads are mostly text, so the Python model takes about as much memory as its
JSON, and a memory multiple says what the library and the driver add on top.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel

from pydantic_toast import External, ExternalBaseModel, ExternalConfigDict, ExternalField

CLASS_NAME = "BenchDoc"

# Payload sizes by label: (items, characters of each item's note). Measured sizes are reported.
SIZES: dict[str, tuple[int, int]] = {
    "200B": (1, 60),
    "10KB": (24, 360),
    "100KB": (100, 960),
    "1MB": (1_000, 960),
    "50MB": (50_000, 960),
}


class Item(BaseModel):
    sku: str
    quantity: int
    price: float
    note: str


class DocFields(BaseModel):
    title: str
    email: str
    tags: list[str]
    items: list[Item]


class Doc(DocFields, ExternalBaseModel):
    """Only a base: `doc_class` binds it to a storage URL. Never instantiated itself."""

    model_config = ExternalConfigDict(storage="memory://pydantic-toast-bench-unbound")


def doc_class(storage: str, **config: Any) -> type[Doc]:
    """The payload model stored in ``storage`` (records named ``BenchDoc`` unless ``config``
    names them otherwise; other config such as ``compress_above`` too)."""

    class BenchDoc(Doc):
        model_config = ExternalConfigDict(
            storage=storage,
            **{"class_name": CLASS_NAME, **config},  # type: ignore[typeddict-item]
        )

    return BenchDoc


def make_doc(cls: type[Doc], size: str, seed: int = 0) -> Doc:
    """A payload of about ``size`` (a key of `SIZES`); ``seed`` varies its content."""
    count, note_length = SIZES[size]
    note = ("lorem ipsum dolor sit amet " * (note_length // 27 + 1))[:note_length]
    return cls(
        title=f"document {seed}",
        email=f"user{seed}@example.com",
        tags=["bench", "pydantic-toast", f"seed-{seed}"],
        items=[
            Item(sku=f"SKU-{seed}-{i:06}", quantity=i % 7 + 1, price=i * 0.25, note=note)
            for i in range(count)
        ],
    )


def json_size(model: BaseModel) -> int:
    """Bytes of the model's JSON, as Pydantic writes it."""
    return len(type(model).__pydantic_serializer__.to_json(model))


class BenchLine(BaseModel):
    """An order line: stored through `External` in the storage of the dump's context."""

    sku: str
    quantity: int
    price: float


class BenchOrder(BaseModel):
    number: int
    lines: list[External[BenchLine]]


class RandomIdOrder(BaseModel):
    """`BenchOrder` with lines under random ids: no content digest on dump, no verification
    on load (what `External` cost before content addressing)."""

    number: int
    lines: list[Annotated[BenchLine, ExternalField(content_addressed=False)]]


class InlineOrder(BaseModel):
    """`BenchOrder` without `External`: what plain Pydantic costs for the same data."""

    number: int
    lines: list[BenchLine]


def make_order(lines: int) -> BenchOrder:
    return BenchOrder(
        number=1042,
        lines=[BenchLine(sku=f"SKU-{i:06}", quantity=i % 5 + 1, price=9.99) for i in range(lines)],
    )


class ThresholdLine(BaseModel):
    sku: str
    description: str


class ThresholdOrder(BaseModel):
    """Lines stored out of line only when their JSON reaches 1 KiB, as TOAST does."""

    lines: list[Annotated[ThresholdLine, ExternalField(threshold=1024)]]


class AllExternalOrder(BaseModel):
    """The same order with every line stored out of line."""

    lines: list[External[ThresholdLine]]


def threshold_lines(count: int) -> list[ThresholdLine]:
    """Mostly short lines, one in ten with a long description (about 4 KB)."""
    return [
        ThresholdLine(sku=f"SKU-{i:05}", description=("long text " * 400 if i % 10 == 0 else "ok"))
        for i in range(count)
    ]
