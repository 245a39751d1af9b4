"""Tables on stdout, the issue's targets checked against the results, and the JSON file."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

Row = dict[str, Any]

RESULTS_DIR = Path(__file__).parent / "results"
PACKAGES = (
    "pydantic-toast",
    "pydantic",
    "pydantic-core",
    "asyncpg",
    "redis",
    "aiobotocore",
    "botocore",
    "moto",
)


# --- tables ----------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value >= 1000:
            return f"{value:,.0f}"
        if value >= 100:
            return f"{value:.1f}"
        if value >= 1:
            return f"{value:.3g}" if value < 10 else f"{value:.2f}"
        return f"{value:.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [
        max(len(header), *(len(row[i]) for row in cells)) if cells else len(header)
        for i, header in enumerate(headers)
    ]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            value.ljust(width) if i == 0 else value.rjust(width)
            for i, (value, width) in enumerate(zip(values, widths, strict=True))
        ).rstrip()

    out = [title, line(headers), line(["-" * width for width in widths])]
    out += [line(row) for row in cells]
    return "\n".join(out)


def _mb(value: int | None) -> float | None:
    return None if value is None else value / 1e6


def _alternative(row: Row, unit: str) -> list[Any]:
    """The second raw side of a row, if any: [label, value, library/it]."""
    for key in row:
        if key.startswith("raw_") and key.endswith(unit) and key != f"raw{unit}":
            label = key.removeprefix("raw_").removesuffix(unit)
            return [label.replace("_", " "), row[key], row.get(f"ratio_{label}")]
    return [None, None, None]


def _single(rows: list[Row]) -> str:
    return table(
        "Single save/load: median ms per operation (serialization/validation on both sides;"
        " other raw: PostgreSQL's default pool, Redis's EVALSHA of the library's script)",
        ["backend", "size", "op", "library", "raw", "lib/raw", "other raw", "ms", "lib/other"],
        [
            [
                r["backend"],
                r["size"],
                r["op"],
                r["library_ms"],
                r["raw_ms"],
                r["ratio"],
                *_alternative(r, "_ms"),
            ]
            for r in rows
        ],
    )


def _batch(rows: list[Row]) -> str:
    return table(
        "Batches: median ms per batch of n 200 B models (n singles: n awaited single operations;"
        " raw speedup: the raw driver's n singles against its best batch; CPU us/record: this"
        " process's CPU per record beyond the best raw batch's)",
        [
            "backend",
            "op",
            "n",
            "library",
            "n singles",
            "speedup",
            "best raw",
            "raw",
            "lib/raw",
            "raw n singles",
            "raw speedup",
            "CPU us/record",
        ],
        [
            [
                r["backend"],
                r["op"],
                r["batch_size"],
                r["library_batch_ms"],
                r["sequential_ms"],
                r["speedup"],
                r["raw_best"],
                r["raw_best_ms"],
                r["ratio"],
                r["raw_sequential_ms"],
                r["raw_speedup"],
                r["cpu_us_per_record"],
            ]
            for r in rows
        ],
    )


def _concurrency(rows: list[Row]) -> str:
    return table(
        "Concurrency: operations per second of concurrent tasks (200 B models, median)",
        ["backend", "op", "tasks", "library", "raw", "lib/raw", "other raw", "ops/s", "lib/other"],
        [
            [
                r["backend"],
                r["op"],
                r["tasks"],
                r["library_ops_per_s"],
                r["raw_ops_per_s"],
                r["ratio"],
                *_alternative(r, "_ops_per_s"),
            ]
            for r in rows
        ],
    )


def _sync(rows: list[Row]) -> str:
    return table(
        "Sync twins against the async API: median ms per operation (200 B; bridge thread:"
        " called inside a running loop; main thread: a plain script's, no loop running;"
        " (bridge) is a coroutine doing nothing, run through the sync bridge)",
        ["backend", "caller", "op", "async", "sync", "sync/async"],
        [
            [
                r["backend"],
                r.get("caller", "bridge thread"),
                r["op"],
                r["async_ms"],
                r["sync_ms"],
                r["ratio"],
            ]
            for r in rows
        ],
    )


def _external(rows: list[Row]) -> str:
    return table(
        "External[T]: median ms for an order of N External lines"
        " (inline: no storage; pydantic: the same model without External;"
        " batched: pydantic_toast.dump/validate; random ids: the same with"
        " content_addressed=False; plain: model_dump/model_validate with context;"
        " raw: the raw driver writing or reading the same N lines in one batch)",
        [
            "backend",
            "op",
            "N",
            "inline",
            "pydantic",
            "batched",
            "random ids",
            "plain",
            "raw",
            "batched/inline",
        ],
        [
            [
                r["backend"],
                r["op"],
                r["items"],
                r["inline_ms"],
                r["pydantic_ms"],
                r["batched_ms"],
                r.get("random_ids_ms"),
                r["plain_ms"],
                r.get("raw_batch_ms"),
                r["batched_vs_inline"],
            ]
            for r in rows
        ],
    )


def _memory(rows: list[Row]) -> str:
    return table(
        "Peak memory of one operation above what was allocated before, as a multiple of the"
        " payload (tracemalloc: Python allocations incl. the loaded model; RSS: also native)",
        ["backend", "size", "op", "side", "payload MB", "traced MB", "x", "RSS MB", "x"],
        [
            [
                r["backend"],
                r["size"],
                r["op"],
                r["side"],
                _mb(r["payload_bytes"]),
                _mb(r["traced_peak_bytes"]),
                r["traced_peak_x"],
                _mb(r["rss_peak_bytes"]),
                r["rss_peak_x"],
            ]
            for r in rows
        ],
    )


FORMATTERS: dict[str, Callable[[list[Row]], str]] = {
    "single": _single,
    "batch": _batch,
    "concurrency": _concurrency,
    "sync": _sync,
    "external": _external,
    "memory": _memory,
}


def _toast(rows: list[Row]) -> str:
    compression = [r for r in rows if r["kind"] == "compression"]
    threshold = [r for r in rows if r["kind"] == "threshold"]
    parts = (
        [
            table(
                "Compression (zstd above 1 KiB): stored bytes and median ms, against the same "
                "record uncompressed",
                [
                    "backend",
                    "size",
                    "stored",
                    "zstd stored",
                    "ratio",
                    "save",
                    "zstd save",
                    "x",
                    "load",
                    "zstd load",
                    "x",
                ],
                [
                    [
                        r["backend"],
                        r["size"],
                        r["stored_bytes"],
                        r["zstd_stored_bytes"],
                        r["size_ratio"],
                        r["plain_save_ms"],
                        r["zstd_save_ms"],
                        r["save_ratio"],
                        r["plain_load_ms"],
                        r["zstd_load_ms"],
                        r["load_ratio"],
                    ]
                    for r in compression
                ],
            )
        ]
        if compression
        else []
    )
    parts.append(
        table(
            "Threshold: bytes of a dump of N lines (one in ten ~4 KB, the rest ~30 B); "
            "threshold 0 stores every line",
            ["backend", "threshold", "lines", "inline bytes", "dump bytes", "references"],
            [
                [
                    r["backend"],
                    r["threshold"],
                    r["lines"],
                    r["inline_bytes"],
                    r["dump_bytes"],
                    r["references"],
                ]
                for r in threshold
            ],
        )
    )
    return "\n".join(parts)


FORMATTERS["toast"] = _toast


def _crypto(rows: list[Row]) -> str:
    return table(
        "Encryption at rest (AES-256-GCM): median ms per save and load, encrypted against the "
        "same record in the clear; extra: the added ms per record",
        ["backend", "size", "save", "sealed", "x", "extra", "load", "sealed", "x", "extra"],
        [
            [
                r["backend"],
                r["size"],
                r["plain_save_ms"],
                r["sealed_save_ms"],
                r["save_ratio"],
                r["save_extra_ms"],
                r["plain_load_ms"],
                r["sealed_load_ms"],
                r["load_ratio"],
                r["load_extra_ms"],
            ]
            for r in rows
        ],
    )


FORMATTERS["crypto"] = _crypto


def section_table(section: str, rows: list[Row]) -> str:
    return FORMATTERS[section](rows)


# --- the targets -----------------------------------------------------------------------


def _check(
    checks: list[Row], target: str, case: str, value: float, limit: float, at_most: bool
) -> None:
    met = value <= limit if at_most else value >= limit
    checks.append(
        {
            "target": target,
            "case": case,
            "value": value,
            "limit": f"{'<=' if at_most else '>='} {limit:g}",
            "met": met,
        }
    )


def evaluate_targets(sections: dict[str, list[Row]]) -> list[Row]:
    """Issue 5's targets, each checked against the rows that measure it."""
    checks: list[Row] = []
    for r in sections.get("single", []):
        case = f"{r['backend']} {r['size']} {r['op']}"
        if r["backend"] == "postgresql":
            _check(checks, "single vs raw default pool", case, r["ratio_default_pool"], 1.0, True)
            _check(checks, "single vs tuned raw pool", case, r["ratio"], 1.15, True)
        elif r["backend"] == "redis":
            limit = 1.15 if r["payload_bytes"] < 2000 else 1.05
            _check(checks, "single vs raw redis-py", case, r["ratio"], limit, True)
        elif r["backend"] in ("s3", "sqlite"):
            _check(checks, "single vs raw client", case, r["ratio"], 1.1, True)
    for r in sections.get("batch", []):
        case = f"{r['backend']} {r['op']} x{r['batch_size']}"
        if r["backend"] in ("postgresql", "redis"):
            _check(checks, "batch speedup over singles", case, r["speedup"], 20, False)
        if r["backend"] != "memory":
            _check(checks, "batch vs best raw batch", case, r["ratio"], 1.5, True)
    for r in sections.get("concurrency", []):
        if r["backend"] not in ("postgresql", "redis", "s3"):
            continue
        case = f"{r['backend']} {r['op']} x{r['tasks']} tasks"
        if r["op"] == "save":
            _check(checks, "concurrent saves vs raw pool", case, r["ratio"], 0.85, False)
        elif r["backend"] != "s3":  # S3 has no batch read to coalesce loads into
            _check(checks, "concurrent loads vs raw pool", case, r["ratio"], 1.5, False)
    for r in sections.get("sync", []):
        if r["backend"].startswith("("):
            continue
        case = f"{r['backend']} {r['op']} ({r.get('caller', 'bridge thread')})"
        _check(checks, "sync vs async", case, r["ratio"], 1.2, True)
    memory_rows = [r for r in sections.get("memory", []) if r["side"] == "library"]
    if memory_rows:
        largest = max(r["payload_bytes"] for r in memory_rows)
        for r in memory_rows:
            if r["payload_bytes"] == largest:
                case = f"{r['backend']} {r['size']} {r['op']}"
                _check(checks, "peak memory (traced) / payload", case, r["traced_peak_x"], 4, True)
    return checks


