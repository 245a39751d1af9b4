"""The cluster benchmark runs once, in its quick mode, so that it cannot rot (its figures are
not judged, only that every setup and operation produced a positive, finite rate)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_cluster_benchmark_runs(tmp_path: Path) -> None:
    output = tmp_path / "cluster.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.cluster", "--quick", "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(output.read_text())["rows"]
    assert {(row["setup"], row["operation"]) for row in rows} == {
        (setup, operation)
        for setup in ("one server", "cluster (3 primaries)", "cluster, wait_replicas=1")
        for operation in ("save_many", "load_many", "4 x save_many")
    }
    assert all(math.isfinite(row["records_per_s"]) and row["records_per_s"] > 0 for row in rows)
    assert "records per second (median)" in done.stdout
