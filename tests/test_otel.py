"""OpenTelemetry: the spans and metrics of every storage operation, read back through the SDK's
in-memory span exporter and metric reader; and nothing at all without OpenTelemetry or with
the API alone (in subprocesses, whose global providers are their own)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from pydantic import BaseModel

from pydantic_toast import (
    External,
    ExternalBaseModel,
    ExternalConfigDict,
    RecordNotFoundError,
    StorageConnectionError,
    StorageValidationError,
    _telemetry,
    aclose,
    dump,
    validate,
)
from pydantic_toast._telemetry import describe_storage
from tests.faultproxy import FaultProxy

ROOT = Path(__file__).resolve().parent.parent
SECRET = "s3cret-Pa55word"


class Telemetry:
    """The in-memory exporter and reader behind this process's global providers."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def only(self, name: str) -> ReadableSpan:
        found = [span for span in self.spans() if span.name == name]
        assert len(found) == 1, [span.name for span in self.spans()]
        return found[0]

    def points(self, metric: str) -> dict[tuple[tuple[str, Any], ...], Any]:
        """The data points of ``metric`` by their (sorted) attributes."""
        data = self.reader.get_metrics_data()
        points: dict[tuple[tuple[str, Any], ...], Any] = {}
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for item in scope.metrics:
                    if item.name == metric:
                        for point in item.data.data_points:
                            points[tuple(sorted(point.attributes.items()))] = point
        return points


@pytest.fixture(scope="module")
def installed() -> Iterator[Telemetry]:
    telemetry = Telemetry()
    trace.set_tracer_provider(telemetry.tracer_provider)
    metrics.set_meter_provider(telemetry.meter_provider)
    if trace.get_tracer_provider() is not telemetry.tracer_provider:
        pytest.fail("another test set a global tracer provider before this module")
    yield telemetry
    telemetry.tracer_provider.shutdown()
    telemetry.meter_provider.shutdown()
    # The global providers stay set (the API allows no undo); the rest of the session runs as
    # without OpenTelemetry instead, rather than into shut-down providers.
    _telemetry._recorder = None
    _telemetry._unavailable = True


@pytest.fixture
def otel(installed: Telemetry) -> Telemetry:
    installed.exporter.clear()
    installed.reader.get_metrics_data()  # cumulative: tests compare against a baseline
    return installed


def define(storage: str, retries: int = 0) -> Any:
    class Account(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=storage, retries=retries, retry_backoff=0.01)
        name: str

    return Account


def all_text(span: ReadableSpan) -> str:
    """Everything a span carries, as text: attributes, events and status."""
    events = [(event.name, dict(event.attributes or {})) for event in span.events]
    return repr((span.name, dict(span.attributes or {}), events, span.status.description))


async def test_every_operation_is_a_span_with_its_attributes(
    otel: Telemetry, sqlite_url: str
) -> None:
    Account = define(sqlite_url)
    account = Account(name="ada")
    size = len(account.model_dump_json())
    reference = await account.save_external()
    assert await Account.load_external(reference) == account
    others = [Account(name="bob"), Account(name="cy")]
    refs = await Account.save_external_many(others)
    assert await Account.load_external_many([reference, *refs]) == [account, *others]
    assert await Account.exists_external(reference)
    assert await Account.delete_external_many(refs) == 2
    assert await account.delete_external()

    names = [span.name for span in otel.spans()]
    assert names == [
        "pydantic_toast.save",
        "pydantic_toast.load",
        "pydantic_toast.save_many",
        "pydantic_toast.load_many",
        "pydantic_toast.exists",
        "pydantic_toast.delete_many",
        "pydantic_toast.delete",
    ]
    common = {"db.system.name": "sqlite", "pydantic_toast.class_name": "Account"}
    for span in otel.spans():
        assert span.kind is SpanKind.CLIENT
        assert span.status.status_code is StatusCode.UNSET
        assert span.parent is None
        assert span.attributes is not None
        assert common.items() <= span.attributes.items()
        assert span.attributes["pydantic_toast.retries"] == 0
    assert dict(otel.only("pydantic_toast.save").attributes or {}) == {
        **common,
        "pydantic_toast.batch_size": 1,
        "pydantic_toast.bytes": size,
        "pydantic_toast.retries": 0,
    }
    load = otel.only("pydantic_toast.load").attributes or {}
    assert (load["pydantic_toast.bytes"], load["pydantic_toast.batch_size"]) == (size, 1)
    many = otel.only("pydantic_toast.load_many").attributes or {}
    sizes = size + sum(len(other.model_dump_json()) for other in others)
    assert (many["pydantic_toast.bytes"], many["pydantic_toast.batch_size"]) == (sizes, 3)
    saved = otel.only("pydantic_toast.save_many").attributes or {}
    assert (saved["pydantic_toast.bytes"], saved["pydantic_toast.batch_size"]) == (sizes - size, 2)
    assert (otel.only("pydantic_toast.delete_many").attributes or {})[
        "pydantic_toast.batch_size"
    ] == 2


