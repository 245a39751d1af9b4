"""The kombu claim check: the serializer at kombu level, then real Celery workers.

Workers are ``celery -A tests.kombu_app worker`` subprocesses (solo and prefork pools) on
queues of their own, with the local RabbitMQ as broker and Redis as result backend and
payload storage (under a key prefix of this module's own).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Queue
from kombu.exceptions import DecodeError, EncodeError
from kombu.serialization import dumps, loads, registry
from pydantic import BaseModel

from pydantic_toast import External, ExternalBaseModel, ExternalConfigDict, Keyring
from pydantic_toast._content import content_id
from pydantic_toast.kombu import PAYLOAD_CLASS, register_claim_check

ROOT = Path(__file__).resolve().parent.parent

# Module-level models: a consumer finds a model's class by module and name.


class Blob(BaseModel):
    text: str


class Envelope(BaseModel):
    sent_at: datetime
    amount: Decimal
    blob: External[Blob]
    tags: list[str]


def big_text(size: int) -> str:
    return os.urandom(size // 2).hex()


def claim(class_name: str, id: object) -> bytes:
    reference = {"class_name": class_name, "id": str(id)}
    return json.dumps(
        {"__type__": "toast.claim", "__value__": reference}, separators=(",", ":")
    ).encode()


class Serializer:
    """A claim check registered under a name of this test's own, unregistered afterwards."""

    def __init__(self, storage: str, namespace: str) -> None:
        self.storage = storage
        self.namespace = namespace
        self.names: list[str] = []

    def register(self, **options: Any) -> str:
        name = f"toast-{self.namespace}-{len(self.names)}"
        register_claim_check(self.storage, name=name, **options)
        self.names.append(name)
        return name

    def close(self) -> None:
        for name in self.names:
            registry.unregister(name)


@pytest.fixture(params=["redis", "postgresql", "sqlite"])
def serializer(request: pytest.FixtureRequest, namespace: str) -> Iterator[Serializer]:
    url: str = request.getfixturevalue(f"{request.param}_url")
    codec = Serializer(url, namespace)
    yield codec
    codec.close()


def send(name: str, value: Any) -> bytes:
    content_type, encoding, body = dumps(value, serializer=name)
    assert content_type == f"application/x-{name}+json" and encoding == "utf-8"
    return body if isinstance(body, bytes) else body.encode()


def receive(name: str, body: bytes) -> Any:
    content_type = f"application/x-{name}+json"
    return loads(body, content_type, "utf-8", accept=[content_type])


# --- the serializer, at kombu level ----------------------------------------------------------


def test_json_values_and_models_round_trip(serializer: Serializer) -> None:
    name = serializer.register()
    envelope = Envelope(
        sent_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        amount=Decimal("12.50"),
        blob=Blob(text="x" * 1000),
        tags=["a", "b"],
    )
    value = {
        "models": [envelope, Blob(text="inline")],
        "id": uuid.UUID(int=7),
        "when": datetime(2026, 5, 6, tzinfo=UTC),
        "price": Decimal("1.10"),
        "raw": b"\x00\xff",
        "nested": {"list": [1, 2.5, None, True]},
    }
    body = send(name, value)
    assert b"x" * 1000 not in body, "the External value travels as a reference"
    assert receive(name, body) == value
    assert isinstance(receive(name, body)["models"][0], Envelope)


def test_threads_send_and_receive_at_once(serializer: Serializer) -> None:
    name = serializer.register(threshold=1000)
    values = [[big_text(5000 + n), Blob(text=str(n))] for n in range(8)]
    with ThreadPoolExecutor(4) as pool:
        bodies = list(pool.map(lambda value: send(name, value), values))
        received = list(pool.map(lambda body: receive(name, body), bodies))
    assert all(len(body) < 200 for body in bodies)
    assert received == values


