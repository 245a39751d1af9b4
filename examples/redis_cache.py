"""Redis as a cache of expensive models: records expire on their own.

TOAST_REDIS_URL=redis://127.0.0.1:6379/0 python examples/redis_cache.py
"""

import asyncio
import os
import time

from pydantic_toast import ExternalBaseModel, ExternalConfigDict, RecordNotFoundError, aclose

URL = os.environ.get("TOAST_REDIS_URL", "redis://127.0.0.1:6379/0?prefix=example")


class Report(ExternalBaseModel):
    # Redis deletes each record one second after its last save.
    model_config = ExternalConfigDict(storage=URL, ttl=1)

    query: str
    rows: list[dict[str, int]]


def expensive_report(query: str) -> Report:
    time.sleep(0.05)  # stands for a slow query
    return Report(query=query, rows=[{"day": day, "sales": day * 7} for day in range(30)])


async def main() -> None:
    reference = await expensive_report("sales by day").save_external()
    print("cached:   ", reference)
    cached = await Report.load_external(reference)
    print("hit:      ", cached.query, f"({len(cached.rows)} rows)")

    await asyncio.sleep(1.2)
    try:
        await Report.load_external(reference)
    except RecordNotFoundError:
        print("expired:   the record is gone after its ttl")
    await aclose()


if __name__ == "__main__":
    asyncio.run(main())
