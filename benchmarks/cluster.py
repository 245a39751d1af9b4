"""``python -m benchmarks.cluster [--quick] [--records N] [--rounds R] [--output FILE]``.

Batch throughput on a local Redis Cluster (three primaries, three replicas) against one Redis
server, in the same run, from the same ``redis-server`` binary with the same settings: each
started here on free loopback ports (`tests.clusters`) and stopped at the end. Measured:
``save_external_many`` and ``load_external_many`` of ``--records`` models (~200 B each), one
batch at a time and four batches at once, on the single server, on the cluster, and on the
cluster with ``wait_replicas=1``. Rounds alternate between the setups (the first is a warm-up)
and every figure is a median, in records per second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import report
from pydantic_toast import ExternalBaseModel, ExternalConfigDict
from tests.clusters import RedisNodes, free_ports, redis_cluster, server_arguments

RESULTS = Path(__file__).resolve().parent / "results"


def define(storage: str) -> type[ExternalBaseModel]:
    class Profile(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=storage, retries=0)
        name: str
        email: str
        tags: list[str]
        score: float
        bio: str

    return Profile


def sample(Profile: type[ExternalBaseModel], count: int) -> list[ExternalBaseModel]:
    return [
        Profile(
            name=f"user {i}",
            email=f"user{i}@example.com",
            tags=["a", "b", "c"],
            score=i / 7,
            bio="x" * 100,
        )
        for i in range(count)
    ]


async def measure(urls: dict[str, str], records: int, rounds: int) -> list[dict[str, Any]]:
    classes = {name: define(url) for name, url in urls.items()}
    samples: dict[tuple[str, str], list[float]] = {}
    clock = time.perf_counter
    for round_ in range(rounds + 1):  # round 0 warms every setup up
        names = list(urls)
        names = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name in names:
            Profile = classes[name]
            models = sample(Profile, records)
            batches = [sample(Profile, records) for _ in range(4)]
            start = clock()
            references = await Profile.save_external_many(models)
            save = clock() - start
            start = clock()
            await Profile.load_external_many(references)
            load = clock() - start
            start = clock()
            await asyncio.gather(*(Profile.save_external_many(batch) for batch in batches))
            save4 = clock() - start
            if round_:
                for what, seconds, count in [
                    ("save_many", save, records),
                    ("load_many", load, records),
                    ("4 x save_many", save4, 4 * records),
                ]:
                    samples.setdefault((name, what), []).append(count / seconds)
    return [
        {"setup": name, "operation": what, "records_per_s": statistics.median(samples[name, what])}
        for name in urls
        for what in ("save_many", "load_many", "4 x save_many")
    ]


def _table(rows: list[dict[str, Any]]) -> str:
    setups = list(dict.fromkeys(row["setup"] for row in rows))
    operations = list(dict.fromkeys(row["operation"] for row in rows))
    rate = {(row["setup"], row["operation"]): row["records_per_s"] for row in rows}
    single = setups[0]
    lines = []
    for operation in operations:
        line: list[Any] = [operation]
        for setup in setups:
            value = rate[(setup, operation)]
            ratio = "" if setup == single else f" ({value / rate[(single, operation)]:.2f}x)"
            line.append(f"{value:,.0f}{ratio}")
        lines.append(line)
    return report.table("records per second (median)", ["operation", *setups], lines)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with redis_cluster() as cluster:
        (port,) = free_ports(1)
        nodes = RedisNodes(Path(cluster.nodes.root))
        try:
            nodes.start(port, *server_arguments(port))
            prefix = "bench"
            urls = {
                "one server": f"redis://127.0.0.1:{port}/0?prefix={prefix}",
                "cluster (3 primaries)": f"{cluster.url}?prefix={prefix}",
                "cluster, wait_replicas=1": f"{cluster.url}?prefix={prefix}&wait_replicas=1",
            }
            rows = await measure(urls, args.records, args.rounds)
        finally:
            nodes.stop_all()
    return {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_average": list(os.getloadavg()),
        },
        "records": args.records,
        "rounds": args.rounds,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cluster")
    parser.add_argument("--quick", action="store_true", help="tiny counts (the tests run this)")
    parser.add_argument("--records", type=int, default=1000, help="models per batch")
    parser.add_argument("--rounds", type=int, default=7, help="measured rounds per setup")
    parser.add_argument("--output", type=Path, help="also write the JSON results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.records, args.rounds = 50, 1
    results = asyncio.run(run(args))
    print(_table(results["rows"]))
    text = json.dumps(results, indent=2)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / ("cluster-quick.json" if args.quick else "cluster.json")).write_text(text)
    if args.output:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
