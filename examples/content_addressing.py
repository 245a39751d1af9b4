"""Content addressing: an unchanged value is stored once, however often it is sent, and every
load proves that what it read is what the reference names.

    python examples/content_addressing.py
"""

import asyncio
import sqlite3
import tempfile
from contextlib import closing
from pathlib import Path

from pydantic import BaseModel, ValidationError

import pydantic_toast
from pydantic_toast import External

STORAGE = f"sqlite:///{Path(tempfile.mkdtemp()) / 'content.db'}"


class Line(BaseModel):
    sku: str
    quantity: int


class Order(BaseModel):
    lines: list[External[Line]]


async def main() -> None:
    order = Order(lines=[Line(sku=f"SKU-{i % 3}", quantity=i % 3) for i in range(9)])
    first = await pydantic_toast.dump(order, storage=STORAGE)
    again = await pydantic_toast.dump(order, storage=STORAGE)
    ids = {reference["id"] for reference in first["lines"]}
    print(f"9 lines, {len(ids)} distinct values: {len(ids)} records, the same references again")
    assert first == again and len(ids) == 3

    loaded = await pydantic_toast.validate(Order, again, storage=STORAGE)
    assert loaded == order
    print("loaded and verified:", [line.sku for line in loaded.lines[:3]], "...")

    # Someone changes a stored line behind the library's back: the next load notices.
    path = STORAGE.removeprefix("sqlite:///")
    with closing(sqlite3.connect(path, isolation_level=None)) as database:
        database.execute(
            "UPDATE external_models SET data = ? WHERE id = ?",
            ('{"sku":"SKU-0","quantity":1000}', first["lines"][0]["id"]),
        )
    try:
        await pydantic_toast.validate(Order, again, storage=STORAGE)
    except ValidationError as exc:
        print("tampering refused:", exc.errors()[0]["msg"].rpartition(": ")[0])
    else:
        raise AssertionError("a tampered record loaded")


asyncio.run(main())
