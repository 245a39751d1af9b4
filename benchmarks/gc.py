"""``python -m benchmarks.gc [--records 1000000] [--backend postgresql,redis] [--output FILE]``.

Garbage collection at scale: a storage of ``--records`` records, loaded with the raw drivers
(PostgreSQL ``COPY``, pipelined Redis ``SET`` of the library's envelopes; SQLite
``executemany``), then collected. The records are orders (not content-addressed) of 100
content-addressed lines each, and as many lines again that nothing references, all written
three days ago, so the collection reads everything and deletes half. Each collection runs in
a fresh process (memory: in this one, where the data is), for real: time, and the RSS peak
(``VmHWM``) above the process's RSS once imported and connected. With ``--trace``, a dry run
under tracemalloc first (the peak of Python allocations; tracemalloc makes it several times
slower). Also measured: what dumping an unchanged 1,000-line order again writes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

from pydantic import BaseModel

import pydantic_toast
from benchmarks.services import POSTGRES_URL, REDIS_URL, Services
from pydantic_toast import External
from pydantic_toast._content import content_id
from pydantic_toast._registry import get_backend
from pydantic_toast.backends.records import Record, encode_envelope

BACKENDS = ("postgresql", "redis", "sqlite", "memory")
LINES_PER_ORDER = 100
_CHUNK = 10_000


class Line(BaseModel):
    sku: str
    quantity: int
    price: float


class Order(BaseModel):
    lines: list[External[Line]]


def _shape(records: int) -> tuple[int, int]:
    """(orders, lines): half of the lines referenced by the orders, half by nothing."""
    orders = max(1, records // (2 * LINES_PER_ORDER + 1))
    return orders, records - orders


def _records(records: int, when: datetime) -> Any:
    """The records, in chunks: each order followed by its lines, then the garbage lines."""
    orders, lines = _shape(records)
    serial = 0

    def line() -> Record:
        nonlocal serial
        serial += 1
        data = b'{"sku":"SKU-%d","quantity":%d,"price":%d.5}' % (serial, serial % 97, serial)
        return Record(content_id("Line", data), "Line", data, 1, when, when)

    chunk: list[Record] = []
    for _ in range(orders):
        its = [line() for _ in range(LINES_PER_ORDER)]
        refs = ",".join(f'{{"class_name":"Line","id":"{r.id}"}}' for r in its)
        chunk.append(Record(uuid4(), "Order", f'{{"lines":[{refs}]}}'.encode(), 1, when, when))
        chunk.extend(its)
        if len(chunk) >= _CHUNK:
            yield chunk
            chunk = []
    for _ in range(lines - orders * LINES_PER_ORDER):
        chunk.append(line())
        if len(chunk) >= _CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


async def load(name: str, url: str, records: int) -> float:
    """Write the records with the raw driver; return the seconds it took."""
    when = datetime.now(UTC) - timedelta(days=3)
    backend = await get_backend(url)  # creates the table
    started = time.perf_counter()
    if name == "postgresql":
        import asyncpg  # type: ignore[import-untyped]

        connection = await asyncpg.connect(POSTGRES_URL)
        try:
            for chunk in _records(records, when):
                await connection.copy_records_to_table(
                    backend.table,  # type: ignore[attr-defined]
                    records=[
                        (r.id, r.class_name, r.data.decode(), 1, r.created_at, r.updated_at)
                        for r in chunk
                    ],
                    columns=[
                        "id",
                        "class_name",
                        "data",
                        "schema_version",
                        "created_at",
                        "updated_at",
                    ],
                )
            await connection.execute(f'ANALYZE "{backend.table}"')  # type: ignore[attr-defined]
        finally:
            await connection.close()
    elif name == "redis":
        from redis.asyncio import Redis

        client = Redis.from_url(REDIS_URL)
        prefix = backend.prefix  # type: ignore[attr-defined]
        try:
            for chunk in _records(records, when):
                pipe = client.pipeline(transaction=False)
                for r in chunk:
                    pipe.set(f"{prefix}:{r.class_name}:{r.id}", encode_envelope(r))
                await pipe.execute()
        finally:
            await client.aclose()
    elif name == "sqlite":
        import sqlite3

        database = sqlite3.connect(backend.path)  # type: ignore[attr-defined]
        stamp = when.isoformat(timespec="microseconds")
        with database:
            for chunk in _records(records, when):
                database.executemany(
                    f'INSERT INTO "{backend.table}" VALUES (?, ?, ?, 1, ?, ?)',  # type: ignore[attr-defined]
                    [(str(r.id), r.class_name, r.data.decode(), stamp, stamp) for r in chunk],
                )
        database.close()
    else:
        for chunk in _records(records, when):
            await backend.write_records(chunk)
    return time.perf_counter() - started


def collect_in_child(url: str, *, dry_run: bool, traced: bool) -> dict[str, Any]:
    """One collection in a fresh process (memory: in this one, where the data is)."""
    command = [sys.executable, "-m", "benchmarks.gc", "--collect", url]
    command += ["--dry-run"] if dry_run else []
    command += ["--traced"] if traced else []
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"the collection failed: {result.stderr[-2000:]}")
    measured: dict[str, Any] = json.loads(result.stdout)
    return measured


async def collect_here(url: str, *, dry_run: bool, traced: bool) -> dict[str, Any]:
    """Collect, measuring time, tracemalloc's peak (when ``traced``) and the RSS high-water
    mark's growth during the collection."""
    await get_backend(url)  # connected before measuring
    rss_before = _memory("VmRSS")
    if traced:
        tracemalloc.start()
    started = time.perf_counter()
    report = await pydantic_toast.collect_garbage(url, dry_run=dry_run)
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1] if traced else None
    if traced:
        tracemalloc.stop()
    rss_peak = _memory("VmHWM")
    await pydantic_toast.aclose()
    return {
        "seconds": round(seconds, 2),
        "traced_peak_mb": None if peak is None else round(peak / 2**20, 1),
        "rss_before_mb": round(rss_before / 1024, 1),
        "rss_peak_mb": round(rss_peak / 1024, 1),
        "rss_growth_mb": round((rss_peak - rss_before) / 1024, 1),
        "report": report.model_dump(mode="json"),
    }


