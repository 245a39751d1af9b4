"""Observability: the spans and metrics of pydantic-toast's operations, with OpenTelemetry.

Needs the API (``pip install 'pydantic-toast[otel]'``) and, to record anything, the SDK
(``pip install opentelemetry-sdk``). The exporter and reader here keep everything in memory
and the script prints it; a service would export to a collector instead.
    python examples/observability.py
"""

import asyncio
import contextlib
import tempfile
import uuid

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import BaseModel

from pydantic_toast import (
    External,
    ExternalBaseModel,
    ExternalConfigDict,
    RecordNotFoundError,
    dump,
    validate,
)

# Configure the SDK once, at start-up (pydantic-toast also notices one configured later).
spans = InMemorySpanExporter()
tracer_provider = TracerProvider()
tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
trace.set_tracer_provider(tracer_provider)
reader = InMemoryMetricReader()
metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))

STORAGE = f"sqlite:///{tempfile.mkdtemp()}/models.db"


class User(ExternalBaseModel):
    model_config = ExternalConfigDict(storage=STORAGE)

    name: str


class Line(BaseModel):
    sku: str


class Order(BaseModel):
    lines: list[External[Line]]


async def main() -> None:
    tracer = trace.get_tracer("shop")
    with tracer.start_as_current_span("handle-request"):  # your span: the parent of ours
        reference = await User(name="Ada").save_external()
        await User.load_external(reference)
        # A missing record: that load's span gets an error status and the exception.
        with contextlib.suppress(RecordNotFoundError):
            await User.load_external({"class_name": "User", "id": str(uuid.uuid4())})
        order = Order(lines=[Line(sku="tea"), Line(sku="cake")])
        dumped = await dump(order, storage="memory://shop")
        assert await validate(Order, dumped, storage="memory://shop") == order

    for span in spans.get_finished_spans():
        parent = "" if span.parent is None else f" (in {span.parent.span_id:x})"
        print(f"{span.name} {span.context.span_id:x}{parent} {span.status.status_code.name}")
        for key, value in (span.attributes or {}).items():
            print(f"    {key} = {value}")

    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    attributes = dict(point.attributes or {})
                    count = getattr(point, "count", None) or getattr(point, "value", None)
                    print(f"{metric.name} {attributes}: {count}")


if __name__ == "__main__":
    asyncio.run(main())