async def test_metrics_by_operation_and_backend(otel: Telemetry, sqlite_url: str) -> None:
    Account = define(sqlite_url)
    before = otel.points("pydantic_toast.operation.duration")
    account = Account(name="x" * 500)
    reference = await account.save_external()
    for _ in range(3):
        await Account.load_external(reference)

    durations = otel.points("pydantic_toast.operation.duration")
    key = (("db.system.name", "sqlite"), ("pydantic_toast.operation", "load"))
    earlier = before[key].count if key in before else 0
    assert durations[key].count - earlier == 3
    assert 0 < durations[key].sum < 10  # seconds, not milliseconds
    sizes = otel.points("pydantic_toast.record.size")
    save_key = (("db.system.name", "sqlite"), ("pydantic_toast.operation", "save"))
    assert sizes[save_key].max == len(account.model_dump_json())


async def test_a_failed_operation_is_an_error_span_with_its_exception(
    otel: Telemetry, sqlite_url: str
) -> None:
    Account = define(sqlite_url)
    missing = "9b2f8a5e-54b4-4c5c-9d5f-6f1b2d3c4e5f"
    with pytest.raises(RecordNotFoundError) as raised:
        await Account.load_external({"class_name": "Account", "id": missing})
    with pytest.raises(StorageValidationError, match="reference is for class 'Other', not Account"):
        await Account.load_external({"class_name": "Other", "id": missing})

    not_found, invalid = otel.spans()
    assert not_found.status.status_code is StatusCode.ERROR
    assert not_found.status.description == f"RecordNotFoundError: {raised.value}"
    assert (not_found.attributes or {})["error.type"] == "RecordNotFoundError"
    (event,) = not_found.events
    assert event.name == "exception"
    attributes = event.attributes or {}
    assert attributes["exception.type"].endswith("RecordNotFoundError")
    assert attributes["exception.message"] == f"no Account record with id {missing} in {sqlite_url}"
    assert (invalid.attributes or {})["error.type"] == "StorageValidationError"
    errors = otel.points("pydantic_toast.operation.duration")
    key = (
        ("db.system.name", "sqlite"),
        ("error.type", "RecordNotFoundError"),
        ("pydantic_toast.operation", "load"),
    )
    assert errors[key].count >= 1


async def test_no_password_in_any_span_or_metric(
    otel: Telemetry, redis_server: str, namespace: str
) -> None:
    # Redis's default user has no password: AUTH with a user name accepts any.
    host_port = redis_server.removeprefix("redis://").partition("/")[0]
    host, _, port = host_port.partition(":")
    Account = define(f"redis://default:{SECRET}@{host_port}/0?prefix={namespace}")
    reference = await Account(name="ada").save_external()
    await Account.load_external(reference)
    Down = define(f"redis://default:{SECRET}@127.0.0.1:1/0?prefix={namespace}")
    with pytest.raises(StorageConnectionError) as raised:
        await Down(name="bob").save_external()
    assert SECRET not in str(raised.value)

    save, load, failed = otel.spans()
    assert (save.attributes or {}).items() >= {
        "db.system.name": "redis",
        "server.address": host,
        "server.port": int(port),
    }.items()
    assert (failed.attributes or {})["server.port"] == 1
    assert failed.status.status_code is StatusCode.ERROR
    assert [event.name for event in failed.events] == ["exception"]
    for span in (save, load, failed):
        assert SECRET not in all_text(span), all_text(span)
    assert SECRET not in repr(otel.reader.get_metrics_data())
    await aclose()


