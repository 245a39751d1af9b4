"""Garbage collection: content-addressed values that no stored record references any more are
deleted; everything else stays.

    python examples/garbage_collection.py
"""

import asyncio
import tempfile
from datetime import timedelta
from pathlib import Path

from pydantic import BaseModel

import pydantic_toast
from pydantic_toast import External, ExternalBaseModel, ExternalConfigDict

STORAGE = f"sqlite:///{Path(tempfile.mkdtemp()) / 'gc.db'}"


class Line(BaseModel):
    sku: str
    quantity: int


class Order(ExternalBaseModel):
    """Stored under an id of its own (not content-addressed): a root, never collected."""

    model_config = ExternalConfigDict(storage=STORAGE)
    customer: str
    lines: list[External[Line]]


class Message(BaseModel):
    """What goes on a queue: a reference to the order, whose record references its lines."""

    order: External[Order]


class Basket(BaseModel):
    lines: list[External[Line]]


async def main() -> None:
    order = Order(
        customer="ada", lines=[Line(sku="apple", quantity=3), Line(sku="pear", quantity=1)]
    )
    message = await pydantic_toast.dump(Message(order=order), storage=STORAGE)

    # A dump whose references nobody stored: its line is garbage once it is old.
    await pydantic_toast.dump(Basket(lines=[Line(sku="plum", quantity=9)]), storage=STORAGE)

    # The default grace of a day keeps every value written within it: nothing to do yet.
    report = await pydantic_toast.collect_garbage(STORAGE, dry_run=True)
    print(f"dry run, default grace: {report.recent} recent, would delete {report.deleted}")
    assert report.deleted == 0

    # With no grace everything counts as old: only what a root references is kept.
    report = await pydantic_toast.collect_garbage(STORAGE, grace=timedelta(0))
    print(
        f"scanned {report.scanned}: {report.roots} root, {report.reachable} referenced, "
        f"{report.deleted} deleted"
    )
    assert (report.roots, report.reachable, report.deleted) == (1, 2, 1)

    loaded = await pydantic_toast.validate(Message, message, storage=STORAGE)
    assert loaded.order == order
    print("the order still loads:", [line.sku for line in loaded.order.lines])


asyncio.run(main())