def test_threshold_boundary(serializer: Serializer) -> None:
    threshold = 2000
    name = serializer.register(threshold=threshold)
    at = ["x" * (threshold - 4)]  # '["' + text + '"]'
    inline = send(name, at)
    assert len(inline) == threshold and inline == json.dumps(at).encode()
    assert receive(name, inline) == at

    over = ["x" * (threshold - 3)]
    claimed = send(name, over)
    assert claimed.startswith(b'{"__type__":"toast.claim"') and len(claimed) < 200
    assert receive(name, claimed) == over


def test_a_stored_body_outlives_its_consumers(serializer: Serializer) -> None:
    name = serializer.register(threshold=100)
    value = [big_text(10_000)]
    body = send(name, value)
    for _ in range(3):  # redelivered, retried, read by several consumers: still there
        assert receive(name, body) == value
    assert send(name, value) == body, "the same body is the same record"


def test_ttl_on_redis_is_the_record_expiry(redis_url: str, namespace: str) -> None:
    codec = Serializer(redis_url, namespace)
    try:
        name = codec.register(threshold=100, ttl=30)
        body = send(name, [big_text(1000)])
    finally:
        codec.close()
    id = json.loads(body)["__value__"]["id"]
    client = redis.Redis.from_url(redis_url.partition("?")[0])
    try:
        remaining = client.pttl(f"{namespace}:{PAYLOAD_CLASS}:{id}")
    finally:
        client.close()
    assert 25_000 < remaining <= 30_000


def test_ttl_elsewhere_hides_expired_bodies_until_sent_again(
    sqlite_url: str, namespace: str
) -> None:
    codec = Serializer(sqlite_url, namespace)
    try:
        name = codec.register(threshold=100, ttl=0.5)
        value = [big_text(1000)]
        body = send(name, value)
        assert receive(name, body) == value
        time.sleep(0.6)
        id = json.loads(body)["__value__"]["id"]
        with pytest.raises(DecodeError, match=f"no {PAYLOAD_CLASS} record with id {id}"):
            receive(name, body)
        assert send(name, value) == body  # sending it again renews it
        assert receive(name, body) == value
    finally:
        codec.close()


def test_forged_references_are_refused(serializer: Serializer) -> None:
    name = serializer.register(threshold=100)
    with pytest.raises(DecodeError, match="is not a content id: this serializer never issued it"):
        receive(name, claim(PAYLOAD_CLASS, uuid.uuid4()))
    with pytest.raises(DecodeError, match=f"reference is for class 'User', not {PAYLOAD_CLASS}"):
        receive(name, claim("User", uuid.uuid4()))
    with pytest.raises(DecodeError, match=f"{PAYLOAD_CLASS}: invalid id 'nope': not a UUID"):
        receive(name, claim(PAYLOAD_CLASS, "nope"))
    unknown = content_id(PAYLOAD_CLASS, b'{"body":["never sent"]}')
    with pytest.raises(DecodeError, match=f"no {PAYLOAD_CLASS} record with id {unknown}"):
        receive(name, claim(PAYLOAD_CLASS, unknown))
    extra = b'{"__type__":"toast.claim","__value__":{"class_name":"KombuBody","id":"x","y":1}}'
    with pytest.raises(DecodeError, match="a reference has only 'class_name' and 'id'"):
        receive(name, extra)
    nested = b"[" + claim(PAYLOAD_CLASS, unknown) + b"]"
    with pytest.raises(DecodeError, match="holds a claim-check reference inside it"):
        receive(name, nested)
    with pytest.raises(EncodeError, match="shaped like a claim-check reference"):
        send(name, json.loads(claim(PAYLOAD_CLASS, unknown)))


def test_a_tampered_stored_body_is_refused(serializer: Serializer) -> None:
    name = serializer.register(threshold=100)
    original = send(name, ["a" * 500])
    other = send(name, ["b" * 500])
    # Put the other body's record under the first one's id.
    from pydantic_toast._bridge import run_sync
    from pydantic_toast._retry import with_backend

    first = uuid.UUID(json.loads(original)["__value__"]["id"])
    second = uuid.UUID(json.loads(other)["__value__"]["id"])

    async def swap() -> None:
        async def move(backend: Any) -> None:
            record = await backend.read_record(PAYLOAD_CLASS, second)
            record.id = first
            await backend.write_record(record)

        await with_backend(serializer.storage, move)

    run_sync(swap())
    with pytest.raises(DecodeError, match=f"record {first} does not hold the content its id"):
        receive(name, original)


