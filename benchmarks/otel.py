"""``python -m benchmarks.otel [--rounds N] [--baseline GIT_REF] [--backend sqlite,redis]``:
what OpenTelemetry costs.

Single saves and loads of a ~200 B model on SQLite and Redis, each mode in processes of its
own (a process's global providers, and whether ``opentelemetry`` imports, cannot be undone):

* ``blocked``: ``import opentelemetry`` fails (an import hook), as without the ``[otel]`` extra;
* ``api``: the API installed, no SDK configured (the state of most programs that have it);
* ``sdk``: the SDK with a span processor into an in-memory exporter and an in-memory metric
  reader, so every operation makes a span and three measurements;
* ``baseline``: with ``--baseline REF``, the package as it was at that commit, import blocked:
  the code without any instrumentation.

Rounds alternate the modes (one process each, in turn), and each process alternates saves
and loads in blocks; a figure is the median over rounds of each process's median. The
machine's noise between processes is a few percent, so the first table also times the
instrumentation's own work on the uninstrumented path (`_telemetry.start` returning
``None``) in one process, which is the precise figure of what it adds.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import timeit
import uuid
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
REDIS = os.environ.get(
    "TOAST_BENCH_REDIS", os.environ.get("TOAST_TEST_REDIS", "redis://127.0.0.1:6379/0")
)
MODES = ("blocked", "api", "sdk")

_BLOCK = """
import sys
class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ImportError(f"No module named {name!r} (blocked)")
sys.meta_path.insert(0, _Blocked())
"""


def _configure_sdk() -> Any:
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    metrics.set_meter_provider(MeterProvider(metric_readers=[InMemoryMetricReader()]))
    return exporter


async def _measure(
    backends: list[str], blocks: int, block_size: int, exporter: Any
) -> dict[str, float]:
    """Median seconds per single save and load, on SQLite and on Redis."""
    from pydantic_toast import ExternalBaseModel, ExternalConfigDict, aclose

    prefix = f"benchotel{uuid.uuid4().hex[:12]}"
    directory = tempfile.mkdtemp(prefix="bench-otel-")
    storages = {
        "sqlite": f"sqlite:///{directory}/models.db",
        "redis": f"{REDIS}?prefix={prefix}",
    }
    medians: dict[str, float] = {}
    clock = asyncio.get_running_loop().time
    try:
        for backend in backends:
            storage = storages[backend]

            class Doc(ExternalBaseModel):
                model_config = ExternalConfigDict(storage=storage, class_name="Doc")
                title: str
                body: str

            doc = Doc(title="benchmark", body="x" * 160)
            reference = await doc.save_external()
            ops = {"save": doc.save_external, "load": partial(Doc.load_external, reference)}
            samples: dict[str, list[float]] = {name: [] for name in ops}
            for block in range(blocks + 1):  # the first is a warm-up
                for name in list(ops)[block % 2 :] + list(ops)[: block % 2]:
                    op = ops[name]
                    for _ in range(block_size):
                        start = clock()
                        await op()
                        if block:
                            samples[name].append(clock() - start)
                if exporter is not None:
                    exporter.clear()
            for name, times in samples.items():
                medians[f"{backend} {name}"] = statistics.median(times)
    finally:
        await aclose()
        import redis

        client = redis.Redis.from_url(REDIS)
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
    return medians


def _start_cost() -> dict[str, float]:
    """Nanoseconds of `_telemetry.start` when it returns ``None``: with the API but no SDK
    (two globals compared), and without OpenTelemetry (a flag)."""
    from pydantic_toast import _telemetry

    start = _telemetry.start
    costs: dict[str, float] = {}
    number = 200_000
    start("load", "sqlite:///x.db", "Doc")  # the first look: finds no provider in this process
    assert _telemetry._trace_api is not None, "a provider is configured in the parent process"
    for mode in ("api", "blocked"):
        _telemetry._unavailable = mode == "blocked"
        best = min(
            timeit.repeat(lambda: start("load", "sqlite:///x.db", "Doc"), number=number, repeat=7)
        )
        empty = min(timeit.repeat(lambda: None, number=number, repeat=7))
        costs[mode] = (best - empty) / number * 1e9
    return costs


def child(mode: str, backends: list[str], blocks: int, block_size: int) -> None:
    exporter = _configure_sdk() if mode == "sdk" else None
    medians = asyncio.run(_measure(backends, blocks, block_size, exporter))
    from pydantic_toast import _telemetry

    medians["on"] = float(_telemetry._recorder is not None)
    print(json.dumps(medians))


def _run_child(
    mode: str, path: Path, backends: list[str], blocks: int, block_size: int
) -> dict[str, float]:
    arguments = ("blocked" if mode == "baseline" else mode, backends, blocks, block_size)
    code = (_BLOCK if mode in ("blocked", "baseline") else "") + (
        f"from benchmarks.otel import child\nchild(*{arguments!r})\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{path}{os.pathsep}{ROOT}"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT
    )
    if result.returncode:
        raise SystemExit(f"{mode} run failed:\n{result.stderr}")
    measured: dict[str, float] = json.loads(result.stdout.splitlines()[-1])
    return measured


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.otel", description=__doc__)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--block-size", type=int, default=200)
    parser.add_argument("--baseline", metavar="GIT_REF", help="also time this commit's code")
    parser.add_argument("--backend", default="sqlite,redis", help="sqlite, redis or both")
    args = parser.parse_args(argv)

    costs = _start_cost()
    print("_telemetry.start returning None: ns per call (added to each single operation)")
    for mode, ns in costs.items():
        print(f"  {mode:8} {ns:6.0f} ns")

    paths = {mode: ROOT for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="bench-otel-base-") as base:
        if args.baseline:
            archive = subprocess.run(
                ["git", "archive", args.baseline, "pydantic_toast"],
                capture_output=True,
                check=True,
                cwd=ROOT,
            ).stdout
            with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
                tar.extractall(base, filter="data")
            paths = {"baseline": Path(base), **paths}
        results: dict[str, list[dict[str, float]]] = {mode: [] for mode in paths}
        for round_ in range(args.rounds):
            modes = list(paths)
            for mode in modes[round_ % len(modes) :] + modes[: round_ % len(modes)]:
                measured = _run_child(
                    mode, paths[mode], args.backend.split(","), args.blocks, args.block_size
                )
                if measured.pop("on") != (mode == "sdk"):
                    raise SystemExit(
                        f"{mode}: telemetry unexpectedly {'off' if mode == 'sdk' else 'on'}"
                    )
                results[mode].append(measured)
            print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    reference = "baseline" if args.baseline else "blocked"
    cases = list(results[reference][0])
    print(
        f"\nSingle operations, ~200 B: median µs over {args.rounds} rounds (x: against {reference})"
    )
    header = f"{'case':12}" + "".join(f"{mode:>18}" for mode in results)
    print(header)
    for case in cases:
        ref = statistics.median(run[case] for run in results[reference])
        cells = []
        for mode in results:
            value = statistics.median(run[case] for run in results[mode])
            cells.append(f"{value * 1e6:.1f} x{value / ref:.3f}")
        print(f"{case:12}" + "".join(f"{cell:>18}" for cell in cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
