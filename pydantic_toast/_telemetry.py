"""OpenTelemetry spans and metrics of the storage operations, free when nobody listens.

The code that owns an operation (`_operations` for the model methods, `_external` for the
batched `External` dump and validate and their per-backend batches) asks `start` for an
`Operation`, hands it to `with_backend` (which counts the retries on it) and ends it with the
records it moved, or with the exception that ended it. `start` returns ``None`` unless
OpenTelemetry is installed *and* a real tracer or meter provider is configured, and the
callers then do nothing else: no span object, no context switch, no clock read.

Finding out whether a provider is configured is the part that must be cheap: single loads
take 20 to 100 microseconds. The API's ``get_tracer_provider()`` reads ``os.environ`` on every
call while none is set (a microsecond or more), and on some machines even a clock read costs
0.2 microseconds. So the public getters are asked only at a first look (which also loads a
provider named by ``OTEL_PYTHON_TRACER_PROVIDER``), and then, as long as nothing records,
`start` compares the API's two module globals that hold the configured providers with what
they held at that look: two attribute reads. When either changes (an SDK configured later, at
any time), the next operation looks again and finds it; once a real provider is found the
answer is kept, since the API lets a process set its global provider only once. Without
OpenTelemetry the import is tried once. Should a future API keep its providers elsewhere,
operations go through the API's own no-op objects instead: correct, not free.

Nothing here imports OpenTelemetry at module level: the core install has no such dependency
(extra ``[otel]``, which is ``opentelemetry-api`` alone; the application brings the SDK).
Span and metric attributes never hold a password: a storage URL is described from its masked
form, and the library's exceptions mask URLs in their messages already.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from pydantic_toast._errors import mask_url

if TYPE_CHECKING:
    from opentelemetry.metrics import Counter, Histogram
    from opentelemetry.trace import Span

    from pydantic_toast.backends.records import Record

__all__ = ["Operation", "start"]

# The operations, as span names say them: ``pydantic_toast.<operation>``.
SAVE = "save"
LOAD = "load"
SAVE_MANY = "save_many"
LOAD_MANY = "load_many"
DELETE = "delete"
DELETE_MANY = "delete_many"
EXISTS = "exists"
PURGE = "purge"
DUMP = "dump"
VALIDATE = "validate"
# Operations made of others (a dump's batches): their records are measured there, once.
_COMPOSITE = frozenset({DUMP, VALIDATE})

# Provider classes of the API that record nothing: the proxies handed out before an SDK is
# set, and the explicit no-ops. By name: the metrics proxy is private to the API.
_SILENT_PROVIDERS = frozenset(
    {"ProxyTracerProvider", "NoOpTracerProvider", "_ProxyMeterProvider", "NoOpMeterProvider"}
)

# `db.system.name` of the built-in schemes (OpenTelemetry's names); other schemes stand for
# themselves. A ``+`` variant (``redis+cluster``) is its base engine.
_SYSTEMS = {
    "postgresql": "postgresql",
    "postgres": "postgresql",
    "redis": "redis",
    "rediss": "redis",
    "s3": "aws.s3",
    "sqlite": "sqlite",
}
_DEFAULT_PORTS = {"postgresql": 5432, "redis": 6379}
# Schemes whose URL names a path or a namespace, not a server.
_NO_SERVER = frozenset({"sqlite", "file", "memory", "redis+unix"})

# Single operations take from 0.1 ms (SQLite) to seconds (a large S3 batch).
_DURATION_BUCKETS = tuple(base * 10.0**exp for exp in range(-4, 1) for base in (1, 2.5, 5))
_SIZE_BUCKETS = tuple(float(4**n * 64) for n in range(12))  # 64 B to 268 MB

_recorder: _Recorder | None = None
_unavailable = False  # OpenTelemetry cannot be imported: never look again
# After a look that found nothing recording: the API modules holding the global providers
# (``opentelemetry.trace`` and the metrics internals) and the values they held then. Four
# globals rather than tuples: `start` reads them on every operation.
_trace_api: ModuleType | None = None
_metrics_api: ModuleType | None = None
_seen_tracer_provider: object = None
_seen_meter_provider: object = None


def start(
    operation: str, storage: object, class_name: str | None = None, batch_size: int = 1
) -> Operation | None:
    """A started span (current until it ends) for ``operation`` on ``storage`` (a URL or a
    backend), or ``None`` when nothing would record it."""
    recorder = _recorder
    if recorder is None:
        if _unavailable:
            return None
        trace_api, metrics_api = _trace_api, _metrics_api
        if (
            trace_api is not None
            and metrics_api is not None
            and trace_api._TRACER_PROVIDER is _seen_tracer_provider
            and metrics_api._METER_PROVIDER is _seen_meter_provider
        ):
            return None
        recorder = _look()
        if recorder is None:
            return None
    return Operation(recorder, operation, storage, class_name, batch_size)


def _look() -> _Recorder | None:
    global _recorder, _unavailable, _trace_api, _metrics_api
    global _seen_tracer_provider, _seen_meter_provider
    try:
        from opentelemetry import metrics, trace
        from opentelemetry.metrics import _internal as metrics_globals
    except ImportError:
        _unavailable = True
        return None
    # The globals first: a provider set while the getters run shows up as a change next time.
    seen = (
        getattr(trace, "_TRACER_PROVIDER", _MISSING),
        getattr(metrics_globals, "_METER_PROVIDER", _MISSING),
    )
    providers = (trace.get_tracer_provider(), metrics.get_meter_provider())
    if _MISSING not in seen and all(
        type(provider).__name__ in _SILENT_PROVIDERS for provider in providers
    ):
        _seen_tracer_provider, _seen_meter_provider = seen
        _trace_api, _metrics_api = trace, metrics_globals
        return None
    _recorder = _Recorder()
    return _recorder


_MISSING = object()


class _Recorder:
    """The tracer and instruments, made once a provider is configured. They come from the
    API's globals, so a provider of the other kind set later still takes effect."""

    def __init__(self) -> None:
        from opentelemetry import context, metrics, trace

        self.tracer = trace.get_tracer("pydantic_toast")
        meter = metrics.get_meter("pydantic_toast")
        self.duration: Histogram = meter.create_histogram(
            "pydantic_toast.operation.duration",
            unit="s",
            description="Duration of pydantic-toast storage operations.",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )
        self.size: Histogram = meter.create_histogram(
            "pydantic_toast.record.size",
            unit="By",
            description="Size of the records written and read (their JSON, before compression).",
            explicit_bucket_boundaries_advisory=_SIZE_BUCKETS,
        )
        self.retries: Counter = meter.create_counter(
            "pydantic_toast.retries",
            unit="{retry}",
            description="Attempts repeated after a transient failure.",
        )
        self.client = trace.SpanKind.CLIENT
        self.set_span_in_context = trace.set_span_in_context
        self.attach, self.detach = context.attach, context.detach
        self.status, self.error = trace.Status, trace.StatusCode.ERROR
        # The attributes of each storage seen; URLs come from model classes and contexts,
        # so few, but a bound keeps an unusual program from growing this without end.
        self.described: dict[str, dict[str, str | int]] = {}

    def describe(self, storage: object) -> dict[str, str | int]:
        url = storage if isinstance(storage, str) else getattr(storage, "url", None)
        if not isinstance(url, str):
            return {}
        attributes = self.described.get(url)
        if attributes is None:
            if len(self.described) >= 256:
                self.described.clear()
            attributes = self.described[url] = describe_storage(url)
        return attributes