async def test_a_retry_is_counted_on_the_span_and_the_counter(
    otel: Telemetry, redis_server: str, namespace: str
) -> None:
    host, _, port = redis_server.removeprefix("redis://").partition("/")[0].partition(":")
    with FaultProxy(host, int(port)) as proxy:
        Account = define(f"redis://127.0.0.1:{proxy.port}/0?prefix={namespace}", retries=2)
        before = otel.points("pydantic_toast.retries")
        proxy.reset_next(1)  # the first connection: the first attempt fails, transiently
        await Account(name="ada").save_external()
        assert proxy.accepted >= 2
        await aclose()

    span = otel.only("pydantic_toast.save")
    assert span.status.status_code is StatusCode.UNSET
    retries = (span.attributes or {})["pydantic_toast.retries"]
    assert retries >= 1
    key = (("db.system.name", "redis"), ("pydantic_toast.operation", "save"))
    earlier = before[key].value if key in before else 0
    assert otel.points("pydantic_toast.retries")[key].value - earlier == retries


class TracedLine(BaseModel):
    sku: str


class TracedOrder(BaseModel):
    lines: list[External[TracedLine]]


async def test_external_dump_and_validate_are_spans_around_their_batches(
    otel: Telemetry, memory_url: str
) -> None:
    order = TracedOrder(lines=[TracedLine(sku="a"), TracedLine(sku="b"), TracedLine(sku="c")])
    dumped = await dump(order, storage=memory_url)
    assert await validate(TracedOrder, dumped, storage=memory_url) == order

    dump_span = otel.only("pydantic_toast.dump")
    write = otel.only("pydantic_toast.save_many")
    validate_span = otel.only("pydantic_toast.validate")
    read = otel.only("pydantic_toast.load_many")
    assert write.parent is not None and write.parent.span_id == dump_span.context.span_id
    assert read.parent is not None and read.parent.span_id == validate_span.context.span_id
    line_bytes = sum(len(line.model_dump_json()) for line in order.lines)
    for span, class_name in (
        (dump_span, "TracedOrder"),
        (write, "TracedLine"),
        (read, "TracedLine"),
    ):
        assert dict(span.attributes or {}) == {
            "db.system.name": "memory",
            "pydantic_toast.class_name": class_name,
            "pydantic_toast.batch_size": 3,
            "pydantic_toast.bytes": line_bytes,
            "pydantic_toast.retries": 0,
        }
    assert (validate_span.attributes or {})["pydantic_toast.bytes"] == line_bytes


def test_the_plain_path_makes_a_span_per_value_under_the_callers_span(
    otel: Telemetry, memory_url: str
) -> None:
    order = TracedOrder(lines=[TracedLine(sku="a"), TracedLine(sku="b")])
    with trace.get_tracer("test").start_as_current_span("handler") as handler:
        dumped = order.model_dump(context={"storage": memory_url})
        assert TracedOrder.model_validate(dumped, context={"storage": memory_url}) == order

    spans = [span for span in otel.spans() if span.name != "handler"]
    assert [span.name for span in spans] == ["pydantic_toast.save"] * 2 + [
        "pydantic_toast.load"
    ] * 2
    for span, line in zip(spans, order.lines * 2, strict=True):
        assert span.parent is not None and span.parent.span_id == handler.get_span_context().span_id
        assert (span.attributes or {})["pydantic_toast.bytes"] == len(line.model_dump_json())
        assert (span.attributes or {})["pydantic_toast.class_name"] == "TracedLine"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            f"postgresql://app:{SECRET}@db1.internal:5433,db2.internal/app",
            {"db.system.name": "postgresql", "server.address": "db1.internal", "server.port": 5433},
        ),
        (
            f"postgres://u:{SECRET}/with@slash@[::1]/db",
            {"db.system.name": "postgresql", "server.address": "::1", "server.port": 5432},
        ),
        (
            f"rediss+cluster://:{SECRET}@cache:7000,cache2:7000",
            {"db.system.name": "redis", "server.address": "cache", "server.port": 7000},
        ),
        (
            "s3://bucket/prefix?endpoint_url=http://localhost:9000&region=eu-west-1",
            {
                "db.system.name": "aws.s3",
                "aws.s3.bucket": "bucket",
                "server.address": "localhost",
                "server.port": 9000,
            },
        ),
        ("s3://bucket", {"db.system.name": "aws.s3", "aws.s3.bucket": "bucket"}),
        ("sqlite:///var/models.db", {"db.system.name": "sqlite"}),
        ("redis+unix:///run/redis.sock", {"db.system.name": "redis"}),
        (
            "kv://store.example:99/x",
            {"db.system.name": "kv", "server.address": "store.example", "server.port": 99},
        ),
    ],
)
def test_storage_urls_are_described_without_their_password(
    url: str, expected: dict[str, object]
) -> None:
    assert describe_storage(url) == expected