def test_oversized_bodies_are_refused_unread(serializer: Serializer) -> None:
    small = serializer.register(threshold=100, max_size=1000)
    with pytest.raises(EncodeError, match=r"the message body is 1004 bytes, more than max_size"):
        send(small, ["x" * 1000])
    with pytest.raises(DecodeError, match=r"1004 bytes, more than max_size=1000: refused unread"):
        receive(small, json.dumps(["x" * 1000]).encode())
    large = serializer.register(threshold=100)
    body = send(large, ["y" * 5000])
    id = json.loads(body)["__value__"]["id"]
    with pytest.raises(DecodeError, match=f"record {id} is corrupt: .* more than max_size=1000"):
        receive(small, body)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"\xff\xfe\x00garbage", "the message body is not JSON: "),
        (b"{not json", "the message body is not JSON: Expecting property name"),
        (b'{"__type__":"toast.claim","__value__":', "malformed claim-check reference"),
        (b'[{"__type__":"toast.model","__value__":[]}]', "malformed model in the message"),
        (
            b'[{"__type__":"toast.model","__value__":{"class":"os:system","json":"{}"}}]',
            "'os:system' in the message is not a Pydantic model class",
        ),
        (
            b'[{"__type__":"toast.model","__value__":{"class":"never.imported:M","json":"{}"}}]',
            "this process has not imported never.imported",
        ),
        (
            b'[{"__type__":"toast.model","__value__":{"class":"a:f.<locals>.M","json":"{}"}}]',
            "invalid model class 'a:f.<locals>.M'",
        ),
        (
            b'[{"__type__":"toast.model","__value__":'
            b'{"class":"tests.test_kombu:Blob","json":"{\\"text\\":1}"}}]',
            "the Blob in the message does not validate",
        ),
    ],
)
def test_bad_bodies_are_refused(serializer: Serializer, body: bytes, problem: str) -> None:
    name = serializer.register()
    with pytest.raises(DecodeError) as caught:
        receive(name, body)
    assert problem in str(caught.value)


def test_a_model_must_be_findable_by_its_name(serializer: Serializer) -> None:
    name = serializer.register()

    class Local(BaseModel):
        x: int

    with pytest.raises(EncodeError, match="must be defined at module level"):
        send(name, [Local(x=1)])


def test_an_encrypted_model_is_refused_rather_than_sent_in_the_clear(
    serializer: Serializer,
) -> None:
    name = serializer.register()

    class Patient(ExternalBaseModel):
        model_config = ExternalConfigDict(
            storage=serializer.storage,
            encrypt=True,
            keyring=Keyring({"k1": bytes(range(32))}, primary="k1"),
        )
        diagnosis: str

    with pytest.raises(EncodeError, match="Patient is encrypted at rest") as caught:
        send(name, {"patient": Patient(diagnosis="secret")})
    assert "secret" not in str(caught.value)
    assert "send the reference Patient.save_external() returns" in str(caught.value)


def test_registration_is_checked(namespace: str) -> None:
    from pydantic_toast import StorageValidationError

    with pytest.raises(StorageValidationError, match="unknown storage scheme 'nope'"):
        register_claim_check("nope://x")
    with pytest.raises(StorageValidationError, match="invalid serializer name 'a b'"):
        register_claim_check("memory://x", name="a b")
    with pytest.raises(StorageValidationError, match="threshold must be a byte count, not -1"):
        register_claim_check("memory://x", threshold=-1)
    with pytest.raises(StorageValidationError, match="ttl must be a positive duration, not"):
        register_claim_check("memory://x", ttl=0)
    with pytest.raises(StorageValidationError) as caught:
        register_claim_check("memory://x", ttl=float("nan"))
    assert str(caught.value) == "register_claim_check: ttl must be a positive duration, not nan"