class Operation:
    """One operation's span and measurements; `end` or `fail` finishes it, exactly once.

    Also a context manager (``with start(...) or NOTHING as op``) for the callers off the hot
    path: it ends with ``records`` as set by then, or fails with what was raised.
    """

    __slots__ = (
        "_measures_records",
        "_metric_attributes",
        "_recorder",
        "_span",
        "_started",
        "_token",
        "records",
        "retries",
    )

    def __init__(
        self,
        recorder: _Recorder,
        operation: str,
        storage: object,
        class_name: str | None,
        batch_size: int,
    ) -> None:
        self._recorder = recorder
        self._measures_records = operation not in _COMPOSITE
        attributes: dict[str, Any] = dict(recorder.describe(storage))
        self._metric_attributes: dict[str, str] = {"pydantic_toast.operation": operation}
        if "db.system.name" in attributes:
            self._metric_attributes["db.system.name"] = attributes["db.system.name"]
        if class_name:
            attributes["pydantic_toast.class_name"] = class_name
        attributes["pydantic_toast.batch_size"] = batch_size
        self._span: Span = recorder.tracer.start_span(
            f"pydantic_toast.{operation}", kind=recorder.client, attributes=attributes
        )
        self._token = recorder.attach(recorder.set_span_in_context(self._span))
        self.records: Iterable[Record | None] = ()
        self.retries = 0
        self._started = time.perf_counter()

    def retried(self) -> None:
        """One more attempt after a transient failure."""
        self.retries += 1
        self._recorder.retries.add(1, self._metric_attributes)

    def set_batch_size(self, batch_size: int) -> None:
        self._span.set_attribute("pydantic_toast.batch_size", batch_size)

    def end(self, records: Iterable[Record | None] = ()) -> None:
        """Finish successfully, having written or read ``records`` (``None`` for a miss)."""
        sizes = [len(record.data) for record in records if record is not None]
        self._span.set_attribute("pydantic_toast.bytes", sum(sizes))
        if self._measures_records:
            for size in sizes:
                self._recorder.size.record(size, self._metric_attributes)
        self._finish(self._metric_attributes)

    def fail(self, exc: BaseException) -> None:
        """Finish with an error status and ``exc`` recorded as the span's exception event."""
        error_type = type(exc).__qualname__
        span = self._span
        span.record_exception(exc, escaped=True)
        span.set_status(self._recorder.status(self._recorder.error, f"{error_type}: {exc}"))
        span.set_attribute("error.type", error_type)
        self._finish({**self._metric_attributes, "error.type": error_type})

    def _finish(self, metric_attributes: dict[str, str]) -> None:
        recorder = self._recorder
        recorder.duration.record(time.perf_counter() - self._started, metric_attributes)
        self._span.set_attribute("pydantic_toast.retries", self.retries)
        recorder.detach(self._token)
        self._span.end()

    def __enter__(self) -> Operation:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.end(self.records)
        else:
            self.fail(exc)


