"""Claim check through a queue: an order's lines travel as references, not as payload.

The producer dumps the order with `pydantic_toast.dump`, which stores every `External` value
in one batch and puts references in their place; the message on the queue stays small however
many lines the order has. The consumer validates the message with `pydantic_toast.validate`,
which reads every referenced line in one batch. Runs on the embedded SQLite store:
    python examples/order_queue.py
"""

import asyncio
import json
import tempfile
from pathlib import Path

from pydantic import BaseModel

import pydantic_toast
from pydantic_toast import External, ExternalBaseModel, ExternalConfigDict

STORAGE = f"sqlite:///{Path(tempfile.mkdtemp()) / 'orders.db'}"


class Customer(ExternalBaseModel):
    """A stored entity of its own: it goes to its own storage and keeps its id."""

    model_config = ExternalConfigDict(storage=STORAGE)

    name: str
    email: str


class Line(BaseModel):
    sku: str
    quantity: int
    unit_price: float
    description: str


class Order(BaseModel):
    number: int
    customer: External[Customer]
    lines: list[External[Line]]
    gift: External[Line] | None = None


async def producer(queue: asyncio.Queue[str]) -> None:
    customer = Customer(name="Ada", email="ada@example.com")
    lines = [
        Line(sku=f"SKU-{i:04}", quantity=i % 5 + 1, unit_price=9.99, description="x" * 200)
        for i in range(500)
    ]
    order = Order(number=1042, customer=customer, lines=lines)
    inline = order.model_dump_json()
    message = await pydantic_toast.dump_json(order, storage=STORAGE)
    print(f"producer: order with {len(lines)} lines is {len(inline):,} bytes inline,")
    print(f"          {len(message):,} bytes as references; sent")
    await queue.put(message)


async def consumer(queue: asyncio.Queue[str]) -> None:
    message = await queue.get()
    first = json.loads(message)["lines"][0]
    print(f"consumer: received references such as {first}")
    order = await pydantic_toast.validate(Order, message, storage=STORAGE)
    total = sum(line.quantity * line.unit_price for line in order.lines)
    print(
        f"consumer: order {order.number} for {order.customer.name}: "
        f"{len(order.lines)} lines, total {total:.2f}"
    )


async def main() -> None:
    queue: asyncio.Queue[str] = asyncio.Queue()
    await asyncio.gather(producer(queue), consumer(queue))
    await pydantic_toast.aclose()


if __name__ == "__main__":
    asyncio.run(main())