def test_without_kombu_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in [name for name in sys.modules if name.partition(".")[0] == "kombu"]:
        monkeypatch.setitem(sys.modules, module, None)  # an import of it fails, as if absent
    monkeypatch.delitem(sys.modules, "pydantic_toast.kombu")
    with pytest.raises(ImportError, match=r"pip install 'pydantic-toast\[celery\]'"):
        importlib.import_module("pydantic_toast.kombu")


def test_every_consumer_of_a_fanout_reads_the_body(
    rabbitmq_url: str, redis_url: str, namespace: str
) -> None:
    codec = Serializer(redis_url, namespace)
    name = codec.register(threshold=1000)
    value = {"report": big_text(100_000)}
    exchange = Exchange(f"{namespace}-fanout", type="fanout", auto_delete=True)
    queues = [Queue(f"{namespace}-{n}", exchange, auto_delete=True) for n in range(2)]
    try:
        with Connection(rabbitmq_url) as connection:
            channel = connection.default_channel
            bound = [queue(channel) for queue in queues]
            for queue in bound:
                queue.declare()
            connection.Producer().publish(value, exchange=exchange, serializer=name)
            for queue in bound:
                message = None
                for _ in range(50):
                    message = queue.get(accept=[f"application/x-{name}+json"])
                    if message is not None:
                        break
                    time.sleep(0.1)
                assert message is not None
                assert len(message.body) < 200
                assert message.decode() == value
                message.ack()
            for queue in bound:
                queue.delete()
    finally:
        codec.close()


# --- real Celery workers ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tasks(rabbitmq_url: str, redis_server: str) -> Iterator[ModuleType]:
    """tests.kombu_app, imported with payload storage of this module's own."""
    prefix = f"t{uuid.uuid4().hex[:16]}"
    env = {
        "TOAST_KOMBU_STORAGE": f"{redis_server}?prefix={prefix}",
        "TOAST_KOMBU_BROKER": rabbitmq_url,
        "TOAST_KOMBU_BACKEND": redis_server,
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    sys.modules.pop("tests.kombu_app", None)
    module = importlib.import_module("tests.kombu_app")
    module.app.amqp.argsrepr_maxsize = 200  # see docs/how-to/celery.md
    try:
        yield module
    finally:
        module.app.close()
        registry.unregister("toast")
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        client = redis.Redis.from_url(redis_server)
        try:
            keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
            if keys:
                client.delete(*keys)
        finally:
            client.close()


class Worker:
    """``celery worker`` in a process group of its own, on a queue of its own."""

    def __init__(self, tasks: ModuleType, pool: str, log: Path) -> None:
        self.tasks = tasks
        self.pool = pool
        self.queue = f"toast-{pool}-{uuid.uuid4().hex[:12]}"
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "TOAST_KOMBU_WARM": "1",
        }
        command = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tests.kombu_app",
            "worker",
            "-P",
            self.pool,
            "-c",
            "2",
            "-Q",
            self.queue,
            "-n",
            f"{self.queue}@%h",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-l",
            "WARNING",
        ]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=log, stderr=log, start_new_session=True
            )
        try:
            assert self.tasks.ping.apply_async(queue=self.queue).get(timeout=60) == "pong"
        except BaseException:
            self.stop()
            raise

    def signal(self, signum: int) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signum)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGQUIT)  # a cold shutdown: nothing to finish
        try:
            # A solo worker idles up to 10 s in its poll before it sees the shutdown.
            process.wait(timeout=3)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)

    def delete_queue(self) -> None:
        with self.tasks.app.connection_for_write() as connection:
            connection.default_channel.queue_delete(self.queue)