def _memory(field: str) -> int:
    """A figure of /proc/self/status in KiB: ``VmRSS`` now, ``VmHWM`` the peak. (The peak of
    `resource.getrusage` is no use in a child: Linux carries the parent's across exec.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


async def repeated_dump(url: str) -> dict[str, Any]:
    """What dumping an unchanged 1,000-line order a second time writes: how many records it
    adds (none) and how many it rewrites (each line once, refreshing its ``updated_at``)."""
    order = Order(lines=[Line(sku=f"R-{i}", quantity=i, price=i + 0.25) for i in range(1000)])
    backend = await get_backend(url)
    await pydantic_toast.dump(order, storage=url)
    before = {i.id async for i in backend.scan_records("Line")}
    started_at = datetime.now(UTC)
    started = time.perf_counter()
    second = await pydantic_toast.dump(order, storage=url)
    seconds = time.perf_counter() - started
    after = [i async for i in backend.scan_records("Line")]
    ours = {UUID(reference["id"]) for reference in second["lines"]}
    return {
        "new_records": len({i.id for i in after} - before),
        "rewritten": sum(i.updated_at >= started_at for i in after if i.id in ours),
        "second_dump_ms": round(seconds * 1000, 1),
    }


async def run(backends: tuple[str, ...], records: int, traced: bool) -> dict[str, Any]:
    services = Services()
    results: dict[str, Any] = {
        "records": records,
        "shape": dict(zip(("orders", "lines"), _shape(records), strict=True)),
    }
    try:
        await services.start(backends)
        for name in backends:
            url = services.urls.get(name)
            if url is None:
                results[name] = {"missing": services.missing.get(name, "not started")}
                continue
            print(f"{name}: loading {records:,} records...", file=sys.stderr)
            loaded = await load(name, url, records)
            await pydantic_toast.aclose()
            print(f"{name}: collecting...", file=sys.stderr)
            results[name] = {"load_seconds": round(loaded, 1)}
            if traced:
                results[name]["dry_run_traced"] = (
                    await collect_here(url, dry_run=True, traced=True)
                    if name == "memory"
                    else collect_in_child(url, dry_run=True, traced=True)
                )
            real = (
                await collect_here(url, dry_run=False, traced=False)
                if name == "memory"
                else collect_in_child(url, dry_run=False, traced=False)
            )
            results[name] |= {
                "collection": real,
                "repeated_dump": await repeated_dump(url),
            }
            await pydantic_toast.aclose()
            print(f"{name}: {json.dumps(results[name])}", file=sys.stderr)
    finally:
        await services.cleanup()
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gc", description=__doc__)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--backend", default="postgresql,redis", help=",".join(BACKENDS))
    parser.add_argument("--output", type=Path, help="also write the results here as JSON")
    parser.add_argument(
        "--trace",
        action="store_true",
        help="also a dry run under tracemalloc (its peak; several times slower)",
    )
    parser.add_argument("--collect", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--dry-run", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--traced", action="store_true", help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    if arguments.collect:
        measured = asyncio.run(
            collect_here(arguments.collect, dry_run=arguments.dry_run, traced=arguments.traced)
        )
        print(json.dumps(measured))
        return
    names = tuple(name.strip() for name in arguments.backend.split(",") if name.strip())
    unknown = sorted(set(names) - set(BACKENDS))
    if unknown:
        raise SystemExit(
            f"unknown backend: {', '.join(unknown)} (choose from {', '.join(BACKENDS)})"
        )
    results = asyncio.run(run(names, arguments.records, arguments.trace))
    text = json.dumps(results, indent=2)
    print(text)
    if arguments.output:
        arguments.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