def evaluate_floor_targets(sections: dict[str, list[Row]]) -> list[Row]:
    """Issue 11's targets (overhead at the floor), each beside the figure that measures it."""
    checks: list[Row] = []
    for r in sections.get("single", []):
        if r["backend"] not in ("postgresql", "redis") or r["size"] not in ("200B", "10KB"):
            continue
        case = f"{r['backend']} {r['size']} {r['op']}"
        _check(checks, "single vs raw driver", case, r["ratio"], 1.08, True)
        if r["backend"] == "postgresql":
            _check(checks, "single vs raw default pool", case, r["ratio_default_pool"], 1.0, True)
    for r in sections.get("batch", []):
        if r["backend"] not in ("postgresql", "redis"):
            continue
        case = f"{r['backend']} {r['op']} x{r['batch_size']}"
        _check(checks, "batch vs best raw batch", case, r["ratio"], 1.25, True)
        _check(checks, "batch speedup over singles", case, r["speedup"], 25, False)
        # This process's CPU per record beyond the raw driver's best batch: what the library
        # costs on top of the driver and Pydantic (the servers' work, such as the Redis
        # script's, is not in it; the lib/raw ratio above counts it).
        _check(checks, "library CPU us per record", case, r["cpu_us_per_record"], 2, True)
    for r in sections.get("concurrency", []):
        if r["backend"] in ("postgresql", "redis") and r["op"] == "load":
            case = f"{r['backend']} {r['op']} x{r['tasks']} tasks"
            _check(checks, "concurrent loads vs raw pool", case, r["ratio"], 2, False)
    for r in sections.get("sync", []):
        if not r["backend"].startswith("("):
            case = f"{r['backend']} {r['op']} ({r.get('caller', 'bridge thread')})"
            _check(checks, "sync vs async", case, r["ratio"], 1.1, True)
    external: dict[str, list[Row]] = {}
    for r in sections.get("external", []):
        if r.get("raw_batch_ms"):
            external.setdefault(r["backend"], []).append(r)
    for backend, rows in external.items():
        if {r["op"] for r in rows} == {"dump", "validate"}:
            value = sum(r["batched_ms"] for r in rows) / sum(r["raw_batch_ms"] for r in rows)
            case = f"{backend} dump+validate x{rows[0]['items']}"
            _check(checks, "External vs raw write+read", case, round(value, 3), 1.5, True)
    if "redis" in {r["backend"] for rows in sections.values() for r in rows}:
        hiredis = importlib.util.find_spec("hiredis") is not None
        _check(checks, "hiredis installed", "redis", float(hiredis), 1, False)
    return checks


def targets_table(
    checks: list[Row], title: str = "Issue 5 targets", verdicts: tuple[str, str] = ("yes", "NO")
) -> str:
    met, missed = verdicts
    return table(
        title,
        ["target", "case", "value", "limit", "met"],
        [
            [c["target"], c["case"], c["value"], c["limit"], met if c["met"] else missed]
            for c in checks
        ],
    )


# --- machine info and JSON ---------------------------------------------------------------------


def machine_info(service_versions: dict[str, str]) -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": sys.version,
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "load_average": os.getloadavg(),
        "packages": versions,
        "servers": service_versions,
        "git_commit": commit or None,
    }


def write_json(results: dict[str, Any], extra: Path | None, *, quick: bool) -> list[Path]:
    """Write ``results/latest.json`` (``results/quick.json`` for a quick run, so a test run
    never overwrites the last full one) and ``extra``, if given."""
    text = json.dumps(results, indent=2, default=str) + "\n"
    paths = [RESULTS_DIR / ("quick.json" if quick else "latest.json")]
    if extra is not None:
        paths.append(extra)
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return paths
