"""Every example runs as it is, and README.md prints the custom backend example verbatim."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(path.name for path in (ROOT / "examples").glob("*.py"))


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs(name: str) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip(), "an example prints what it did"
    assert "Traceback" not in result.stderr


def test_readme_shows_the_custom_backend_as_it_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    example = (ROOT / "examples" / "custom_backend.py").read_text()
    start = example.index("class FileSystemBackend")
    end = example.index('register_backend("myfiles", FileSystemBackend)')
    assert example[start:end].strip() in readme
