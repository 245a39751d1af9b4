"""The sync twins in a plain script's main thread, where no event loop runs.

Run as ``python -m benchmarks.sync_main URL BLOCKS BLOCK_SIZE`` (the ``sync`` section starts
it in a subprocess, since the suite itself runs inside an event loop, where a ``*_sync`` call
goes through the bridge thread instead). It times ``save_external_sync`` /
``load_external_sync`` called right here against the async methods awaited in an event loop
of this process, in interleaved blocks, and prints one JSON row per operation: median
milliseconds per call of each, and their ratio.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

from benchmarks.models import doc_class, make_doc
from benchmarks.timing import median

Row = dict[str, Any]


def _timed_sync(op: Callable[[], object], calls: int) -> list[float]:
    clock, times = time.perf_counter, []
    for _ in range(calls):
        start = clock()
        op()
        times.append(clock() - start)
    return times


async def _timed_async(op: Callable[[], Coroutine[Any, Any, object]], calls: int) -> list[float]:
    clock, times = time.perf_counter, []
    for _ in range(calls):
        start = clock()
        await op()
        times.append(clock() - start)
    return times


def measure(url: str, blocks: int, block_size: int) -> list[Row]:
    """Median seconds per call, sync in this thread against async in a loop, per operation."""
    assert threading.current_thread() is threading.main_thread()
    cls = doc_class(url)
    sync_model, async_model = make_doc(cls, "200B", seed=2), make_doc(cls, "200B", seed=1)
    sync_reference = sync_model.save_external_sync()
    loop = asyncio.new_event_loop()
    try:
        reference = loop.run_until_complete(async_model.save_external())
        cases: dict[str, tuple[Callable[[], object], Callable[[], Any]]] = {
            "save": (sync_model.save_external_sync, async_model.save_external),
            "load": (
                partial(cls.load_external_sync, sync_reference),
                partial(cls.load_external, reference),
            ),
        }
        rows = []
        for op, (sync_op, async_op) in cases.items():
            samples: dict[str, list[float]] = {"sync": [], "async": []}
            for block in range(blocks + 1):  # the first block of each is a warm-up
                order = ("sync", "async") if block % 2 else ("async", "sync")
                for side in order:
                    if side == "sync":
                        times = _timed_sync(sync_op, block_size)
                    else:
                        times = loop.run_until_complete(_timed_async(async_op, block_size))
                    if block:
                        samples[side].extend(times)
            async_time, sync_time = median(samples["async"]), median(samples["sync"])
            rows.append(
                {
                    "op": op,
                    "samples": len(samples["sync"]),
                    "async_ms": round(async_time * 1000, 4),
                    "sync_ms": round(sync_time * 1000, 4),
                    "ratio": round(sync_time / async_time, 3),
                }
            )
        return rows
    finally:
        loop.run_until_complete(_close())
        loop.close()


async def _close() -> None:
    import pydantic_toast

    await pydantic_toast.aclose()


def main(argv: list[str]) -> int:
    url, blocks, block_size = argv[0], int(argv[1]), int(argv[2])
    print(json.dumps(measure(url, blocks, block_size)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
