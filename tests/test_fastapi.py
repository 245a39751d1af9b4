"""`pydantic_toast.fastapi.external_route`: a real app served by uvicorn on a loopback port,
called over HTTP with httpx, against Redis and PostgreSQL; and a schemathesis run against the
app's own OpenAPI document."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Annotated, Any
from uuid import UUID

import httpx
import pytest
import uvicorn
from fastapi import APIRouter, Body, Depends, FastAPI, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

import pydantic_toast
from pydantic_toast import External, StorageBackend, StorageValidationError
from pydantic_toast._registry import backend_class_for
from pydantic_toast.backends.base import Record
from pydantic_toast.fastapi import external_route

ROOT = Path(__file__).resolve().parent.parent

# --- the application -------------------------------------------------------------------------


class Line(BaseModel):
    sku: str
    quantity: int = Field(ge=1)


class Order(BaseModel):
    # An example for schemathesis to start from: random data rarely holds a valid line.
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "customer": "ann",
                    "lines": [{"sku": "a", "quantity": 1}, {"sku": "b", "quantity": 2}],
                    "gift": {"sku": "g", "quantity": 1},
                }
            ]
        }
    )

    customer: str
    lines: list[External[Line]]
    gift: External[Line] | None = None
    note: str | None = None


class Receipt(BaseModel):
    customer: str
    skus: list[str]
    total_quantity: int


async def non_empty(order: Order) -> Order:
    """A dependency that takes the body itself: it sees resolved values."""
    if not order.lines:
        raise HTTPException(status_code=400, detail="an order needs a line")
    return order


def refuse() -> None:
    """An authentication dependency that refuses everyone."""
    raise HTTPException(status_code=401, detail="who are you?")


def make_app(storage: str | StorageBackend) -> FastAPI:
    router = APIRouter(route_class=external_route(storage=storage))

    @router.post("/orders", response_model=Order, response_model_exclude_none=True)
    async def create(order: Order) -> Order:
        return order

    @router.post("/orders/unset", response_model=Order, response_model_exclude_unset=True)
    def create_unset(order: Order) -> Order:
        return order

    @router.post("/orders/refused", dependencies=[Depends(refuse)])
    async def refused(order: Order) -> Order:
        return order

    @router.post("/orders/sync")
    def create_sync(order: Order) -> Order:
        return order

    @router.post("/orders/receipt", response_model=Receipt)
    async def receipt(order: Order) -> Receipt:
        lines = [*order.lines, *([order.gift] if order.gift else [])]
        return Receipt(
            customer=order.customer,
            skus=[line.sku for line in lines],
            total_quantity=sum(line.quantity for line in lines),
        )

    @router.post("/orders/checked")
    def checked(order: Annotated[Order, Depends(non_empty)]) -> Order:
        return order

    @router.post("/orders/dumped", response_model=Order)
    async def dumped(order: Order) -> Any:
        # The hand-written way: with the route class it still answers what it says.
        return await pydantic_toast.dump(order, storage=storage, mode="json")

    @router.post("/orders/untyped")
    async def untyped(order: Order):  # type: ignore[no-untyped-def]
        return order

    @router.post("/orders/count")
    async def count(order: Order) -> dict[str, int]:
        return {"lines": len(order.lines)}

    @router.post("/orders/raw")
    async def raw(order: Order) -> JSONResponse:
        return JSONResponse({"first": order.lines[0].sku if order.lines else None})

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if isinstance(storage, StorageBackend):
            await storage.connect()
        yield
        if isinstance(storage, StorageBackend):
            await storage.disconnect()
        await pydantic_toast.aclose()

    app = FastAPI(lifespan=lifespan)
    app.include_router(router, prefix="/api")
    return app


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """``app`` served by uvicorn in a thread, on a free loopback port; its base URL."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        assert not thread.is_alive(), "uvicorn did not stop"


@pytest.fixture(params=["redis", "postgresql"])
def storage_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


@pytest.fixture
def client(storage_url: str) -> Iterator[httpx.Client]:
    with serving(make_app(storage_url)) as base, httpx.Client(base_url=base, timeout=30) as c:
        yield c


