"""``python -m benchmarks.fastapi_overhead [--quick] [--backend redis,postgresql] [--lines N]``

What `pydantic_toast.fastapi.external_route` costs per request, against a hand-written route
doing the same work in the same run: the body taken as a dict, ``pydantic_toast.validate``
(references read in one batch), a ``ValidationError`` mapped to a 422, and
``JSONResponse(await pydantic_toast.dump(...))`` (values written in one batch). Both serve an
order of ``--lines`` `External` lines, sent once as values and once as references, from one
uvicorn process (a subprocess, as in production) to one keep-alive httpx client. A plain
FastAPI route with the lines inline and no storage gives the floor. Routes alternate in
blocks (the first a warm-up) so that noise hits all of them; figures are medians.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import httpx
from fastapi import APIRouter, Body, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

import pydantic_toast
from benchmarks import report
from benchmarks.services import Services
from benchmarks.timing import interleaved, median
from pydantic_toast import External
from pydantic_toast.fastapi import external_route

_STORAGE_ENV = "TOAST_BENCH_FASTAPI_STORAGE"


class Line(BaseModel):
    sku: str
    quantity: int


class Order(BaseModel):
    customer: str
    lines: list[External[Line]]


class PlainOrder(BaseModel):
    customer: str
    lines: list[Line]


def create_app() -> FastAPI:
    """The app the server process runs (``uvicorn --factory``)."""
    storage = os.environ[_STORAGE_ENV]
    toast = APIRouter(route_class=external_route(storage=storage))

    @toast.post("/toast/orders")
    async def with_route_class(order: Order) -> Order:
        return order

    plain = APIRouter()

    @plain.post("/hand/orders")
    async def by_hand(body: Annotated[dict[str, Any], Body()]) -> JSONResponse:
        try:
            order = await pydantic_toast.validate(Order, body, storage=storage)
        except ValidationError as exc:
            errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
            raise RequestValidationError(errors, body=body) from exc
        return JSONResponse(await pydantic_toast.dump(order, storage=storage, mode="json"))

    @plain.post("/plain/orders")
    async def inline(order: PlainOrder) -> PlainOrder:
        return order

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await pydantic_toast.aclose()

    app = FastAPI(lifespan=lifespan)
    app.include_router(toast)
    app.include_router(plain)
    return app


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _serve(storage: str) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "benchmarks.fastapi_overhead:create_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        env={**os.environ, _STORAGE_ENV: storage},
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return process, f"http://127.0.0.1:{port}"
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise SystemExit(f"uvicorn did not start on port {port}") from None
            time.sleep(0.05)


async def measure(
    storage: str, *, lines: int, blocks: int, block_size: int
) -> list[dict[str, Any]]:
    process, base = _serve(storage)
    try:
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            values = {
                "customer": "bench",
                "lines": [{"sku": f"sku-{i}", "quantity": i + 1} for i in range(lines)],
            }
            first = await client.post("/toast/orders", json=values)
            first.raise_for_status()
            references = first.json()
            by_hand = await client.post("/hand/orders", json=references)
            assert by_hand.json() == references, "both routes answer the same"

            def post(path: str, body: dict[str, Any]) -> Any:
                async def op() -> None:
                    response = await client.post(path, json=body)
                    assert response.status_code == 200, response.text

                return op

            rows = []
            for sent, body in (("values", values), ("references", references)):
                ops = {
                    "external_route": post("/toast/orders", body),
                    "hand-written": post("/hand/orders", body),
                }
                if sent == "values":
                    ops["plain FastAPI"] = post("/plain/orders", values)
                samples = await interleaved(ops, blocks=blocks, block_size=block_size)
                route = median(samples["external_route"]) * 1000
                hand = median(samples["hand-written"]) * 1000
                plain = median(samples["plain FastAPI"]) * 1000 if "plain FastAPI" in ops else None
                rows.append(
                    {
                        "sent": sent,
                        "lines": lines,
                        "external_route_ms": route,
                        "hand_written_ms": hand,
                        "overhead_ms": route - hand,
                        "route_vs_hand_ratio": route / hand,
                        "plain_fastapi_ms": plain,
                        "requests_per_route": len(samples["external_route"]),
                    }
                )
            return rows
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fastapi_overhead")
    parser.add_argument("--backend", default="redis,postgresql")
    parser.add_argument("--lines", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="tiny counts (a smoke run)")
    args = parser.parse_args(argv)
    wanted = tuple(name.strip() for name in args.backend.split(",") if name.strip())
    blocks, block_size = (2, 5) if args.quick else (12, 50)
    services = Services()
    try:
        await services.start(wanted)
        for name, why in services.missing.items():
            print(f"{name}: skipped ({why})")
        rows: list[list[Any]] = []
        for name in wanted:
            if name not in services.urls:
                continue
            for row in await measure(
                services.urls[name], lines=args.lines, blocks=blocks, block_size=block_size
            ):
                rows.append(
                    [
                        name,
                        row["sent"],
                        row["lines"],
                        row["external_route_ms"],
                        row["hand_written_ms"],
                        row["overhead_ms"],
                        row["route_vs_hand_ratio"],
                        row["plain_fastapi_ms"],
                        row["requests_per_route"],
                    ]
                )
        print(
            report.table(
                "external_route against a hand-written route: median ms per request over HTTP",
                [
                    "backend",
                    "sent",
                    "lines",
                    "external_route",
                    "hand-written",
                    "overhead",
                    "ratio",
                    "plain FastAPI",
                    "n",
                ],
                rows,
            )
        )
    finally:
        await services.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
