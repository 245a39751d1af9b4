"""Celery tasks that take and return Pydantic models, with large bodies claim-checked.

Starts a worker of its own (a subprocess on a queue of its own), sends it a report of 20,000
lines and a 5 MB attachment, prints the summary it returns and the size of the message, and
stops the worker. Needs RabbitMQ and Redis, found by TOAST_AMQP_URL (default
amqp://guest:guest@127.0.0.1:5672//) and TOAST_REDIS_URL (default redis://127.0.0.1:6379/0).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import IO

from celery import Celery
from kombu.serialization import dumps
from pydantic import BaseModel

from pydantic_toast import External
from pydantic_toast.kombu import register_claim_check

BROKER = os.environ.get("TOAST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
REDIS = os.environ.get("TOAST_REDIS_URL", "redis://127.0.0.1:6379/0")
RESULTS = REDIS.partition("?")[0]  # Celery's result backend takes no storage options
STORAGE = REDIS if "?" in REDIS else f"{REDIS}?prefix=celery_example"


class Attachment(BaseModel):
    name: str
    content: str


class Line(BaseModel):
    sku: str
    quantity: int


class Report(BaseModel):
    title: str
    lines: list[Line]
    attachment: External[Attachment]  # always stored apart, and sent as a reference


class Summary(BaseModel):
    title: str
    quantity: int
    attachment: str


# Bodies over 256 KiB are stored in Redis for a day and travel as a reference.
register_claim_check(STORAGE, ttl=24 * 3600)

app = Celery("celery_claim_check", broker=BROKER, backend=RESULTS)
app.conf.update(
    task_serializer="toast",
    result_serializer="toast",
    accept_content=["toast"],
    result_accept_content=["toast"],
    task_acks_late=True,  # a worker that dies mid-task leaves the message for the next one
    task_reject_on_worker_lost=True,
)


@app.task(name="celery_claim_check.summarize")
def summarize(report: Report) -> Summary:
    return Summary(
        title=report.title,
        quantity=sum(line.quantity for line in report.lines),
        attachment=f"{report.attachment.name}, {len(report.attachment.content):,} characters",
    )


def main() -> None:
    queue = f"claim-check-example-{uuid.uuid4().hex[:8]}"
    # A connection of its own for sending, closed on the way out (Celery leaves the socket
    # of its pooled one to the garbage collector, which warns at exit).
    with tempfile.TemporaryFile() as log, app.connection_for_write() as connection:
        worker = start_worker(queue, log)
        try:
            report = Report(
                title="Q3",
                lines=[Line(sku=f"SKU-{n:05}", quantity=n % 7) for n in range(20_000)],
                attachment=Attachment(name="scan.pdf", content="x" * 5_000_000),
            )
            result = summarize.apply_async((report,), queue=queue, connection=connection)
            try:
                summary = result.get(timeout=60)
            except Exception:
                log.seek(0)
                sys.stderr.write(log.read().decode(errors="replace"))
                raise
            print(f"the worker returned a {type(summary).__name__}: {summary}")
            _, _, body = dumps(((report,), {}, {}), serializer="toast")
            inline = len(report.model_dump_json())
            print(f"the message body: {len(body)} bytes, for a report of {inline:,} bytes")
        finally:
            stop_worker(worker)
            connection.default_channel.queue_delete(queue)
    app.close()


def start_worker(queue: str, log: IO[bytes]) -> subprocess.Popen[bytes]:
    here = Path(__file__).resolve().parent
    path = os.pathsep.join(filter(None, [str(here), os.environ.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "celery", "-A", "celery_claim_check", "worker"]
    command += ["-P", "solo", "-Q", queue, "-n", f"{queue}@%h", "-l", "WARNING"]
    # The worker is a program of its own: its warnings (Celery warns when it runs as root) go
    # to its log, whatever this one's PYTHONWARNINGS says.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONWARNINGS"}
    return subprocess.Popen(
        command,
        env={**env, "PYTHONPATH": path},
        stdout=log,
        stderr=log,
        start_new_session=True,
    )


def stop_worker(worker: subprocess.Popen[bytes]) -> None:
    os.killpg(worker.pid, signal.SIGQUIT)
    try:
        worker.wait(timeout=3)
    except subprocess.TimeoutExpired:  # a solo worker can sit in its poll for seconds
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()


if __name__ == "__main__":
    # The worker imports this file as the module celery_claim_check, and a message names its
    # model classes by module: send from that module too, not from __main__.
    import celery_claim_check

    celery_claim_check.main()