def stored_lines(lines: Sequence[Line], storage: str) -> list[dict[str, str]]:
    """References to ``lines`` written through the library, as another service would."""
    dumped: list[dict[str, str]] = pydantic_toast.dump_sync(
        list(lines), storage=storage, as_type=list[External[Line]], mode="json"
    )
    return dumped


def is_reference(value: Any, class_name: str = "Line") -> bool:
    return (
        isinstance(value, dict)
        and set(value) == {"class_name", "id"}
        and value["class_name"] == class_name
        and UUID(value["id"]).version == 8  # content addressed
    )


# --- request bodies and responses ----------------------------------------------------------------


def test_values_in_references_out_and_stored(client: httpx.Client, storage_url: str) -> None:
    order = Order(customer="ann", lines=[Line(sku="a", quantity=1), Line(sku="b", quantity=2)])
    response = client.post("/api/orders", json=order.model_dump(mode="json"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"customer", "lines"}  # response_model_exclude_none dropped the rest
    assert body["customer"] == "ann"
    assert [is_reference(line) for line in body["lines"]] == [True, True]
    # What the references name is what was sent, read back through the library.
    assert pydantic_toast.validate_sync(Order, body, storage=storage_url) == order


def test_references_and_values_mixed_reach_the_handler_resolved(
    client: httpx.Client, storage_url: str
) -> None:
    refs = stored_lines([Line(sku="kept", quantity=3), Line(sku="gift", quantity=1)], storage_url)
    sent = {
        "customer": "bob",
        "lines": [refs[0], {"sku": "new", "quantity": 4}],
        "gift": refs[1],
    }
    response = client.post("/api/orders/receipt", json=sent)
    assert response.status_code == 200, response.text
    assert response.json() == {
        "customer": "bob",
        "skus": ["kept", "new", "gift"],
        "total_quantity": 8,
    }


def test_a_sync_handler_resolves_and_dumps(client: httpx.Client, storage_url: str) -> None:
    [ref] = stored_lines([Line(sku="s", quantity=5)], storage_url)
    response = client.post(
        "/api/orders/sync", json={"customer": "cy", "lines": [ref, {"sku": "t", "quantity": 6}]}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["lines"][0] == ref  # the same value, the same content address
    assert body["note"] is None and body["gift"] is None
    assert pydantic_toast.validate_sync(Order, body, storage=storage_url) == Order(
        customer="cy", lines=[Line(sku="s", quantity=5), Line(sku="t", quantity=6)]
    )


def test_response_model_exclude_unset_keeps_what_was_sent(client: httpx.Client) -> None:
    sent = {"customer": "ela", "lines": [{"sku": "u", "quantity": 1}], "note": None}
    response = client.post("/api/orders/unset", json=sent)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"customer", "lines", "note"}  # gift was not sent: left out
    assert body["note"] is None
    assert is_reference(body["lines"][0])


def test_a_dependency_taking_the_body_sees_values(client: httpx.Client, storage_url: str) -> None:
    [ref] = stored_lines([Line(sku="d", quantity=1)], storage_url)
    response = client.post("/api/orders/checked", json={"customer": "di", "lines": [ref]})
    assert response.status_code == 200, response.text
    assert response.json()["lines"] == [ref]
    empty = client.post("/api/orders/checked", json={"customer": "di", "lines": []})
    assert empty.status_code == 400
    assert empty.json() == {"detail": "an order needs a line"}


def test_a_dumped_dict_under_a_response_model_is_answered(
    client: httpx.Client, storage_url: str
) -> None:
    """The issue's 500: ``response_model=Order`` returning ``await dump(order)``."""
    order = {"customer": "eve", "lines": [{"sku": "e", "quantity": 2}]}
    response = client.post("/api/orders/dumped", json=order)
    assert response.status_code == 200, response.text
    body = response.json()
    assert is_reference(body["lines"][0])
    assert pydantic_toast.validate_sync(Order, body, storage=storage_url) == Order(**order)


def test_a_model_without_response_model_is_dumped_with_references(
    client: httpx.Client, storage_url: str
) -> None:
    response = client.post(
        "/api/orders/untyped", json={"customer": "fay", "lines": [{"sku": "f", "quantity": 1}]}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert is_reference(body["lines"][0])
    [line] = pydantic_toast.validate_sync(list[External[Line]], body["lines"], storage=storage_url)
    assert line == Line(sku="f", quantity=1)


def test_dicts_and_responses_pass_through(client: httpx.Client, storage_url: str) -> None:
    [ref] = stored_lines([Line(sku="g", quantity=1)], storage_url)
    sent = {"customer": "gus", "lines": [ref, ref]}
    assert client.post("/api/orders/count", json=sent).json() == {"lines": 2}
    raw = client.post("/api/orders/raw", json=sent)
    assert raw.status_code == 200
    assert raw.json() == {"first": "g"}


def test_records_are_where_the_backend_keeps_them(client: httpx.Client, storage_url: str) -> None:
    line = Line(sku="raw", quantity=7)
    response = client.post("/api/orders", json={"customer": "hal", "lines": [line.model_dump()]})
    assert response.status_code == 200, response.text
    id = UUID(response.json()["lines"][0]["id"])
    assert json.loads(read_raw(storage_url, "Line", id)) == line.model_dump()


def read_raw(storage_url: str, class_name: str, id: UUID) -> str:
    """A record's stored JSON, read with the driver itself."""
    base, _, query = storage_url.partition("?")
    namespace = query.removeprefix("table=").removeprefix("prefix=")
    if storage_url.startswith("redis"):
        import redis

        client = redis.Redis.from_url(base)
        try:
            envelope = client.get(f"{namespace}:{class_name}:{id}")
        finally:
            client.close()
        assert envelope is not None, f"no key for {class_name} {id}"
        return json.dumps(json.loads(envelope)["data"])

    import asyncpg

    async def select() -> str:
        connection = await asyncpg.connect(base)
        try:
            data: str = await connection.fetchval(
                f'SELECT data FROM "{namespace}" WHERE id = $1 AND class_name = $2',
                id,
                class_name,
            )
            return data
        finally:
            await connection.close()

    return asyncio.run(select())


# --- errors ------------------------------------------------------------------------------------


def test_a_dangling_reference_is_a_422_naming_its_location(client: httpx.Client) -> None:
    missing = str(uuid.uuid4())
    response = client.post(
        "/api/orders",
        json={
            "customer": "ivy",
            "lines": [{"sku": "ok", "quantity": 1}],
            "gift": {"class_name": "Line", "id": missing},
        },
    )
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["type"] == "external_not_found"
    assert error["loc"] == ["body", "gift", "reference"]
    assert error["msg"] == f"no Line record with id {missing}"


@pytest.mark.parametrize(
    ("reference", "error_type", "loc_tail", "message"),
    [
        ({"class_name": "Line", "id": "not-a-uuid"}, "uuid_parsing", ["id"], "valid UUID"),
        (
            {"class_name": "Order", "id": str(uuid.uuid4())},
            "literal_error",
            ["class_name"],
            "'Line'",
        ),
        ({"class_name": "Line", "id": 12}, "uuid_type", ["id"], "UUID"),
        # A name no record can have: refused by validation, not by the read before it.
        (
            {"class_name": "../etc", "id": str(uuid.uuid4())},
            "literal_error",
            ["class_name"],
            "'Line'",
        ),
        ({"class_name": "", "id": str(uuid.uuid4())}, "literal_error", ["class_name"], "'Line'"),
    ],
)
def test_a_malformed_reference_is_a_422_naming_its_location(
    client: httpx.Client,
    reference: dict[str, Any],
    error_type: str,
    loc_tail: list[str],
    message: str,
) -> None:
    response = client.post("/api/orders", json={"customer": "jo", "lines": [reference]})
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["type"] == error_type
    assert error["loc"] == ["body", "lines", 0, "reference", *loc_tail]
    assert message in error["msg"]


def test_a_bad_value_is_still_a_plain_422(client: httpx.Client) -> None:
    response = client.post("/api/orders", json={"customer": "kim", "lines": [{"sku": "x"}]})
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert (error["type"], error["loc"]) == ("missing", ["body", "lines", 0, "value", "quantity"])
    malformed = client.post(
        "/api/orders", content=b'{"customer": ', headers={"content-type": "application/json"}
    )
    assert malformed.status_code == 422
    assert malformed.json()["detail"][0]["type"] == "json_invalid"


def test_external_route_refuses_a_bad_storage_when_defined() -> None:
    with pytest.raises(StorageValidationError, match="unknown storage scheme 'nosuch'"):
        external_route(storage="nosuch://x")
    with pytest.raises(TypeError, match="storage must be a URL or a StorageBackend, not int"):
        external_route(storage=3)  # type: ignore[arg-type]


# --- batching ------------------------------------------------------------------------------------


def counting_backend(url: str) -> Any:
    """The URL's real backend, counting its batch calls."""

    class Counting(backend_class_for(url)):  # type: ignore[misc]
        calls: list[tuple[str, str, int]] = []

        async def read_records(self, class_name: str, ids: Sequence[UUID]) -> list[Record | None]:
            self.calls.append(("read", class_name, len(ids)))
            result: list[Record | None] = await super().read_records(class_name, ids)
            return result

        async def write_records(self, records: Sequence[Record]) -> None:
            self.calls.append(("write", records[0].class_name, len(records)))
            await super().write_records(records)

    return Counting(url)


def test_one_read_batch_and_one_write_batch_per_request(storage_url: str) -> None:
    refs = stored_lines([Line(sku=f"r{i}", quantity=i + 1) for i in range(10)], storage_url)
    backend = counting_backend(storage_url)
    sent = {"customer": "lou", "lines": [*refs, {"sku": "n1", "quantity": 1}, refs[0]]}
    with serving(make_app(backend)) as base, httpx.Client(base_url=base, timeout=30) as c:
        response = c.post("/api/orders", json=sent)
        assert response.status_code == 200, response.text
        # Ten distinct references read in one batch; the twelve values dumped in one batch
        # (where the backend writes the repeated content address once).
        assert backend.calls == [("read", "Line", 10), ("write", "Line", 12)]
        assert response.json()["lines"][:10] == refs
        assert response.json()["lines"][11] == refs[0]


def test_a_request_a_dependency_refuses_reads_nothing(storage_url: str) -> None:
    refs = stored_lines([Line(sku="x", quantity=1)], storage_url)
    backend = counting_backend(storage_url)
    with serving(make_app(backend)) as base, httpx.Client(base_url=base, timeout=30) as c:
        response = c.post("/api/orders/refused", json={"customer": "ned", "lines": refs})
        assert response.status_code == 401
        assert response.json() == {"detail": "who are you?"}
        assert backend.calls == []
        # The dependency that takes the body (non_empty) is solved after the reads.
        checked = c.post("/api/orders/checked", json={"customer": "ned", "lines": refs})
        assert checked.status_code == 200, checked.text
        assert backend.calls == [("read", "Line", 1), ("write", "Line", 1)]


def test_a_sync_handler_relaying_references_reads_them_on_the_server_loop(
    storage_url: str,
) -> None:
    """A sync handler runs in FastAPI's thread pool; the references it returns are read in
    one batch on the server's event loop, where a connected backend's pool lives."""
    refs = stored_lines([Line(sku=f"y{i}", quantity=1) for i in range(3)], storage_url)
    backend = counting_backend(storage_url)
    router = APIRouter(route_class=external_route(storage=backend))

    @router.post("/relay", response_model=Order)
    def relay(body: Annotated[dict[str, Any], Body()]) -> Any:
        return body  # as it came: references included

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await backend.connect()
        yield
        await backend.disconnect()

    app = FastAPI(lifespan=lifespan)
    app.include_router(router)
    with serving(app) as base, httpx.Client(base_url=base, timeout=30) as c:
        sent = {"customer": "oz", "lines": refs}
        response = c.post("/relay", json=sent)
        assert response.status_code == 200, response.text
        assert response.json() == {**sent, "gift": None, "note": None}
        assert backend.calls == [("read", "Line", 3), ("write", "Line", 3)]


# --- OpenAPI ----------------------------------------------------------------------------------


def test_openapi_names_each_reference_once(client: httpx.Client) -> None:
    document = client.get("/openapi.json").json()
    schemas = document["components"]["schemas"]
    assert schemas["LineReference"] == {
        "title": "LineReference",
        "description": "A reference to a stored Line.",
        "type": "object",
        "properties": {
            "class_name": {"type": "string", "const": "Line", "title": "Class Name"},
            "id": {"type": "string", "format": "uuid", "title": "Id"},
        },
        "required": ["class_name", "id"],
        "additionalProperties": False,
    }
    lines = schemas["Order"]["properties"]["lines"]
    assert lines["items"] == {
        "anyOf": [
            {"$ref": "#/components/schemas/LineReference"},
            {"$ref": "#/components/schemas/Line"},
        ]
    }
    operation = document["paths"]["/api/orders"]["post"]
    body_schema = operation["requestBody"]["content"]["application/json"]["schema"]
    assert body_schema == {"$ref": "#/components/schemas/Order"}
    answer = operation["responses"]["200"]["content"]["application/json"]["schema"]
    assert answer == {"$ref": "#/components/schemas/Order"}
    # The reference is written out in the components only, never inline at a use.
    assert json.dumps(document).count('"LineReference"') == 1 + 1  # its key and its title


def test_a_route_class_on_the_app_router(redis_url: str) -> None:
    app = FastAPI()
    app.router.route_class = external_route(storage=redis_url)

    @app.post("/orders")
    async def create(order: Order) -> Order:
        return order

    with serving(app) as base, httpx.Client(base_url=base, timeout=30) as c:
        response = c.post(
            "/orders", json={"customer": "mo", "lines": [{"sku": "m", "quantity": 1}]}
        )
        assert response.status_code == 200, response.text
        [ref] = response.json()["lines"]
        assert is_reference(ref)
        again = c.post("/orders", json={"customer": "mo", "lines": [ref]})
        assert again.json() == response.json()
        assert "LineReference" in c.get("/openapi.json").json()["components"]["schemas"]


# --- schemathesis ----------------------------------------------------------------------------


def test_schemathesis_finds_no_server_error_or_schema_violation(redis_url: str) -> None:
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import response_schema_conformance

    with serving(make_app(redis_url)) as base:
        schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) == 10
        calls: list[int] = []

        strategies = [operation.as_strategy() for operation in operations]
        for operation in operations:
            strategies.extend(schema.get_strategies_from_examples(operation))
        assert len(strategies) > len(operations), "the example became a strategy"

        @given(case=st.one_of(*strategies))
        @settings(
            max_examples=30,
            deadline=None,
            database=None,
            phases=[Phase.generate, Phase.shrink],
            suppress_health_check=list(HealthCheck),
        )
        def check(case: Any) -> None:
            response = case.call_and_validate(
                base_url=base, checks=[not_a_server_error, response_schema_conformance]
            )
            calls.append(response.status_code)

        check()
        assert len(calls) == 30
        assert 200 in calls and 422 in calls, calls  # both answers were exercised


# --- packaging ---------------------------------------------------------------------------------


def test_without_fastapi_the_import_error_names_the_extra() -> None:
    code = (
        "import sys\n"
        "sys.modules['fastapi'] = None\n"  # as if FastAPI were not installed
        "try:\n"
        "    import pydantic_toast.fastapi\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == (
        "pydantic_toast.fastapi needs FastAPI (fastapi is missing): "
        "pip install 'pydantic-toast[fastapi]'"
    )


def test_the_overhead_benchmark_runs(memory_url: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.fastapi_overhead", "--quick", "--backend", "memory"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("memory")]
    assert [row[1] for row in rows] == ["values", "references"]
    assert all(float(row[3]) > 0 and float(row[4]) > 0 for row in rows)
