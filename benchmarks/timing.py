"""Measurement: interleaved blocks of single operations, throughput of concurrent tasks, and
peak memory (tracemalloc and the process's resident set)."""

from __future__ import annotations

import asyncio
import gc
import inspect
import re
import statistics
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# An operation: a callable returning an awaitable (async API) or a value (sync API).
Op = Callable[[], Any]


async def call(op: Op) -> Any:
    result = op()
    if inspect.isawaitable(result):
        result = await result
    return result


async def interleaved(
    ops: dict[str, Op],
    *,
    blocks: int,
    block_size: int,
    warmup: int = 1,
    cpu: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each op, run in alternating blocks of ``block_size`` calls; with
    ``cpu``, each call's CPU seconds in this thread too (the servers' work left out, which
    makes it the steadier measure of what the Python side costs).

    Block ``b`` starts with op ``b mod n`` and goes round, so no op always runs first (or
    right after another one's garbage). The first ``warmup`` rounds are not recorded.
    """
    names = list(ops)
    samples: dict[str, list[float]] = {name: [] for name in names}
    if cpu is not None:
        cpu.update({name: [] for name in names})
    clock, cpu_clock = time.perf_counter, time.thread_time
    for block in range(warmup + blocks):
        shift = block % len(names)
        for name in names[shift:] + names[:shift]:
            op = ops[name]
            times, cpu_times = [], []
            for _ in range(block_size):
                start, cpu_start = clock(), cpu_clock()
                result = op()
                if inspect.isawaitable(result):
                    await result
                times.append(clock() - start)
                cpu_times.append(cpu_clock() - cpu_start)
            if block >= warmup:
                samples[name].extend(times)
                if cpu is not None:
                    cpu[name].extend(cpu_times)
    return samples


async def interleaved_runs(
    ops: dict[str, Op],
    *,
    rounds: int,
    warmup: int = 0,
    cpu: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Seconds of each op (a whole batch, say), one run of each per round (CPU seconds in
    ``cpu`` too, when given)."""
    return await interleaved(ops, blocks=rounds, block_size=1, warmup=warmup, cpu=cpu)


def median(samples: list[float]) -> float:
    return statistics.median(samples)


async def throughput(task: Callable[[int], Awaitable[int]], tasks: int) -> float:
    """Operations per second of ``tasks`` concurrent tasks; each returns how many it did."""
    start = time.perf_counter()
    done = await asyncio.gather(*(task(index) for index in range(tasks)))
    return sum(done) / (time.perf_counter() - start)


async def interleaved_throughput(
    ops: dict[str, Callable[[int], Awaitable[int]]], *, tasks: int, rounds: int
) -> dict[str, list[float]]:
    """Throughput of each op's ``tasks`` concurrent tasks, one run of each per round, after
    one warm-up round."""
    names = list(ops)
    results: dict[str, list[float]] = {name: [] for name in names}
    for round in range(rounds + 1):
        shift = round % len(names)
        for name in names[shift:] + names[:shift]:
            gc.collect()
            rate = await throughput(ops[name], tasks)
            if round:
                results[name].append(rate)
    return results


# --- memory ------------------------------------------------------------------------------------

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kb(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def _reset_rss_peak() -> bool:
    """Reset the kernel's high-water mark of this process's RSS (Linux 4.0+)."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


@dataclass(frozen=True)
class MemoryUse:
    """Bytes above what was allocated before the operation."""

    traced_peak: int
    """tracemalloc's peak: Python-level allocations (bytes, str, objects)."""
    traced_retained: int
    """Still allocated after the operation, its result included (the loaded model)."""
    rss_peak: int | None
    """The resident set's peak above its size before: also sees native buffers (Rust,
    C drivers) that tracemalloc does not; ``None`` where the kernel cannot say."""


async def measure_memory(op: Op) -> MemoryUse:
    """Run ``op`` once under tracemalloc (started by the caller) and the RSS high-water mark."""
    gc.collect()
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    rss_ok = _reset_rss_peak()
    rss_before = _status_kb("VmRSS")
    result = await call(op)
    current, peak = tracemalloc.get_traced_memory()
    rss_peak = _status_kb("VmHWM") if rss_ok else None
    del result
    return MemoryUse(
        traced_peak=peak - before,
        traced_retained=current - before,
        rss_peak=None if rss_peak is None or rss_before is None else rss_peak - rss_before,
    )