def run_python(*parts: str) -> dict[str, Any]:
    """Run the parts of a program (each dedented) in a fresh interpreter; its last line of
    output is a JSON report."""
    result = subprocess.run(
        [sys.executable, "-c", "\n".join(textwrap.dedent(part) for part in parts)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "error", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    reported: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return reported


BLOCK_OPENTELEMETRY = """
    import sys

    class Blocked:
        def find_spec(self, name, path=None, target=None):
            if name == "opentelemetry" or name.startswith("opentelemetry."):
                raise ImportError(f"No module named {name!r} (blocked)")

    sys.meta_path.insert(0, Blocked())
"""

ROUND_TRIP = """
    import asyncio, json, sys, tempfile
    from pydantic_toast import ExternalBaseModel, ExternalConfigDict, _telemetry

    class Account(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=f"sqlite:///{tempfile.mkdtemp()}/m.db")
        name: str

    async def round_trip():
        reference = await Account(name="ada").save_external()
        return (await Account.load_external(reference)).name
"""


def test_without_opentelemetry_nothing_is_imported_and_nothing_breaks() -> None:
    reported = run_python(
        BLOCK_OPENTELEMETRY,
        ROUND_TRIP,
        """
        names = [asyncio.run(round_trip()) for _ in range(2)]
        loaded = sorted(name for name in sys.modules if name.startswith("opentelemetry"))
        unavailable = _telemetry._unavailable
        print(json.dumps({"names": names, "loaded": loaded, "unavailable": unavailable}))
        """,
    )
    assert reported == {"names": ["ada", "ada"], "loaded": [], "unavailable": True}


def test_api_without_sdk_records_nothing_until_an_sdk_is_configured() -> None:
    reported = run_python(
        ROUND_TRIP,
        """
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        before = asyncio.run(round_trip())
        silent = _telemetry._recorder is None and _telemetry._trace_api is not None
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        after = asyncio.run(round_trip())
        spans = [span.name for span in exporter.get_finished_spans()]
        print(json.dumps({"names": [before, after], "silent": silent, "spans": spans}))
        """,
    )
    assert reported == {
        "names": ["ada", "ada"],
        "silent": True,
        "spans": ["pydantic_toast.save", "pydantic_toast.load"],
    }


TINY_RUN = ("--rounds", "1", "--blocks", "1", "--block-size", "3", "--backend", "sqlite")


def test_the_overhead_benchmark_runs() -> None:
    """``python -m benchmarks.otel`` (its figures are in the guide) runs, in a tiny form."""
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.otel", *TINY_RUN],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    lines = [line.split() for line in result.stdout.splitlines()]
    # "  api    94 ns": what `_telemetry.start` costs when it returns None, per mode.
    start_costs = {line[0]: float(line[1]) for line in lines if line[-1:] == ["ns"]}
    assert start_costs.keys() == {"api", "blocked"}, result.stdout
    assert all(0 < cost < 10_000 for cost in start_costs.values()), result.stdout
    # "sqlite save   29.1 x 1.000   29.5 x 1.011   87.4 x 2.998": µs and ratio per mode.
    table = {" ".join(line[:2]): line[2:] for line in lines if line[:1] == ["sqlite"]}
    assert table.keys() == {"sqlite save", "sqlite load"}, result.stdout
    for cells in table.values():
        times = [float(cell) for cell in cells[::2]]
        assert len(times) == 3 and all(time > 0 for time in times), result.stdout


def test_claim_check_bodies_are_saved_and_loaded_in_spans(otel: Telemetry, memory_url: str) -> None:
    from kombu.serialization import dumps, loads, registry

    from pydantic_toast.kombu import PAYLOAD_CLASS, register_claim_check

    content_type = register_claim_check(memory_url, threshold=16, name="toast-otel-spans")
    try:
        value = {"text": "x" * 100}
        _, encoding, body = dumps(value, serializer="toast-otel-spans")
        assert loads(body, content_type, encoding, accept=[content_type]) == value
    finally:
        registry.unregister("toast-otel-spans")
    saved, loaded = otel.only("pydantic_toast.save"), otel.only("pydantic_toast.load")
    for span in (saved, loaded):
        attributes = dict(span.attributes or {})
        assert attributes["pydantic_toast.class_name"] == PAYLOAD_CLASS
        assert attributes["pydantic_toast.bytes"] > 100
