"""The Celery app of tests/test_kombu.py, imported by the test process and by its workers.

Configured by the environment, so that each test session has storage of its own:
``TOAST_KOMBU_STORAGE`` (payloads), ``TOAST_KOMBU_BROKER`` and ``TOAST_KOMBU_BACKEND``.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

from celery import Celery, Task
from pydantic import BaseModel

from pydantic_toast import External
from pydantic_toast.kombu import register_claim_check

STORAGE = os.environ["TOAST_KOMBU_STORAGE"]
register_claim_check(STORAGE, ttl=600)

app = Celery(
    "tests.kombu_app",
    broker=os.environ.get("TOAST_KOMBU_BROKER", "amqp://guest:guest@127.0.0.1:5672//"),
    backend=os.environ.get("TOAST_KOMBU_BACKEND", "redis://127.0.0.1:6379/0"),
)
app.conf.update(
    task_serializer="toast",
    result_serializer="toast",
    accept_content=["toast"],
    result_accept_content=["toast"],
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    result_expires=600,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)

if os.environ.get("TOAST_KOMBU_WARM"):
    # The prefork parent uses the storage before it forks its children: they must not reuse
    # its connections.
    from kombu.serialization import dumps

    dumps(["warm" * 100_000], serializer="toast")


class Blob(BaseModel):
    text: str


class Line(BaseModel):
    sku: str
    quantity: int


class Report(BaseModel):
    title: str
    lines: list[Line]
    attachment: External[Blob]


class Summary(BaseModel):
    title: str
    quantity: int
    attachment_size: int
    lines: list[Line]


def digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


@app.task(name="kombu_app.ping")
def ping() -> str:
    return "pong"


@app.task(name="kombu_app.measure")
def measure(value: str) -> dict[str, Any]:
    return {"length": len(value), "sha256": digest(value)}


@app.task(name="kombu_app.echo")
def echo(value: str) -> str:
    return value


@app.task(name="kombu_app.flaky", bind=True, max_retries=3)
def flaky(self: Task[Any, Any], value: str, seen: list[str] | None = None) -> list[str]:
    """Fails its first attempt: the retry is a new message, with the same value."""
    seen = [*(seen or []), digest(value)]
    if self.request.retries == 0:
        raise self.retry(args=(value,), kwargs={"seen": seen}, countdown=0)
    return seen


@app.task(name="kombu_app.slow")
def slow(value: str, marker: str) -> str:
    """Its first run hangs (for the test to kill the worker); the redelivered one returns."""
    path = Path(marker)
    if not path.exists():
        path.write_text(digest(value))
        time.sleep(60)
    return digest(value)


@app.task(name="kombu_app.summarize")
def summarize(report: Report) -> Summary:
    if not isinstance(report, Report):
        raise TypeError(f"got {type(report).__name__}, not Report")
    return Summary(
        title=report.title.upper(),
        quantity=sum(line.quantity for line in report.lines),
        attachment_size=len(report.attachment.text),
        lines=report.lines,
    )