@pytest.fixture(scope="module", params=["solo", "prefork"])
def worker(
    request: pytest.FixtureRequest, tasks: ModuleType, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Worker]:
    log = tmp_path_factory.mktemp("celery") / "worker.log"
    worker = Worker(tasks, request.param, log)
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()
        worker.delete_queue()


def digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


FIVE_MB = 5 * 1024 * 1024


def raw_message(tasks: ModuleType, queue: str) -> Any:
    """The next message of ``queue`` as it is on the broker, undecoded."""
    with tasks.app.connection_for_read() as connection:
        bound = Queue(queue, Exchange(queue), routing_key=queue)(connection.default_channel)
        for _ in range(50):
            message = bound.get(no_ack=True)
            if message is not None:
                return message
            time.sleep(0.1)
    raise AssertionError(f"no message arrived on {queue}")


def test_a_5mb_argument_travels_as_a_message_under_1kb(tasks: ModuleType) -> None:
    queue = f"toast-idle-{uuid.uuid4().hex[:12]}"
    value = big_text(FIVE_MB)
    try:
        tasks.measure.apply_async((value,), queue=queue)
        message = raw_message(tasks, queue)
        headers = len(json.dumps(message.headers, default=str))
        assert message.content_type == "application/x-toast+json"
        assert len(message.body) + headers < 1024, (len(message.body), headers)
        args, kwargs, _ = message.decode()
        assert (args, kwargs) == ([value], {})

        tasks.measure.apply_async((value,), queue=queue, serializer="json")
        plain = raw_message(tasks, queue)
        assert len(plain.body) > FIVE_MB
    finally:
        with tasks.app.connection_for_write() as connection:
            connection.default_channel.queue_delete(queue)


def test_the_task_sees_the_full_value(worker: Worker) -> None:
    value = big_text(FIVE_MB)
    result = worker.tasks.measure.apply_async((value,), queue=worker.queue).get(timeout=30)
    assert result == {"length": FIVE_MB, "sha256": digest(value)}


def test_a_large_result_comes_back(worker: Worker) -> None:
    value = big_text(1024 * 1024)
    result = worker.tasks.measure.apply_async((value,), queue=worker.queue)
    assert result.get(timeout=30) == {"length": len(value), "sha256": digest(value)}
    echoed = worker.tasks.echo.apply_async((value,), queue=worker.queue)
    assert echoed.get(timeout=30) == value


def test_a_retried_task_sees_the_value_again(worker: Worker) -> None:
    value = big_text(FIVE_MB)
    result = worker.tasks.flaky.apply_async((value,), queue=worker.queue).get(timeout=30)
    assert result == [digest(value), digest(value)]


def test_a_model_argument_round_trips_as_the_model(worker: Worker) -> None:
    tasks = worker.tasks
    lines = [tasks.Line(sku=f"sku-{n}", quantity=n) for n in range(100)]
    report = tasks.Report(title="q3", lines=lines, attachment=tasks.Blob(text="z" * 300_000))
    summary = tasks.summarize.apply_async((report,), queue=worker.queue).get(timeout=30)
    assert summary == tasks.Summary(
        title="Q3", quantity=sum(range(100)), attachment_size=300_000, lines=lines
    )


def test_a_worker_killed_mid_task_finds_the_payload_after_restart(
    tasks: ModuleType, tmp_path: Path
) -> None:
    worker = Worker(tasks, "prefork", tmp_path / "worker.log")
    worker.start()
    try:
        value = big_text(FIVE_MB)
        marker = tmp_path / "started"
        result = tasks.slow.apply_async((value, str(marker)), queue=worker.queue)
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert time.monotonic() < deadline, "the task never started"
            time.sleep(0.05)
        assert marker.read_text() == digest(value)
        worker.signal(signal.SIGKILL)  # the message is not acknowledged: RabbitMQ requeues it
        assert worker.process is not None
        worker.process.wait(timeout=15)
        worker.start()
        assert result.get(timeout=30) == digest(value)
    finally:
        worker.stop()
        worker.delete_queue()
