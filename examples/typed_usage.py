"""Typed usage, checked with `mypy --strict` in CI: the library's types flow into user code.

`External[Customer]` is `Customer` to a type checker, so assigning a `Customer` and reading its
attributes type-checks; load methods return the class they are called on.
    python examples/typed_usage.py
"""

import asyncio

from pydantic import BaseModel

import pydantic_toast
from pydantic_toast import External, ExternalBaseModel, ExternalConfigDict, ExternalReference

STORAGE = "memory://typed"


class Customer(ExternalBaseModel):
    model_config = ExternalConfigDict(storage=STORAGE)

    name: str
    vip: bool = False


class Line(BaseModel):
    sku: str
    quantity: int


class Order(BaseModel):
    customer: External[Customer]
    lines: list[External[Line]]
    gift: External[Line] | None = None


async def main() -> None:
    customer = Customer(name="Ada")
    reference: ExternalReference = await customer.save_external()
    loaded: Customer = await Customer.load_external(reference)  # Self, not the base class
    many: list[Customer] = await Customer.load_external_many([reference, reference])
    maybe: list[Customer | None] = await Customer.load_external_many([reference], missing_ok=True)
    print(f"{loaded.name} stored as {reference['class_name']} {reference['id']}")
    assert many[0] is many[1] and maybe == [loaded]

    order = Order(customer=customer, lines=[Line(sku="a", quantity=2)])
    order.customer = Customer(name="Grace", vip=True)  # External[Customer] is a Customer
    vip: bool = order.customer.vip
    quantity: int = order.lines[0].quantity
    message = await pydantic_toast.dump_json(order, storage=STORAGE)
    again: Order = await pydantic_toast.validate(Order, message, storage=STORAGE)
    assert again == order and vip and quantity == 2
    print(f"order for {again.customer.name} round-tripped through {len(message)} bytes")


def sync_main() -> None:
    """The sync twins carry the same types as the async methods."""
    reference: ExternalReference = Customer(name="Lin").save_external_sync()
    loaded: Customer = Customer.load_external_sync(reference)
    maybe: list[Customer | None] = Customer.load_external_many_sync([reference], missing_ok=True)
    exists: bool = Customer.exists_external_sync(reference)
    assert maybe == [loaded] and exists
    print(f"{loaded.name} saved and loaded from synchronous code")


asyncio.run(main())
sync_main()
