"""The TOAST part: a size threshold that keeps small values inline, and zstd compression of
large records on the backends that store bytes, bounded when decompressing."""

from __future__ import annotations

import datetime as dt
import json
import tracemalloc
from typing import Annotated
from uuid import UUID, uuid4

import pytest
from pydantic import BaseModel

import pydantic_toast
from pydantic_toast import (
    ExternalBaseModel,
    ExternalConfigDict,
    ExternalField,
    StorageValidationError,
)
from pydantic_toast._registry import get_backend
from pydantic_toast.backends.records import Record, decode_envelope, encode_envelope


class Line(BaseModel):
    sku: str
    description: str = ""


class Order(BaseModel):
    lines: list[Annotated[Line, ExternalField(threshold=200)]]


async def test_values_under_the_threshold_stay_inline(storage: str) -> None:
    small, large = Line(sku="s"), Line(sku="l", description="x" * 500)
    order = Order(lines=[small, large, small])
    dumped = await pydantic_toast.dump(order, storage=storage)
    assert dumped["lines"][0] == {"sku": "s", "description": ""}
    assert set(dumped["lines"][1]) == {"class_name", "id"}
    assert dumped["lines"][2] == dumped["lines"][0]
    # validation accepts both forms, whichever the threshold chose
    assert await pydantic_toast.validate(Order, dumped, storage=storage) == order
    plain = order.model_dump(context={"storage": storage})
    assert plain["lines"][0] == plain["lines"][2] == dumped["lines"][0]
    assert set(plain["lines"][1]) == {"class_name", "id"}
    assert Order.model_validate(plain, context={"storage": storage}) == order
    inline_size = len(order.model_dump_json())
    toasted_size = len(json.dumps(dumped, separators=(",", ":")))
    assert toasted_size < inline_size - 400  # the large line left the row


def define_document(storage: str) -> type[ExternalBaseModel]:
    class Document(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=storage, compress_above=1024)
        title: str
        body: str

    return Document


async def test_large_records_are_compressed_and_round_trip(storage: str) -> None:
    Document = define_document(storage)
    large = Document(title="big", body="lorem ipsum dolor sit amet " * 2000)
    small = Document(title="small", body="short")
    references = await Document.save_external_many([large, small])
    assert await Document.load_external_many(references) == [large, small]
    assert await Document.load_external(references[0]) == large


@pytest.mark.parametrize("backend", ["file", "redis", "s3"])
async def test_compression_shows_in_the_stored_bytes(
    backend: str, request: pytest.FixtureRequest
) -> None:
    url: str = request.getfixturevalue(f"{backend}_url")
    Document = define_document(url)
    body = "lorem ipsum dolor sit amet " * 2000
    reference = await Document(title="big", body=body).save_external()
    raw = await _raw_bytes(backend, url, "Document", reference["id"], request)
    inline = len(Document(title="big", body=body).model_dump_json())
    assert raw.startswith(b'{"created_at":"')
    assert b'"codec":"zstd"' in raw[:300]
    assert len(raw) < inline / 10
    small = await Document(title="s", body="short").save_external()
    assert b'"codec"' not in await _raw_bytes(backend, url, "Document", small["id"], request)


async def _raw_bytes(
    backend: str, url: str, class_name: str, id: str, request: pytest.FixtureRequest
) -> bytes:
    if backend == "file":
        path = url.removeprefix("file://")
        with open(f"{path}/{class_name}/{id}.json", "rb") as file:
            return file.read()
    if backend == "redis":
        import redis.asyncio as redis

        prefix = url.partition("prefix=")[2]
        client = redis.Redis.from_url(url.partition("?")[0])
        try:
            value = await client.get(f"{prefix}:{class_name}:{id}")
        finally:
            await client.aclose()
        assert isinstance(value, bytes)
        return value
    import boto3

    bucket = request.getfixturevalue("s3_bucket")
    client = boto3.client(
        "s3", endpoint_url=request.getfixturevalue("s3_endpoint"), region_name="us-east-1"
    )
    body: bytes = client.get_object(Bucket=bucket, Key=f"models/{class_name}/{id}.json")[
        "Body"
    ].read()
    return body


def test_a_decompression_bomb_is_refused_with_bounded_memory() -> None:
    now = dt.datetime.now(dt.UTC)
    data = b'{"body":"' + b"x" * 50_000_000 + b'"}'
    record = Record(uuid4(), "Document", data, 1, now, now, compress_above=0)
    stored = encode_envelope(record)
    assert len(stored) < 100_000
    lying = stored.replace(b'"size":%d' % len(data), b'"size":1000')
    tracemalloc.start()
    try:
        with pytest.raises(StorageValidationError, match=str(record.id)) as caught:
            decode_envelope(lying, record.id, "Document")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "not the declared 1000" in str(caught.value)
    assert peak < 5_000_000
    too_big = stored.replace(b'"size":%d' % len(data), b'"size":99999999999')
    with pytest.raises(StorageValidationError, match="beyond the"):
        decode_envelope(too_big, record.id, "Document")
    garbage = stored[: stored.index(b"}\n") + 2] + b"not zstd at all"
    with pytest.raises(StorageValidationError, match="does not decompress"):
        decode_envelope(garbage, record.id, "Document")
    assert decode_envelope(stored, record.id, "Document").data == data


async def test_a_bomb_in_storage_fails_the_load_naming_class_and_id(file_url: str) -> None:
    Document = define_document(file_url)
    reference = await Document(title="t", body="y" * 100_000).save_external()
    path = f"{file_url.removeprefix('file://')}/Document/{reference['id']}.json"
    with open(path, "rb") as file:
        stored = file.read()
    with open(path, "wb") as file:
        file.write(stored.replace(b'"size":', b'"size":1', 1))
    with pytest.raises(StorageValidationError) as caught:
        await Document.load_external(reference)
    assert reference["id"] in str(caught.value) and "Document" in str(caught.value)


def test_compress_above_is_checked_at_class_definition() -> None:
    with pytest.raises(StorageValidationError, match="compress_above must be a byte count"):

        class Bad(ExternalBaseModel):
            model_config = ExternalConfigDict(storage="memory://c", compress_above=-1)


async def test_the_backend_sees_compressed_records_through_listing(file_url: str) -> None:
    Document = define_document(file_url)
    reference = await Document(title="t", body="z" * 50_000).save_external()
    backend = await get_backend(file_url)
    (info,) = [i async for i in backend.scan_records("Document")]
    assert info.id == UUID(reference["id"])
    assert info.size == len(Document(title="t", body="z" * 50_000).model_dump_json())


async def test_model_data_that_looks_like_a_codec_header(storage: str) -> None:
    class Setting(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=storage)
        name: str
        codec: str
        size: int

    setting = Setting(name="a", codec="zstd", size=3)
    reference = await setting.save_external()
    assert await Setting.load_external(reference) == setting
    backend = await get_backend(storage)
    try:
        infos = [info async for info in backend.scan_records("Setting")]
    except NotImplementedError:
        assert storage.startswith("dictstore://")
        return
    assert [info.id for info in infos] == [UUID(reference["id"])]
