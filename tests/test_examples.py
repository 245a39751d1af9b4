"""Every example runs as it is (against the real servers where it needs one), and the
backend guide prints the custom backend example verbatim."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(path.name for path in (ROOT / "examples").glob("*.py"))


def service_env(name: str, request: pytest.FixtureRequest) -> dict[str, str]:
    """What an example needs to find its server: the test suite's own services."""
    if name == "postgresql.py":
        return {"TOAST_POSTGRES_URL": request.getfixturevalue("postgres_server")}
    if name == "celery_claim_check.py":
        return {
            "TOAST_AMQP_URL": request.getfixturevalue("rabbitmq_url"),
            "TOAST_REDIS_URL": request.getfixturevalue("redis_url"),
        }
    if name.startswith("redis"):
        return {"TOAST_REDIS_URL": request.getfixturevalue("redis_url")}
    if name == "s3.py":
        endpoint = request.getfixturevalue("s3_endpoint")
        bucket = request.getfixturevalue("s3_bucket")
        return {"AWS_ENDPOINT_URL": endpoint, "TOAST_S3_URL": f"s3://{bucket}/models"}
    return {}


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs(name: str, request: pytest.FixtureRequest) -> None:
    extra = service_env(name, request)  # first: the S3 fixture sets the AWS test environment
    env = {**os.environ, "PYTHONWARNINGS": "error", **extra}
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
    assert result.stderr == ""


def test_the_backend_guide_shows_the_custom_backend_as_it_runs() -> None:
    guide = (ROOT / "docs" / "how-to" / "writing-a-backend.md").read_text()
    assert '--8<-- "examples/custom_backend.py"' in guide  # included whole by the docs build
