"""Typed usage, checked with `mypy --strict` in CI: the library's API types flow into user code.

python examples/typed_usage.py
"""

import asyncio

from pydantic_toast import ExternalBaseModel, ExternalConfigDict, ExternalReference


class Customer(ExternalBaseModel):
    model_config = ExternalConfigDict(storage="memory://typed")

    name: str
    vip: bool = False


async def main() -> None:
    customer = Customer(name="Ada")
    reference: ExternalReference = await customer.save_external()
    loaded: Customer = await Customer.load_external(reference)  # Self, not the base class
    name: str = loaded.name
    print(f"{name} stored as {reference['class_name']} {reference['id']}")

    again: Customer = Customer.load_external_sync(customer.save_external_sync())
    assert again == customer


asyncio.run(main())
