"""The sections of the suite. Each takes one backend's `Target` and returns result rows
(JSON-ready dicts); times are medians, in milliseconds unless the key says otherwise."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import sys
import tracemalloc
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any
from uuid import UUID, uuid4

import pydantic_toast
import pydantic_toast._registry
import pydantic_toast.backends.records
from benchmarks.backends import RawStore, Target
from benchmarks.models import (
    AllExternalOrder,
    BenchLine,
    BenchOrder,
    Doc,
    InlineOrder,
    RandomIdOrder,
    ThresholdOrder,
    doc_class,
    json_size,
    make_doc,
    make_order,
    threshold_lines,
)
from benchmarks.settings import Settings
from benchmarks.timing import (
    interleaved,
    interleaved_runs,
    interleaved_throughput,
    measure_memory,
    median,
)

Row = dict[str, Any]
SECTIONS = ("single", "batch", "concurrency", "sync", "external", "memory", "toast", "crypto")
# Which backends each section runs on (the issue asks sync and External[T] on these).
SECTION_BACKENDS = {
    "single": ("memory", "sqlite", "postgresql", "redis", "s3"),
    "batch": ("memory", "sqlite", "postgresql", "redis", "s3"),
    "concurrency": ("memory", "sqlite", "postgresql", "redis", "s3"),
    "sync": ("sqlite", "postgresql", "redis"),
    "external": ("memory", "sqlite", "postgresql", "redis"),
    "memory": ("memory", "sqlite", "postgresql", "redis", "s3"),
    # compression applies to the backends that store bytes; the threshold to any
    "toast": ("memory", "redis", "s3"),
    "crypto": ("memory", "sqlite", "postgresql", "redis", "s3"),
}


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 4)


def _ratio(numerator: float, denominator: float) -> float:
    return round(numerator / denominator, 3)


def _raw_suffix(label: str) -> str:
    """``raw`` -> ``""``, ``raw_default_pool`` -> ``"_default_pool"``: keys of the extra raws."""
    return label.removeprefix("raw")


# --- single save and load ------------------------------------------------------------------------


async def single(target: Target, settings: Settings) -> list[Row]:
    rows: list[Row] = []
    for size in settings.single:
        blocks, block_size = settings.single_counts(target.name, size)
        model = make_doc(target.model, size, seed=1)
        reference = await model.save_external()
        raw_model = make_doc(target.model, size, seed=1)
        raw_ids = {label: uuid4() for label in target.raws}
        for label, raw in target.raws.items():
            await raw.save(raw_model, raw_ids[label])
        savers: dict[str, Any] = {"library": model.save_external}
        loaders: dict[str, Any] = {"library": partial(target.model.load_external, reference)}
        for label, raw in target.raws.items():
            savers[label] = partial(raw.save, raw_model, raw_ids[label])
            if raw.distinct_loads:
                loaders[label] = partial(raw.load, raw_ids[label])
        for op, ops in (("save", savers), ("load", loaders)):
            samples = await interleaved(ops, blocks=blocks, block_size=block_size)
            library = median(samples["library"])
            row: Row = {
                "backend": target.name,
                "size": size,
                "payload_bytes": json_size(model),
                "op": op,
                "samples": len(samples["library"]),
                "library_ms": _ms(library),
            }
            for label in target.raws:
                if label not in samples:
                    continue
                raw_time = median(samples[label])
                row[f"{label}_ms"] = _ms(raw_time)
                row[f"ratio{_raw_suffix(label)}"] = _ratio(library, raw_time)
            rows.append(row)
    return rows


# --- batches ---------------------------------------------------------------------------------


async def batch(target: Target, settings: Settings) -> list[Row]:
    is_s3 = target.name == "s3"
    size = settings.s3_batch_size if is_s3 else settings.batch_size
    rounds = settings.s3_batch_rounds if is_s3 else settings.batch_rounds
    cls = target.model
    models = [make_doc(cls, "200B", seed=i) for i in range(size)]
    references = await cls.save_external_many(models)
    raw_ids = {label: [uuid4() for _ in range(size)] for label in target.raws}
    for label, raw in target.raws.items():
        await raw.save_many(models, raw_ids[label])

    floor = target.raw
    floor_ids = raw_ids["raw"]

    async def save_each() -> None:
        for model in models:
            await model.save_external()

    async def load_each() -> None:
        for reference in references:
            await cls.load_external(reference)

    async def raw_save_each() -> None:
        for model, id in zip(models, floor_ids, strict=True):
            await floor.save(model, id)

    async def raw_load_each() -> None:
        for id in floor_ids:
            await floor.load(id)

    # "sequential": N awaited single operations, the library's and the raw driver's.
    savers: dict[str, Any] = {
        "library": partial(cls.save_external_many, models),
        "sequential": save_each,
        "raw sequential": raw_save_each,
    }
    loaders: dict[str, Any] = {
        "library": partial(cls.load_external_many, references),
        "sequential": load_each,
        "raw sequential": raw_load_each,
    }
    for label, raw in target.raws.items():
        for variant, save_many in raw.batch_savers().items():
            name = f"{label} {variant}".strip()
            savers[name] = partial(save_many, models, raw_ids[label])
        if raw.distinct_loads:
            loaders[label] = partial(raw.load_many, raw_ids[label])

    rows: list[Row] = []
    for op, ops in (("save", savers), ("load", loaders)):
        cpu_samples: dict[str, list[float]] = {}
        samples = await interleaved_runs(ops, rounds=rounds, warmup=1, cpu=cpu_samples)
        times = {name: median(values) for name, values in samples.items()}
        cpu = {name: median(values) for name, values in cpu_samples.items()}
        raw_sequential = times.pop("raw sequential")
        raws = {name: time for name, time in times.items() if name.startswith("raw")}
        best = min(raws, key=raws.__getitem__)
        rows.append(
            {
                "backend": target.name,
                "op": op,
                "batch_size": size,
                "rounds": rounds,
                "library_batch_ms": _ms(times["library"]),
                "sequential_ms": _ms(times["sequential"]),
                "speedup": _ratio(times["sequential"], times["library"]),
                "raw_best": best,
                "raw_best_ms": _ms(raws[best]),
                "ratio": _ratio(times["library"], raws[best]),
                "raw_ms": {name: _ms(time) for name, time in raws.items()},
                "raw_sequential_ms": _ms(raw_sequential),
                "raw_speedup": _ratio(raw_sequential, raws[best]),
                # This process's CPU per batch: the library's, and the best raw batch's.
                "library_cpu_ms": _ms(cpu["library"]),
                "raw_best_cpu_ms": _ms(cpu[best]),
                "cpu_us_per_record": round((cpu["library"] - cpu[best]) * 1e6 / size, 2),
            }
        )
    return rows


# --- concurrency -------------------------------------------------------------------------------


async def concurrency(target: Target, settings: Settings) -> list[Row]:
    tasks = settings.tasks
    per_task = settings.s3_ops_per_task if target.name == "s3" else settings.ops_per_task
    cls = target.model
    models = [make_doc(cls, "200B", seed=i) for i in range(tasks)]
    references = await cls.save_external_many(models)
    raw_ids = {label: [uuid4() for _ in range(tasks)] for label in target.raws}
    for label, raw in target.raws.items():
        await raw.save_many(models, raw_ids[label])

    async def library_save(index: int) -> int:
        model = models[index]
        for _ in range(per_task):
            await model.save_external()
        return per_task

    async def library_load(index: int) -> int:
        reference = references[index]
        for _ in range(per_task):
            await cls.load_external(reference)
        return per_task

    def raw_save(raw: RawStore, ids: list[UUID]) -> Callable[[int], Awaitable[int]]:
        async def run(index: int) -> int:
            model, id = models[index], ids[index]
            for _ in range(per_task):
                await raw.save(model, id)
            return per_task

        return run

    def raw_load(raw: RawStore, ids: list[UUID]) -> Callable[[int], Awaitable[int]]:
        async def run(index: int) -> int:
            id = ids[index]
            for _ in range(per_task):
                await raw.load(id)
            return per_task

        return run

    savers: dict[str, Callable[[int], Awaitable[int]]] = {"library": library_save}
    loaders: dict[str, Callable[[int], Awaitable[int]]] = {"library": library_load}
    for label, raw in target.raws.items():
        savers[label] = raw_save(raw, raw_ids[label])
        if raw.distinct_loads:
            loaders[label] = raw_load(raw, raw_ids[label])

    rows: list[Row] = []
    for op, ops in (("save", savers), ("load", loaders)):
        samples = await interleaved_throughput(ops, tasks=tasks, rounds=settings.concurrency_rounds)
        library = median(samples["library"])
        row: Row = {
            "backend": target.name,
            "op": op,
            "tasks": tasks,
            "ops_per_task": per_task,
            "library_ops_per_s": round(library, 1),
        }
        for label in target.raws:
            if label not in samples:
                continue
            raw_rate = median(samples[label])
            row[f"{label}_ops_per_s"] = round(raw_rate, 1)
            row[f"ratio{_raw_suffix(label)}"] = _ratio(library, raw_rate)
        rows.append(row)
    return rows


# --- sync twins against the async API -----------------------------------------------------------


async def sync_api(target: Target, settings: Settings) -> list[Row]:
    """The sync twins against the async API: called from this thread, inside the suite's
    running loop (so they go through the library's bridge thread), and from a plain script's
    main thread, where no loop runs (`benchmarks.sync_main`, in a subprocess)."""
    return [*await _sync_in_loop(target, settings), *await _sync_in_main_thread(target, settings)]


async def _sync_in_main_thread(target: Target, settings: Settings) -> list[Row]:
    blocks, block_size = settings.sync
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "benchmarks.sync_main",
        target.url,
        str(blocks),
        str(block_size),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    if process.returncode:
        raise RuntimeError(f"benchmarks.sync_main failed: {err.decode(errors='replace')[-2000:]}")
    return [{"backend": target.name, "caller": "main thread", **row} for row in json.loads(out)]


async def _sync_in_loop(target: Target, settings: Settings) -> list[Row]:
    cls = target.model
    async_model = make_doc(cls, "200B", seed=1)
    sync_model = make_doc(cls, "200B", seed=2)
    reference = await async_model.save_external()
    sync_reference = sync_model.save_external_sync()
    blocks, block_size = settings.sync
    rows: list[Row] = []
    cases: dict[str, dict[str, Any]] = {
        "save": {"async": async_model.save_external, "sync": sync_model.save_external_sync},
        "load": {
            "async": partial(cls.load_external, reference),
            "sync": partial(cls.load_external_sync, sync_reference),
        },
    }
    for op, ops in cases.items():
        samples = await interleaved(ops, blocks=blocks, block_size=block_size)
        async_time, sync_time = median(samples["async"]), median(samples["sync"])
        rows.append(
            {
                "backend": target.name,
                "caller": "bridge thread",
                "op": op,
                "samples": len(samples["async"]),
                "async_ms": _ms(async_time),
                "sync_ms": _ms(sync_time),
                "ratio": _ratio(sync_time, async_time),
            }
        )
    return rows


async def _noop() -> None:
    return None


async def bridge_floor(settings: Settings) -> list[Row]:
    """What the sync bridge itself costs: a coroutine that does nothing, awaited and run
    through the library's sync bridge (its event loop in a background thread)."""
    from pydantic_toast._bridge import run_sync  # the bridge every *_sync method goes through

    blocks, block_size = settings.sync
    ops: dict[str, Any] = {"async": _noop, "sync": lambda: run_sync(_noop())}
    samples = await interleaved(ops, blocks=blocks, block_size=block_size)
    async_time, sync_time = median(samples["async"]), median(samples["sync"])
    return [
        {
            "backend": "(bridge)",
            "caller": "bridge thread",
            "op": "no-op",
            "samples": len(samples["async"]),
            "async_ms": _ms(async_time),
            "sync_ms": _ms(sync_time),
            "ratio": _ratio(sync_time, async_time),
        }
    ]


# --- External[T] -----------------------------------------------------------------------------


async def external(target: Target, settings: Settings) -> list[Row]:
    """An order with N ``External`` lines: batched API (content-addressed lines, and lines
    under random ids), plain Pydantic path, and inline."""
    items = settings.external_items
    url = target.url
    order = make_order(items)
    inline = order.model_dump()
    plain_order = InlineOrder.model_validate(inline)
    references = await pydantic_toast.dump(order, storage=url)
    random_order = RandomIdOrder.model_validate(inline)
    random_references = await pydantic_toast.dump(random_order, storage=url)
    context = {"storage": url}
    assert len(references["lines"]) == items
    # The floor: the raw driver writing the same lines in one batch and reading them back.
    raw = copy.copy(target.raw)
    raw.model = BenchLine  # type: ignore[assignment]
    raw.to_json = BenchLine.__pydantic_serializer__.to_json
    lines: list[Any] = list(order.lines)
    raw_ids = [uuid4() for _ in lines]
    await raw.save_many(lines, raw_ids)

    cases: dict[str, dict[str, Any]] = {
        "dump": {
            "inline": order.model_dump,
            "pydantic": plain_order.model_dump,
            "batched": partial(pydantic_toast.dump, order, storage=url),
            "random ids": partial(pydantic_toast.dump, random_order, storage=url),
            "plain": partial(order.model_dump, context=context),
            "raw": partial(raw.save_many, lines, raw_ids),
        },
        "validate": {
            "inline": partial(BenchOrder.model_validate, inline),
            "pydantic": partial(InlineOrder.model_validate, inline),
            "batched": partial(pydantic_toast.validate, BenchOrder, references, storage=url),
            "random ids": partial(
                pydantic_toast.validate, RandomIdOrder, random_references, storage=url
            ),
            "plain": partial(BenchOrder.model_validate, references, context=context),
            "raw": partial(raw.load_many, raw_ids),
        },
    }
    rows: list[Row] = []
    for op, ops in cases.items():
        samples = await interleaved_runs(ops, rounds=settings.external_rounds, warmup=1)
        times = {name: median(values) for name, values in samples.items()}
        rows.append(
            {
                "backend": target.name,
                "op": op,
                "items": items,
                "inline_ms": _ms(times["inline"]),
                "pydantic_ms": _ms(times["pydantic"]),
                "batched_ms": _ms(times["batched"]),
                "random_ids_ms": _ms(times["random ids"]),
                "plain_ms": _ms(times["plain"]),
                "raw_batch_ms": _ms(times["raw"]),
                "batched_us_per_item": round(times["batched"] / items * 1e6, 2),
                "plain_us_per_item": round(times["plain"] / items * 1e6, 2),
                "batched_vs_inline": _ratio(times["batched"], times["inline"]),
                "plain_vs_batched": _ratio(times["plain"], times["batched"]),
            }
        )
    return rows


# --- peak memory -----------------------------------------------------------------------------


async def memory(target: Target, settings: Settings) -> list[Row]:
    """Peak memory of one save and one load, library and raw, as multiples of the payload."""
    cls = target.model
    raw = target.raw
    rows: list[Row] = []
    # A small round first, so connections, caches and code paths exist before measuring.
    warm = make_doc(cls, "10KB")
    warm_id = uuid4()
    await cls.load_external(await warm.save_external())
    await raw.save(warm, warm_id)
    await raw.load(warm_id)
    for size in settings.memory_sizes:
        model = make_doc(cls, size, seed=3)
        payload = json_size(model)
        raw_id = uuid4()
        tracemalloc.start()
        try:
            uses = {
                ("save", "library"): await measure_memory(model.save_external),
                ("save", "raw"): await measure_memory(partial(raw.save, model, raw_id)),
            }
            reference = _reference_of(model)
            uses["load", "library"] = await measure_memory(partial(cls.load_external, reference))
            uses["load", "raw"] = await measure_memory(partial(raw.load, raw_id))
        finally:
            tracemalloc.stop()
        del model
        for (op, side), use in uses.items():
            rows.append(
                {
                    "backend": target.name,
                    "size": size,
                    "payload_bytes": payload,
                    "op": op,
                    "side": side,
                    "traced_peak_bytes": use.traced_peak,
                    "traced_peak_x": round(use.traced_peak / payload, 2),
                    "traced_retained_bytes": use.traced_retained,
                    "rss_peak_bytes": use.rss_peak,
                    "rss_peak_x": None
                    if use.rss_peak is None
                    else round(use.rss_peak / payload, 2),
                }
            )
    return rows


def _reference_of(model: Doc) -> dict[str, str]:
    metadata = model.external_metadata
    assert metadata is not None, "the model was saved"
    return {"class_name": metadata.class_name, "id": str(metadata.id)}


# Run once per section, before its backends.
# --- TOAST: compression and the size threshold -------------------------------------------------


async def toast(target: Target, settings: Settings) -> list[Row]:
    """Compression (stored bytes, save and load time, with and without zstd) on backends that
    store bytes, and on any backend the bytes a size threshold keeps out of a dump."""
    rows: list[Row] = []
    if target.name != "memory":
        compressed_model = doc_class(target.url, compress_above=1024, class_name="BenchZstd")
        for size in settings.toast_sizes:
            plain = make_doc(target.model, size, seed=5)
            packed = make_doc(compressed_model, size, seed=5)
            plain_ref = await plain.save_external()
            packed_ref = await packed.save_external()
            samples = await interleaved(
                {
                    "plain_save": plain.save_external,
                    "zstd_save": packed.save_external,
                    "plain_load": partial(target.model.load_external, plain_ref),
                    "zstd_load": partial(compressed_model.load_external, packed_ref),
                },
                blocks=settings.toast_blocks,
                block_size=settings.toast_block_size,
            )
            stored = await _stored_size(target, compressed_model, packed_ref["id"])
            plain_stored = await _stored_size(target, target.model, plain_ref["id"])
            rows.append(
                {
                    "backend": target.name,
                    "kind": "compression",
                    "size": size,
                    "json_bytes": json_size(plain),
                    "stored_bytes": plain_stored,
                    "zstd_stored_bytes": stored,
                    "size_ratio": _ratio(stored, plain_stored),
                    **{f"{key}_ms": _ms(median(value)) for key, value in samples.items()},
                    "save_ratio": _ratio(
                        median(samples["zstd_save"]), median(samples["plain_save"])
                    ),
                    "load_ratio": _ratio(
                        median(samples["zstd_load"]), median(samples["plain_load"])
                    ),
                }
            )
    # The threshold: an order of many small lines and a few large ones.
    order = ThresholdOrder(lines=threshold_lines(settings.toast_lines))
    for threshold in (0, 1024):
        dumped = await pydantic_toast.dump_json(
            order if threshold else AllExternalOrder(lines=order.lines), storage=target.url
        )
        rows.append(
            {
                "backend": target.name,
                "kind": "threshold",
                "threshold": threshold,
                "lines": len(order.lines),
                "inline_bytes": len(order.model_dump_json()),
                "dump_bytes": len(dumped),
                "references": dumped.count('"class_name"'),
            }
        )
    return rows


async def _stored_size(target: Target, model: type[Doc], id: str) -> int:
    """Bytes the backend holds for a record: its envelope, as the backend stored it."""
    backend = await pydantic_toast._registry.get_backend(target.url)
    record = await backend.read_record(model.__external_settings__.class_name, UUID(id))
    assert record is not None
    raw = pydantic_toast.backends.records.encode_envelope(
        dataclasses.replace(record, compress_above=model.__external_settings__.compress_above)
    )
    return len(raw)


# --- encryption at rest ----------------------------------------------------------------------


async def crypto(target: Target, settings: Settings) -> list[Row]:
    """Encrypted saves and loads (AES-256-GCM) against the same records in the clear: the
    cost per record of sealing and opening, with the store's round trip on both sides."""
    # A fixed key: what it is does not change the cost.
    pydantic_toast.use_keyring(pydantic_toast.Keyring({"bench": bytes(range(32))}, "bench"))
    sealed_model = doc_class(target.url, encrypt=True, class_name="BenchSealed")
    rows: list[Row] = []
    try:
        for size in settings.crypto_sizes:
            blocks, block_size = settings.single_counts(target.name, size)
            plain = make_doc(target.model, size, seed=6)
            sealed = make_doc(sealed_model, size, seed=6)
            plain_ref = await plain.save_external()
            sealed_ref = await sealed.save_external()
            samples = await interleaved(
                {
                    "plain_save": plain.save_external,
                    "sealed_save": sealed.save_external,
                    "plain_load": partial(target.model.load_external, plain_ref),
                    "sealed_load": partial(sealed_model.load_external, sealed_ref),
                },
                blocks=blocks,
                block_size=block_size,
            )
            times = {key: median(value) for key, value in samples.items()}
            rows.append(
                {
                    "backend": target.name,
                    "size": size,
                    "json_bytes": json_size(plain),
                    **{f"{key}_ms": _ms(value) for key, value in times.items()},
                    "save_ratio": _ratio(times["sealed_save"], times["plain_save"]),
                    "load_ratio": _ratio(times["sealed_load"], times["plain_load"]),
                    "save_extra_ms": _ms(max(times["sealed_save"] - times["plain_save"], 1e-7)),
                    "load_extra_ms": _ms(max(times["sealed_load"] - times["plain_load"], 1e-7)),
                }
            )
    finally:
        pydantic_toast.use_keyring(None)
    return rows


PREAMBLES: dict[str, Callable[[Settings], Awaitable[list[Row]]]] = {"sync": bridge_floor}

RUNNERS: dict[str, Callable[[Target, Settings], Awaitable[list[Row]]]] = {
    "single": single,
    "batch": batch,
    "concurrency": concurrency,
    "sync": sync_api,
    "external": external,
    "memory": memory,
    "toast": toast,
    "crypto": crypto,
}
