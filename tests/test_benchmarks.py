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

from tests.conftest import service_missing

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("single", "batch", "concurrency", "sync", "external", "memory", "toast")
BACKENDS = {"memory", "sqlite", "postgresql", "redis", "s3"}


def _positive_numbers(row: dict[str, Any]) -> list[str]:
    """What is wrong with a row's numbers: times, rates, ratios and sizes must be > 0."""
    wrong = []
    for key, value in row.items():
        measured = (
            key.endswith(("_ms", "_ops_per_s", "_per_item", "_x"))
            or key in ("speedup", "payload_bytes", "traced_peak_bytes")
            or key.startswith("ratio")
            or key.startswith("batched_vs")
            or key.startswith("plain_vs")
        )
        if not measured or key.startswith("rss_"):  # RSS may not grow at all
            continue
        values = value.values() if isinstance(value, dict) else [value]
        for number in values:
            if not isinstance(number, int | float) or not math.isfinite(number) or number <= 0:
                wrong.append(f"{key}={number!r}")
    return wrong


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
