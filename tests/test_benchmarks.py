"""The benchmark suite runs once, in its quick mode, so that it cannot rot.

Benchmarks are not tests: the numbers are not judged here, only that every section ran on
every backend and produced sane (positive, finite) numbers.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import service_missing

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("single", "batch", "concurrency", "sync", "external", "memory", "toast", "crypto")
BACKENDS = {"memory", "sqlite", "postgresql", "redis", "s3"}


# Keys holding a figure the benchmark measured: times, rates, ratios, speedups and sizes.
_FIGURE_SUFFIXES = ("_ms", "_ops_per_s", "_per_item", "_x", "_bytes")
# Differences that may rightly be zero or negative (RSS may not grow, memory may be freed),
# or absent (None) where the platform cannot measure them.
_NOT_JUDGED_PREFIXES = ("rss_", "traced_retained")


def _is_figure(key: str) -> bool:
    return (
        key.endswith(_FIGURE_SUFFIXES)
        or "ratio" in key
        or "speedup" in key
        or key.startswith(("batched_vs", "plain_vs"))
    )


def _positive_numbers(row: dict[str, Any]) -> list[str]:
    """What is wrong with a row's figures: each must be a positive, finite int or float (not
    a bool, string or None), a dict of figures must not be empty, and a row must hold at
    least one figure, so that a renamed key cannot make the check vacuous."""
    wrong = []
    checked = 0
    for key, value in row.items():
        if not _is_figure(key) or key.startswith(_NOT_JUDGED_PREFIXES):
            continue
        if isinstance(value, dict):
            if not value:
                wrong.append(f"{key}={{}} holds no figure")
            numbers = list(value.values())
        else:
            numbers = [value]
        for number in numbers:
            checked += 1
            if (
                isinstance(number, bool)
                or not isinstance(number, int | float)
                or not math.isfinite(number)
                or number <= 0
            ):
                wrong.append(f"{key}={number!r}")
    if not checked:
        wrong.append(f"no figure among the keys {sorted(row)}")
    return wrong


@pytest.mark.parametrize(
    ("row", "wrong"),
    [
        ({"library_ms": 1.5, "raw_ms": {"raw": 2}, "ratio": 0.75, "dump_bytes": 10}, []),
        ({"backend": "memory", "rss_peak_bytes": 0, "traced_retained_bytes": -3}, ["no figure"]),
        ({}, ["no figure"]),
        ({"library_ms": 0}, ["library_ms=0"]),
        ({"speedup": -2.0}, ["speedup=-2.0"]),
        ({"ratio": float("nan")}, ["ratio=nan"]),
        ({"raw_ops_per_s": float("inf")}, ["raw_ops_per_s=inf"]),
        ({"load_ratio": True}, ["load_ratio=True"]),
        ({"plain_ms": "1.0"}, ["plain_ms='1.0'"]),
        ({"sync_ms": None}, ["sync_ms=None"]),
        ({"dump_bytes": 5, "raw_ms": {}}, ["raw_ms={} holds no figure"]),
        ({"raw_ms": {"raw": 1.0, "raw pipeline": 0}}, ["raw_ms=0"]),
    ],
)
def test_positive_numbers_finds_what_is_wrong(row: dict[str, Any], wrong: list[str]) -> None:
    found = _positive_numbers(row)
    assert len(found) == len(wrong), found
    for message, expected in zip(found, wrong, strict=True):
        assert message.startswith(expected), found


def test_quick_benchmark_runs(postgres_server: str, redis_server: str, tmp_path: Path) -> None:
    try:
        import aiobotocore  # type: ignore[import-untyped]  # noqa: F401
        import moto.server  # noqa: F401
    except ImportError as exc:
        service_missing("aiobotocore and moto[server]", str(exc))
    output = tmp_path / "bench.json"
    environment = {
        **os.environ,
        "TOAST_BENCH_POSTGRES": postgres_server,
        "TOAST_BENCH_REDIS": redis_server,
    }
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--output", str(output)],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    assert "Single save/load" in result.stdout

    results = json.loads(output.read_text())
    assert results["errors"] == []
    assert results["skipped"] == {}
    assert results["meta"]["cpu_count"] > 0
    assert results["meta"]["packages"]["pydantic-toast"]
    sections = results["sections"]
    assert set(sections) == set(SECTIONS)
    for section in SECTIONS:
        rows = sections[section]
        assert rows, f"section {section} is empty"
        for row in rows:
            assert not _positive_numbers(row), (section, row)
    assert {row["backend"] for row in sections["single"]} == BACKENDS
    assert {row["backend"] for row in sections["memory"]} == BACKENDS
    assert {row["backend"] for row in sections["sync"]} >= {"sqlite", "postgresql", "redis"}
    # The sync twins are measured from both kinds of caller, each op of each backend.
    assert {
        (row["backend"], row["caller"], row["op"])
        for row in sections["sync"]
        if row["backend"] == "redis"
    } == set(_SYNC_CASES)
    floor_cases = {row["case"] for row in results["floor_targets"]}
    assert {"redis save (main thread)", "redis load (bridge thread)"} <= floor_cases
    assert {row["backend"] for row in sections["external"]} >= {"sqlite", "postgresql", "redis"}
    assert {(row["op"], row["side"]) for row in sections["memory"]} == {
        ("save", "library"),
        ("save", "raw"),
        ("load", "library"),
        ("load", "raw"),
    }
    compression = [row for row in sections["toast"] if row["kind"] == "compression"]
    assert {row["backend"] for row in compression} == {"redis", "s3"}
    assert all(row["zstd_stored_bytes"] < row["stored_bytes"] for row in compression)
    dumps = {row["threshold"]: row for row in sections["toast"] if row["kind"] == "threshold"}
    assert dumps[1024]["references"] < dumps[0]["references"]
    assert results["targets"], "no target was checked"


_SYNC_CASES = [
    ("redis", caller, op) for caller in ("bridge thread", "main thread") for op in ("save", "load")
]


def test_the_garbage_collection_benchmark_runs_tiny(
    postgres_server: str, redis_server: str, tmp_path: Path
) -> None:
    output = tmp_path / "gc.json"
    environment = {
        **os.environ,
        "TOAST_BENCH_POSTGRES": postgres_server,
        "TOAST_BENCH_REDIS": redis_server,
    }
    command = [sys.executable, "-m", "benchmarks.gc", "--records", "2010", "--trace"]
    command += ["--backend", "postgresql,redis,sqlite,memory", "--output", str(output)]
    result = subprocess.run(
        command,
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    results = json.loads(output.read_text())
    assert results["shape"] == {"orders": 10, "lines": 2000}
    for backend in ("postgresql", "redis", "sqlite", "memory"):
        measured = results[backend]
        report = measured["collection"]["report"]
        assert (report["scanned"], report["roots"], report["reachable"]) == (2010, 10, 1000)
        assert (report["deleted"], report["corrupt"], report["dry_run"]) == (1000, 0, False)
        assert measured["dry_run_traced"]["report"]["deleted"] == 1000
        assert measured["dry_run_traced"]["traced_peak_mb"] > 0
        assert measured["collection"]["seconds"] > 0
        assert measured["repeated_dump"]["new_records"] == 0
        assert measured["repeated_dump"]["rewritten"] == 1000
