"""PostgreSQL: models in a JSONB table that plain SQL can query.

TOAST_POSTGRES_URL=postgresql://postgres@127.0.0.1:5432/postgres python examples/postgresql.py
"""

import asyncio
import os

import asyncpg  # type: ignore[import-untyped]

from pydantic_toast import ExternalBaseModel, ExternalConfigDict, aclose

URL = os.environ.get("TOAST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
TABLE = "example_customers"


class Customer(ExternalBaseModel):
    model_config = ExternalConfigDict(storage=f"{URL}?table={TABLE}")

    name: str
    email: str
    tags: list[str] = []


async def main() -> None:
    customers = [
        Customer(name="Ada", email="ada@example.com", tags=["vip"]),
        Customer(name="Grace", email="grace@example.com"),
    ]
    references = await Customer.save_external_many(customers)  # one INSERT for the batch
    print("saved:", references[0], "and", len(references) - 1, "more")

    loaded = await Customer.load_external(references[0])
    assert loaded == customers[0]

    # The model's fields are JSONB: query them with plain SQL.
    connection = await asyncpg.connect(URL)
    try:
        rows = await connection.fetch(
            f"SELECT data->>'name' AS name FROM {TABLE} WHERE data->'tags' ? 'vip'"
        )
        print("vip customers via SQL:", [row["name"] for row in rows])
        await connection.execute(f"DROP TABLE {TABLE}")
    finally:
        await connection.close()
    await aclose()


if __name__ == "__main__":
    asyncio.run(main())
