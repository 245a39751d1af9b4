"""FastAPI routes that take and give references: `pydantic_toast.fastapi.external_route`.

Every route of the router accepts each `External` field of its body as the value or as a
reference (read in one batch before the handler runs), and answers with references (written
in one batch before the response goes). The handler sees plain models. The script serves the
app with uvicorn on a free loopback port, on the embedded SQLite store, calls it with httpx,
prints what it got and stops:
    pip install 'pydantic-toast[fastapi]' uvicorn httpx
    python examples/fastapi_app.py
"""

import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import uvicorn
from fastapi import APIRouter, FastAPI
from pydantic import BaseModel

import pydantic_toast
from pydantic_toast import External
from pydantic_toast.fastapi import external_route

STORAGE = f"sqlite:///{Path(tempfile.mkdtemp()) / 'orders.db'}"


class Line(BaseModel):
    sku: str
    quantity: int


class Order(BaseModel):
    customer: str
    lines: list[External[Line]]


class Receipt(BaseModel):
    customer: str
    total_quantity: int


router = APIRouter(route_class=external_route(storage=STORAGE))


@router.post("/orders")
async def place(order: Order) -> Order:
    """Answers the order with each line as a reference to its stored record."""
    return order


@router.post("/receipts")
def receipt(order: Order) -> Receipt:
    """A sync handler: the lines it sees are values, however the client sent them."""
    return Receipt(customer=order.customer, total_quantity=sum(x.quantity for x in order.lines))


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    await pydantic_toast.aclose()  # close the storage's connections with the server


app = FastAPI(lifespan=lifespan)
app.include_router(router)


def main() -> None:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            placed = client.post(
                "/orders",
                json={"customer": "ada", "lines": [{"sku": "tea", "quantity": 2}]},
            ).json()
            print("placed:   ", placed)

            # Another client sends the stored line by reference, next to a new value.
            mixed = {"customer": "bob", "lines": [*placed["lines"], {"sku": "jam", "quantity": 1}]}
            print("receipt:  ", client.post("/receipts", json=mixed).json())

            dangling = {"class_name": "Line", "id": str(uuid.uuid4())}
            answer = client.post("/receipts", json={"customer": "cy", "lines": [dangling]})
            [error] = answer.json()["detail"]
            print("dangling: ", answer.status_code, error["loc"], error["msg"])

            schemas = client.get("/openapi.json").json()["components"]["schemas"]
            print("openapi:  ", sorted(schemas))
            assert schemas["Order"]["properties"]["lines"]["items"] == {
                "anyOf": [
                    {"$ref": "#/components/schemas/LineReference"},
                    {"$ref": "#/components/schemas/Line"},
                ]
            }
    finally:
        server.should_exit = True
        thread.join()


if __name__ == "__main__":
    main()
