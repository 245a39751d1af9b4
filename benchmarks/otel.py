"""``python -m benchmarks.otel [--rounds N] [--baseline GIT_REF] [--backend sqlite,redis]``:
what OpenTelemetry costs.

Single saves and loads of a ~200 B model on SQLite and Redis, each mode in processes of its
own (a process's global providers, and whether ``opentelemetry`` imports, cannot be undone):

* ``blocked``: ``import opentelemetry`` fails (an import hook), as without the ``[otel]`` extra;
* ``api``: the API installed, no SDK configured (the state of most programs that have it);
* ``sdk``: the SDK with a span processor into an in-memory exporter and an in-memory metric
  reader, so every operation makes a span and two or three measurements.

With ``--baseline REF`` every process also loads the package as it was at that commit (a copy
renamed ``pydantic_toast_base``: the code without instrumentation) and times it interleaved,
block by block, with the current code; a mode's ratio is the median over rounds of each
process's own ratio, so the machine's noise between processes cancels out. Rounds alternate
the modes. The first table times `_telemetry.start` returning ``None`` alone: the precise
figure of what instrumentation adds to an operation when nothing records.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
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
    backends: list[str], blocks: int, block_size: int, exporter: Any, with_baseline: bool
) -> dict[str, float]:
    """Median seconds per single save and load on each backend; with ``with_baseline``, also
    of the baseline copy of the package (``pydantic_toast_base``), interleaved with them."""
    import pydantic_toast

    packages: dict[str, Any] = {"": pydantic_toast}
    if with_baseline:
        packages[" base"] = importlib.import_module("pydantic_toast_base")
    prefix = f"benchotel{uuid.uuid4().hex[:12]}"
    directory = tempfile.mkdtemp(prefix="bench-otel-")
    medians: dict[str, float] = {}
    clock = asyncio.get_running_loop().time
    try:
        for backend in backends:
            ops: dict[str, Any] = {}
            for suffix, package in packages.items():
                tag = suffix.strip() or "lib"
                storage = {
                    "sqlite": f"sqlite:///{directory}/{tag}.db",
                    "redis": f"{REDIS}?prefix={prefix}{tag}",
                }[backend]

                class Doc(package.ExternalBaseModel):  # type: ignore[name-defined]
                    model_config = package.ExternalConfigDict(storage=storage, class_name="Doc")
                    title: str
                    body: str

                doc = Doc(title="benchmark", body="x" * 160)
                reference = await doc.save_external()
                ops[f"{backend} save{suffix}"] = doc.save_external
                ops[f"{backend} load{suffix}"] = partial(Doc.load_external, reference)
            names = list(ops)
            samples: dict[str, list[float]] = {name: [] for name in names}
            for block in range(blocks + 1):  # the first is a warm-up
                shift = block % len(names)
                for name in names[shift:] + names[:shift]:
                    op = ops[name]
                    for _ in range(block_size):
                        start = clock()
                        await op()
                        if block:
                            samples[name].append(clock() - start)
                if exporter is not None:
                    exporter.clear()
            for name, times in samples.items():
                medians[name] = statistics.median(times)
    finally:
        for package in packages.values():
            await package.aclose()
        import redis

        client = redis.Redis.from_url(REDIS)
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
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


def child(
    mode: str, backends: list[str], blocks: int, block_size: int, with_baseline: bool
) -> None:
    exporter = _configure_sdk() if mode == "sdk" else None
    medians = asyncio.run(_measure(backends, blocks, block_size, exporter, with_baseline))
    from pydantic_toast import _telemetry

    medians["on"] = float(_telemetry._recorder is not None)
    print(json.dumps(medians))


def _run_child(mode: str, arguments: tuple[Any, ...], pythonpath: str) -> dict[str, float]:
    code = (_BLOCK if mode == "blocked" else "") + (
        f"from benchmarks.otel import child\nchild({mode!r}, *{arguments!r})\n"
    )
    env = {**os.environ, "PYTHONPATH": pythonpath}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT
    )
    if result.returncode:
        raise SystemExit(f"{mode} run failed:\n{result.stderr}")
    measured: dict[str, float] = json.loads(result.stdout.splitlines()[-1])
    if measured.pop("on") != (mode == "sdk"):
        raise SystemExit(f"{mode}: telemetry unexpectedly {'off' if mode == 'sdk' else 'on'}")
    return measured


def _baseline_copy(ref: str, directory: str) -> None:
    """The package as of ``ref``, renamed ``pydantic_toast_base`` so that it loads next to
    the current one (its own registry, pools and classes)."""
    archive = subprocess.run(
        ["git", "archive", ref, "pydantic_toast"], capture_output=True, check=True, cwd=ROOT
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            extracted = tar.extractfile(member)
            assert extracted is not None
            target = Path(
                directory, member.name.replace("pydantic_toast", "pydantic_toast_base", 1)
            )
            target.parent.mkdir(parents=True, exist_ok=True)
            text = extracted.read().decode()
            target.write_text(text.replace("pydantic_toast", "pydantic_toast_base"))


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

    results: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="bench-otel-base-") as base:
        if args.baseline:
            _baseline_copy(args.baseline, base)
        pythonpath = os.pathsep.join([str(ROOT), base])
        arguments = (args.backend.split(","), args.blocks, args.block_size, bool(args.baseline))
        for round_ in range(args.rounds):
            shift = round_ % len(MODES)
            for mode in MODES[shift:] + MODES[:shift]:
                results[mode].append(_run_child(mode, arguments, pythonpath))
            print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    cases = [case for case in results["blocked"][0] if not case.endswith(" base")]
    if args.baseline:
        # Each process's own ratio to the baseline it ran interleaved: machine noise between
        # processes cancels out.
        against = f"the code of {args.baseline}, in the same process"
        columns: list[tuple[str, str]] = [("baseline", "blocked"), *((m, m) for m in MODES)]
    else:
        against = "the blocked mode"
        columns = [(m, m) for m in MODES]
    print(
        f"\nSingle operations, ~200 B: median µs over {args.rounds} rounds (x: against {against})"
    )
    print(f"{'case':12}" + "".join(f"{title:>18}" for title, _ in columns))
    for case in cases:
        cells = []
        for title, mode in columns:
            runs = results[mode]
            if title == "baseline":
                value, ratio = statistics.median(run[f"{case} base"] for run in runs), 1.0
            elif args.baseline:
                value = statistics.median(run[case] for run in runs)
                ratio = statistics.median(run[case] / run[f"{case} base"] for run in runs)
            else:
                value = statistics.median(run[case] for run in runs)
                ratio = value / statistics.median(run[case] for run in results["blocked"])
            cells.append(f"{value * 1e6:.1f} x{ratio:.3f}")
        print(f"{case:12}" + "".join(f"{cell:>18}" for cell in cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