class _Nothing:
    """What ``with start(...) or NOTHING as op`` enters when nothing records: ``op`` is None."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: object) -> None:
        return None


NOTHING = _Nothing()


def describe_storage(url: str) -> dict[str, str | int]:
    """``db.system.name``, ``server.address`` and ``server.port`` (and an S3 URL's
    ``aws.s3.bucket``) of a storage URL, read from its masked form: never a password."""
    masked = mask_url(url)
    scheme, _, rest = masked.partition("://")
    scheme = scheme.lower()
    system = _SYSTEMS.get(scheme.partition("+")[0], scheme)
    attributes: dict[str, str | int] = {"db.system.name": system}
    if scheme in _NO_SERVER:
        return attributes
    # As `mask_url` reads a URL: user information runs to the last "@".
    netloc = rest[rest.rfind("@") + 1 :]
    for end in "/?#":
        netloc = netloc.partition(end)[0]
    first = netloc.partition(",")[0]  # a multi-host URL: its first host
    if system == "aws.s3":
        if first:
            attributes["aws.s3.bucket"] = first
        endpoint = parse_qs(masked.partition("?")[2]).get("endpoint_url")
        first = urlsplit(endpoint[0]).netloc.rpartition("@")[2] if endpoint else ""
    host, port = _host_and_port(first)
    if host:
        attributes["server.address"] = host
        port = port or _DEFAULT_PORTS.get(system)
        if port:
            attributes["server.port"] = port
    return attributes


def _host_and_port(netloc: str) -> tuple[str, int | None]:
    if netloc.startswith("["):  # an IPv6 literal
        host, _, tail = netloc[1:].partition("]")
        port = tail.removeprefix(":")
    else:
        host, colon, port = netloc.rpartition(":")
        if not colon:
            host, port = netloc, ""
    return host, int(port) if port.isdigit() else None
