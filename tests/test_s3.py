"""The S3 backend against moto's standalone server over HTTP (the `s3_endpoint` fixture).

What the shared contract suite cannot see: the exact object keys and content type, the stored
body, connect-time failures, the one shared client, endpoint resolution from the environment,
corrupt objects, bounded batch concurrency, deletion, and URL checking at class definition.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any
from uuid import UUID, uuid4

import pytest

pytest.importorskip("aiobotocore")

from aiobotocore.session import AioSession  # type: ignore[import-untyped]

from pydantic_toast import (
    ExternalBaseModel,
    ExternalConfigDict,
    RecordNotFoundError,
    StorageConnectionError,
    StorageOperationError,
    StorageValidationError,
)
from pydantic_toast._registry import get_backend
from pydantic_toast.backends import s3
from pydantic_toast.backends.records import Record, RecordInfo, encode_envelope
from pydantic_toast.backends.s3 import S3Backend


def define_thing(storage: str) -> type[ExternalBaseModel]:
    class Thing(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=storage)
        name: str
        size: int = 0

    return Thing


def boto3_client(endpoint: str) -> Any:
    import boto3  # type: ignore[import-untyped]

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --- stored layout --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected_prefix"),
    [("/models", "models/"), ("", ""), ("/", ""), ("/a/b/", "a/b/")],
)
async def test_object_key_content_type_and_body(
    s3_endpoint: str, s3_bucket: str, path: str, expected_prefix: str
) -> None:
    Thing = define_thing(f"s3://{s3_bucket}{path}?endpoint_url={s3_endpoint}")
    thing = Thing(name="ünïcode ✓", size=3)  # type: ignore[call-arg]
    reference = await thing.save_external()

    key = f"{expected_prefix}Thing/{reference['id']}.json"
    client = boto3_client(s3_endpoint)
    listed = client.list_objects_v2(Bucket=s3_bucket)
    assert [item["Key"] for item in listed["Contents"]] == [key]
    stored = client.get_object(Bucket=s3_bucket, Key=key)
    assert stored["ContentType"] == "application/json"
    body = json.loads(stored["Body"].read())

    metadata = thing.external_metadata
    assert metadata is not None
    assert body == {
        "created_at": metadata.created_at.isoformat(timespec="microseconds"),
        "updated_at": metadata.updated_at.isoformat(timespec="microseconds"),
        "schema_version": 1,
        "class_name": "Thing",
        "data": {"name": "ünïcode ✓", "size": 3},
    }
    assert await Thing.load_external(reference) == thing


async def test_resave_overwrites_the_same_object(s3_url: str, s3_endpoint: str) -> None:
    Thing = define_thing(s3_url)
    thing = Thing(name="a")  # type: ignore[call-arg]
    reference = await thing.save_external()
    thing.size = 9  # type: ignore[attr-defined]
    assert await thing.save_external() == reference
    bucket = s3_url.removeprefix("s3://").split("/")[0]
    listed = boto3_client(s3_endpoint).list_objects_v2(Bucket=bucket)
    assert len(listed["Contents"]) == 1
    assert (await Thing.load_external(reference)).size == 9  # type: ignore[attr-defined]


# --- connecting ---------------------------------------------------------------------------


async def test_missing_bucket_is_a_permanent_error_naming_it(s3_endpoint: str) -> None:
    backend = S3Backend(f"s3://no-such-bucket-{uuid4().hex[:8]}/x?endpoint_url={s3_endpoint}")
    with pytest.raises(StorageOperationError, match=r"no-such-bucket-.* does not exist") as caught:
        await backend.open()
    assert s3_endpoint in str(caught.value)
    assert backend._s3 is None


async def test_missing_bucket_through_the_model(s3_endpoint: str) -> None:
    Thing = define_thing(f"s3://absent-{uuid4().hex[:8]}?endpoint_url={s3_endpoint}")
    with pytest.raises(StorageOperationError, match="absent-"):
        await Thing(name="x").save_external()  # type: ignore[call-arg]


async def test_unreachable_endpoint_fails_quickly_naming_it(s3_endpoint: str) -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"
    backend = S3Backend(f"s3://some-bucket?endpoint_url={endpoint}&timeout=2")
    started = time.monotonic()
    with pytest.raises(StorageConnectionError) as caught:
        await backend.open()
    assert time.monotonic() - started < 10
    assert endpoint in str(caught.value)
    assert "some-bucket" in str(caught.value)
    assert caught.value.__cause__ is not None
    assert type(caught.value.__cause__).__name__ == "EndpointConnectionError"


async def test_operations_after_the_bucket_is_gone_fail_as_permanent_errors(
    s3_endpoint: str, s3_bucket: str
) -> None:
    backend = S3Backend(f"s3://{s3_bucket}?endpoint_url={s3_endpoint}")
    await backend.connect()
    try:
        boto3_client(s3_endpoint).delete_bucket(Bucket=s3_bucket)
        record = Record(uuid4(), "Thing", b'{"name":"x"}', 1, now(), now())
        with pytest.raises(StorageOperationError, match="NoSuchBucket") as caught:
            await backend.write_record(record)
        assert s3_bucket in str(caught.value)
        from botocore.exceptions import ClientError  # type: ignore[import-untyped]

        assert isinstance(caught.value.__cause__, ClientError)
        with pytest.raises(StorageOperationError, match="NoSuchBucket"):
            await backend.read_record("Thing", record.id)
    finally:
        await backend.disconnect()
    assert backend._s3 is None


async def test_one_client_is_created_and_reused(
    s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    created: list[Any] = []
    create_client = AioSession.create_client

    def counting_create_client(self: AioSession, *args: Any, **kwargs: Any) -> Any:
        created.append(args)
        return create_client(self, *args, **kwargs)

    monkeypatch.setattr(AioSession, "create_client", counting_create_client)
    Thing = define_thing(s3_url)

    first = await Thing(name="first").save_external()  # type: ignore[call-arg]
    backend = await get_backend(s3_url)
    assert isinstance(backend, S3Backend)
    client = backend._s3
    assert client is not None
    for index in range(10):
        reference = await Thing(name=f"n{index}").save_external()  # type: ignore[call-arg]
        assert (await Thing.load_external(reference)).name == f"n{index}"  # type: ignore[attr-defined]
        assert backend._s3 is client
    await asyncio.gather(*(Thing.load_external(first) for _ in range(20)))

    assert await get_backend(s3_url) is backend
    assert backend._s3 is client
    assert created == [("s3",)]


async def test_endpoint_from_the_environment(
    s3_endpoint: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    Thing = define_thing(f"s3://{s3_bucket}/from-env")
    reference = await Thing(name="env").save_external()  # type: ignore[call-arg]
    backend = await get_backend(f"s3://{s3_bucket}/from-env")
    assert isinstance(backend, S3Backend)
    assert backend.endpoint_url is None
    assert backend._s3.meta.endpoint_url == s3_endpoint
    stored = boto3_client(s3_endpoint).head_object(
        Bucket=s3_bucket, Key=f"from-env/Thing/{reference['id']}.json"
    )
    assert stored["ContentType"] == "application/json"
    assert (await Thing.load_external(reference)).name == "env"  # type: ignore[attr-defined]


# --- reading ------------------------------------------------------------------------------


async def test_missing_object_is_record_not_found(s3_url: str) -> None:
    Thing = define_thing(s3_url)
    missing = str(uuid4())
    with pytest.raises(RecordNotFoundError) as caught:
        await Thing.load_external({"class_name": "Thing", "id": missing})
    assert caught.value.id == missing
    assert caught.value.class_name == "Thing"


def other_class_envelope(id: UUID) -> bytes:
    return encode_envelope(Record(id, "Other", b'{"name":"x"}', 1, now(), now()))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (lambda id: b"\x00\xffgarbage", "is corrupt"),
        (lambda id: b"", "is corrupt"),
        (lambda id: b'{"hello": "world"}', "is corrupt"),
        (lambda id: b"[1, 2, 3]", "is corrupt"),
        (
            lambda id: encode_envelope(Record(id, "Thing", b'{"name":"x"}', 1, now(), now()))[:40],
            "is corrupt",
        ),
        (
            lambda id: encode_envelope(Record(id, "Thing", b'{"size":"big"}', 1, now(), now())),
            "no longer validates",
        ),
    ],
)
async def test_corrupt_objects_are_validation_errors_naming_class_and_id(
    s3_url: str,
    s3_endpoint: str,
    s3_bucket: str,
    body: Callable[[UUID], bytes],
    message: str,
) -> None:
    Thing = define_thing(s3_url)
    id = uuid4()
    boto3_client(s3_endpoint).put_object(
        Bucket=s3_bucket, Key=f"models/Thing/{id}.json", Body=body(id)
    )
    with pytest.raises(StorageValidationError, match=message) as caught:
        await Thing.load_external({"class_name": "Thing", "id": str(id)})
    assert "Thing" in str(caught.value)
    assert str(id) in str(caught.value)


async def test_max_size_refuses_large_objects(s3_endpoint: str, s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}?endpoint_url={s3_endpoint}&max_size=200"
    Thing = define_thing(url)
    small = await Thing(name="small").save_external()  # type: ignore[call-arg]
    large = await Thing(name="x" * 500).save_external()  # type: ignore[call-arg]
    assert (await Thing.load_external(small)).name == "small"  # type: ignore[attr-defined]
    with pytest.raises(StorageValidationError, match=r"Thing record .* more than max_size=200"):
        await Thing.load_external(large)


# --- batches and deletion -------------------------------------------------------------------


def track_in_flight(
    monkeypatch: pytest.MonkeyPatch, client: Any, names: list[str]
) -> dict[str, int]:
    """Wrap the real client's methods to record the peak number of requests in flight."""
    counts = {"now": 0, "peak": 0, "calls": 0}

    def wrap(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def wrapper(**kwargs: Any) -> Any:
            counts["now"] += 1
            counts["calls"] += 1
            counts["peak"] = max(counts["peak"], counts["now"])
            try:
                return await method(**kwargs)
            finally:
                counts["now"] -= 1

        return wrapper

    for name in names:
        monkeypatch.setattr(client, name, wrap(getattr(client, name)))
    return counts


async def test_batches_of_200_with_bounded_concurrency(
    s3_endpoint: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = S3Backend(f"s3://{s3_bucket}/batch?endpoint_url={s3_endpoint}&max_concurrency=5")
    await backend.connect()
    try:
        counts = track_in_flight(
            monkeypatch, backend._s3, ["put_object", "get_object", "head_object"]
        )
        records = [Record(uuid4(), "Batch", b'{"n":%d}' % i, 1, now(), now()) for i in range(200)]
        await backend.write_records(records)
        assert counts["calls"] == 200
        assert 1 < counts["peak"] <= 5

        missing = uuid4()
        ids = [missing, *(record.id for record in reversed(records))]
        found = await backend.read_records("Batch", ids)
        assert found[0] is None
        assert [r.data if r else None for r in found[1:]] == [r.data for r in reversed(records)]
        assert all(r is not None and r.class_name == "Batch" for r in found[1:])
        assert 1 < counts["peak"] <= 5

        listed = boto3_client(s3_endpoint).list_objects_v2(Bucket=s3_bucket, Prefix="batch/")
        assert listed["KeyCount"] == 200

        assert await backend.delete_records("Batch", [*ids, records[0].id]) == 200
        assert counts["peak"] <= 5
        listed = boto3_client(s3_endpoint).list_objects_v2(Bucket=s3_bucket, Prefix="batch/")
        assert listed["KeyCount"] == 0
    finally:
        await backend.disconnect()


async def test_batch_failure_is_a_permanent_error(s3_endpoint: str, s3_bucket: str) -> None:
    backend = S3Backend(f"s3://{s3_bucket}?endpoint_url={s3_endpoint}")
    await backend.connect()
    try:
        boto3_client(s3_endpoint).delete_bucket(Bucket=s3_bucket)
        records = [Record(uuid4(), "Batch", b"{}", 1, now(), now()) for _ in range(40)]
        with pytest.raises(StorageOperationError, match="NoSuchBucket"):
            await backend.write_records(records)
        with pytest.raises(StorageOperationError, match="NoSuchBucket"):
            await backend.read_records("Batch", [r.id for r in records])
    finally:
        await backend.disconnect()


async def test_delete_counts_existing_and_chunks(
    s3_endpoint: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # S3's limit per DeleteObjects; smaller here to keep it quick.
    assert S3Backend.capabilities.delete_batch_size == s3.DELETE_CHUNK == 1000
    monkeypatch.setattr(
        S3Backend, "capabilities", replace(S3Backend.capabilities, delete_batch_size=4)
    )
    backend = S3Backend(f"s3://{s3_bucket}?endpoint_url={s3_endpoint}")
    await backend.connect()
    try:
        records = [Record(uuid4(), "Gone", b"{}", 1, now(), now()) for _ in range(3)]
        await backend.write_records(records)
        assert await backend.delete(records[0].id, "Gone") is True
        assert await backend.delete(records[0].id, "Gone") is False
        assert await backend.read_record("Gone", records[0].id) is None

        counts = track_in_flight(monkeypatch, backend._s3, ["delete_objects"])
        ids = [records[1].id, *(uuid4() for _ in range(8)), records[2].id, records[1].id]
        assert await backend.delete_records("Gone", ids) == 2  # duplicates count once
        assert counts["calls"] == 3  # 10 distinct keys in chunks of 4
        assert await backend.read_records("Gone", [r.id for r in records]) == [None] * 3
        assert await backend.delete_records("Gone", []) == 0
    finally:
        await backend.disconnect()


async def test_bad_class_names_are_refused_before_any_request(s3_url: str) -> None:
    backend = S3Backend(s3_url)  # never connected: a request would fail differently
    record = Record(uuid4(), "../escape", b"{}", 1, now(), now())
    with pytest.raises(StorageValidationError, match="invalid class name"):
        await backend.write_record(record)
    with pytest.raises(StorageValidationError, match="invalid class name"):
        await backend.write_records([record, record])
    with pytest.raises(StorageValidationError, match="invalid class name"):
        await backend.read_records("a/b", [uuid4(), uuid4()])


# --- URLs and options -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("s3://", "S3 URLs name a bucket"),
        ("s3:///prefix", "S3 URLs name a bucket"),
        ("s3://Bad_Bucket!/x", "invalid S3 bucket name 'Bad_Bucket!'"),
        ("s3://ab", "invalid S3 bucket name"),
        ("s3://-bucket", "invalid S3 bucket name"),
        ("s3://my..bucket", "invalid S3 bucket name"),
        ("s3://192.168.1.1", "invalid S3 bucket name"),
        ("s3://bucket/x?colour=red", "unknown S3 option.*colour"),
        ("s3://bucket/x#part", "no '#' fragment"),
        ("s3://bucket/x?region=a&region=b", "given twice"),
        ("s3://bucket/a//b", "invalid S3 key prefix"),
        ("s3://bucket/a/../b", "invalid S3 key prefix"),
        ("s3://bucket?max_concurrency=0", "max_concurrency must be an integer >= 1"),
        ("s3://bucket?max_concurrency=many", "max_concurrency must be an integer >= 1"),
        ("s3://bucket?timeout=-1", "timeout must be a positive number of seconds"),
        ("s3://bucket?max_size=1.5", "max_size must be an integer >= 1"),
        ("s3://bucket?endpoint_url=ftp://host", "invalid S3 option endpoint_url"),
        ("s3://bucket?endpoint_url=localhost:9000", "invalid S3 option endpoint_url"),
        ("s3://bucket?region=", "region must be a non-empty printable name"),
    ],
)
def test_invalid_urls_fail_at_class_definition(url: str, message: str) -> None:
    with pytest.raises(StorageValidationError, match=message) as caught:
        define_thing(url)
    assert ".Thing: " in str(caught.value)  # the model's qualified name leads the message


@pytest.mark.parametrize(
    "url",
    [
        "s3://AKIAEXAMPLE:hunter2secret@bucket/x",
        "s3://bucket/x?endpoint_url=http://admin:hunter2secret@localhost:9000",
    ],
)
def test_credentials_in_urls_are_refused_without_echo(url: str) -> None:
    with pytest.raises(StorageValidationError, match="credentials") as caught:
        define_thing(url)
    assert "hunter2secret" not in str(caught.value)
    assert "hunter2secret" not in repr(caught.value)


def test_options_from_query_and_keywords() -> None:
    backend = S3Backend(
        "s3://my-bucket/deep/prefix/?endpoint_url=http://localhost:9000&region=eu-west-1"
        "&profile=dev&max_concurrency=8&timeout=2.5&max_size=1000"
    )
    assert (backend.bucket, backend.prefix) == ("my-bucket", "deep/prefix")
    assert backend.endpoint_url == "http://localhost:9000"
    assert (backend.region, backend.profile) == ("eu-west-1", "dev")
    assert (backend.max_concurrency, backend.timeout, backend.max_size) == (8, 2.5, 1000)
    assert backend._key("Thing", UUID(int=1)) == (
        "deep/prefix/Thing/00000000-0000-0000-0000-000000000001.json"
    )

    overridden = S3Backend(
        "s3://my-bucket?region=eu-west-1&max_concurrency=8",
        region="us-west-2",
        max_concurrency=2,
        timeout=1,
    )
    assert (overridden.region, overridden.max_concurrency, overridden.timeout) == (
        "us-west-2",
        2,
        1.0,
    )
    assert overridden.prefix == ""
    assert (
        overridden._key("Thing", UUID(int=1)) == "Thing/00000000-0000-0000-0000-000000000001.json"
    )

    defaults = S3Backend("s3://my-bucket")
    assert (defaults.endpoint_url, defaults.region, defaults.profile) == (None, None, None)
    assert (defaults.max_concurrency, defaults.timeout, defaults.max_size) == (32, None, None)
    with pytest.raises(StorageValidationError, match="max_concurrency"):
        S3Backend("s3://my-bucket", max_concurrency=-3)


def test_unknown_profile_is_a_configuration_error(s3_endpoint: str, s3_bucket: str) -> None:
    backend = S3Backend(f"s3://{s3_bucket}?endpoint_url={s3_endpoint}&profile=no-such-profile")
    with pytest.raises(StorageValidationError, match="no-such-profile"):
        asyncio.run(backend.open())


# --- listing and purging --------------------------------------------------------------------


def aged(class_name: str, n: int, days: float, id: UUID | None = None) -> Record:
    """A record last updated ``days`` ago (a little more for higher ``n``: distinct times),
    with data of varying length, some of it past the 512 bytes a listing reads."""
    then = now() - dt.timedelta(days=days, microseconds=n)
    pad = "é" * (n % 7) + "x" * (n % 13 * 97)
    return Record(id or uuid4(), class_name, f'{{"n":{n},"pad":"{pad}"}}'.encode(), 1, then, then)


def raw_infos(endpoint: str, bucket: str, records: dict[UUID, Record]) -> set[RecordInfo]:
    """The listing boto3 sees of ``records``: the class from the key, the updated_at in the
    stored body, and the size of the model's JSON at the end of that body."""
    from concurrent.futures import ThreadPoolExecutor

    client = boto3_client(endpoint)
    keys = [
        (item["Key"], found[1], UUID(found[2]))
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for item in page.get("Contents", [])
        if (found := re.fullmatch(r"models/(\w+)/([0-9a-f-]{36})\.json", item["Key"]))
        and UUID(found[2]) in records
    ]

    def info(key: str, class_name: str, id: UUID) -> RecordInfo:
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert body.endswith(b',"data":' + records[id].data + b"}")
        updated_at = dt.datetime.fromisoformat(json.loads(body)["updated_at"])
        return RecordInfo(class_name, id, len(records[id].data), updated_at)

    with ThreadPoolExecutor(8) as pool:  # boto3 clients are thread-safe
        return set(pool.map(lambda key: info(*key), keys))


def track_gets(monkeypatch: pytest.MonkeyPatch, client: Any) -> dict[str, Any]:
    """Record the ranges asked of GetObject and the peak number of requests in flight."""
    seen: dict[str, Any] = {"ranges": [], "now": 0, "peak": 0}
    get_object = client.get_object

    async def wrapper(**kwargs: Any) -> Any:
        seen["ranges"].append(kwargs.get("Range"))
        seen["now"] += 1
        seen["peak"] = max(seen["peak"], seen["now"])
        try:
            return await get_object(**kwargs)
        finally:
            seen["now"] -= 1

    monkeypatch.setattr(client, "get_object", wrapper)
    return seen


@pytest.fixture
async def lister(
    s3_endpoint: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[S3Backend]:
    """A connected backend under ``models/`` with 5 requests in flight at most, listing 300
    keys a page (S3's 1,000 would make 1,200 records only two pages)."""
    monkeypatch.setattr(s3, "LIST_PAGE", 300)
    backend = S3Backend(f"s3://{s3_bucket}/models?endpoint_url={s3_endpoint}&max_concurrency=5")
    await backend.connect()
    yield backend
    await backend.disconnect()


async def test_scan_lists_every_record_from_ranged_reads(
    lister: S3Backend, s3_endpoint: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    alpha = [aged("Alpha", i, i / 1000) for i in range(700)]
    beta = [aged("Beta", i, i / 1000) for i in range(500)]
    await lister.write_records(alpha + beta)
    alpha[5] = aged("Alpha", 12, 0, alpha[5].id)  # rewritten: newer and larger
    await lister.write_record(alpha[5])
    records = {record.id: record for record in alpha + beta}
    assert any(len(encode_envelope(record)) > 1000 for record in alpha)

    # Objects that are not records: wrong names, nested, outside the prefix.
    client = boto3_client(s3_endpoint)
    id = uuid4()
    body = encode_envelope(aged("Alpha", 1, 1, id))
    for key in (
        "models/Alpha/not-a-uuid.json",
        f"models/Alpha/{id}.txt",
        f"models/Alpha/{id}",
        f"models/Alpha/sub/{id}.json",
        f"models/Alpha/{id.hex}.json",
        f"models/Alpha/{str(id).upper()}.json",
        f"models/bad name/{id}.json",
        f"models/{id}.json",
        "models/README",
        f"elsewhere/Alpha/{id}.json",
        f"modelsX/Alpha/{id}.json",
        f"Alpha/{id}.json",
    ):
        client.put_object(Bucket=s3_bucket, Key=key, Body=body)

    seen = track_gets(monkeypatch, lister._s3)
    everything = raw_infos(s3_endpoint, s3_bucket, records)
    for class_name, expected in (("Alpha", 700), ("Beta", 500), (None, 1200)):
        seen["ranges"].clear()
        listed = [info async for info in lister.scan_records(class_name)]
        assert len(listed) == expected
        assert len({info.id for info in listed}) == expected  # no record twice
        assert set(listed) == {i for i in everything if class_name in (None, i.class_name)}
        assert seen["ranges"] == ["bytes=0-511"] * expected  # one ranged read per record
    assert 1 < seen["peak"] <= 5
    assert [info async for info in lister.scan_records("Gamma")] == []
    by_id = {info.id: info for info in listed}
    assert by_id[alpha[5].id].updated_at == alpha[5].updated_at
    assert by_id[alpha[5].id].size == len(alpha[5].data) > 512


async def test_scan_without_prefix_lists_the_whole_bucket(s3_endpoint: str, s3_bucket: str) -> None:
    backend = S3Backend(f"s3://{s3_bucket}?endpoint_url={s3_endpoint}")
    await backend.connect()
    try:
        root = [aged("Root", i, 1) for i in range(3)]
        await backend.write_records(root)
        nested = S3Backend(f"s3://{s3_bucket}/deep/er?endpoint_url={s3_endpoint}")
        await nested.connect()
        try:
            await nested.write_records([aged("Root", 9, 1)])  # deep/er/Root/....json
            assert [i.id async for i in nested.scan_records()] != []
        finally:
            await nested.disconnect()
        boto3_client(s3_endpoint).put_object(Bucket=s3_bucket, Key="notes.txt", Body=b"hi")
        listed = {info async for info in backend.scan_records()}
        assert {(i.class_name, i.id, i.size) for i in listed} == {
            ("Root", r.id, len(r.data)) for r in root
        }
    finally:
        await backend.disconnect()


async def test_scan_while_deleting(lister: S3Backend, s3_endpoint: str, s3_bucket: str) -> None:
    records = [aged("Scan", i, 0) for i in range(1200)]
    await lister.write_records(records)
    ordered = sorted(record.id for record in records)  # key order is id order
    ahead = ordered[-200:]  # in a later page: deleted before the scan reaches it
    client = boto3_client(s3_endpoint)

    def delete(ids: list[UUID]) -> None:
        objects = [{"Key": f"models/Scan/{id}.json"} for id in ids]
        client.delete_objects(Bucket=s3_bucket, Delete={"Objects": objects})

    seen: list[UUID] = []
    async for info in lister.scan_records("Scan"):
        if not seen:
            delete(ahead)
        seen.append(info.id)
        if len(seen) % 100 == 0:  # what has been listed goes, a hundred at a time
            delete(seen[-100:])
    assert len(seen) % 100 == 0
    assert seen == ordered[:-200]
    assert boto3_client(s3_endpoint).list_objects_v2(Bucket=s3_bucket)["KeyCount"] == 0


async def test_scan_skips_objects_deleted_after_the_listing(
    lister: S3Backend, s3_endpoint: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = [aged("Gone", i, 0) for i in range(10)]
    await lister.write_records(records)
    gone = {records[2].id, records[7].id}
    list_objects_v2 = lister._s3.list_objects_v2

    async def list_then_delete(**kwargs: Any) -> Any:
        page = await list_objects_v2(**kwargs)
        for id in gone:
            boto3_client(s3_endpoint).delete_object(Bucket=s3_bucket, Key=f"models/Gone/{id}.json")
        return page

    monkeypatch.setattr(lister._s3, "list_objects_v2", list_then_delete)
    listed = [info async for info in lister.scan_records("Gone")]
    assert len(listed) == 10 - len(gone)  # listed, but gone before their header was read
    assert {info.id for info in listed} == {record.id for record in records} - gone


@pytest.mark.parametrize("body", [b"", b"{}", b"not json at all" * 60], ids=["empty", "{}", "junk"])
async def test_scan_reports_a_corrupt_record_naming_it(
    lister: S3Backend, s3_endpoint: str, s3_bucket: str, body: bytes
) -> None:
    await lister.write_records([aged("Thing", i, 0) for i in range(3)])
    id = uuid4()
    boto3_client(s3_endpoint).put_object(Bucket=s3_bucket, Key=f"models/Thing/{id}.json", Body=body)
    with pytest.raises(StorageValidationError, match=f"Thing record {id} is corrupt"):
        [info async for info in lister.scan_records("Thing")]


async def test_scan_failures_and_bad_names(
    lister: S3Backend, s3_endpoint: str, s3_bucket: str
) -> None:
    with pytest.raises(StorageValidationError, match="invalid class name"):
        [info async for info in lister.scan_records("../escape")]
    boto3_client(s3_endpoint).delete_bucket(Bucket=s3_bucket)
    with pytest.raises(StorageOperationError, match=r"could not list Thing records.*NoSuchBucket"):
        [info async for info in lister.scan_records("Thing")]


async def test_purge_deletes_old_records_in_batches(
    lister: S3Backend, s3_endpoint: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = [aged("Event", i, 40) for i in range(1100)]
    new = [aged("Event", i, 1) for i in range(150)]
    other = [aged("Other", i, 40) for i in range(200)]
    await lister.write_records(old + new + other)
    counts = track_in_flight(monkeypatch, lister._s3, ["delete_objects"])

    cutoff = now() - dt.timedelta(days=30)
    assert await lister.purge("Event", cutoff, batch_size=500) == 1100
    assert counts["calls"] == 3  # 500, 500, 100

    client = boto3_client(s3_endpoint)

    def ids(prefix: str) -> set[UUID]:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket, Prefix=prefix)
        return {
            UUID(item["Key"].removeprefix(prefix).removesuffix(".json"))
            for page in pages
            for item in page.get("Contents", [])
        }

    assert ids("models/Event/") == {record.id for record in new}
    assert ids("models/Other/") == {record.id for record in other}


async def test_purge_with_nothing_to_delete_returns_0(
    lister: S3Backend, s3_endpoint: str, s3_bucket: str
) -> None:
    cutoff = now() - dt.timedelta(days=30)
    assert await lister.purge("Event", cutoff) == 0  # an empty bucket
    await lister.write_records([aged("Event", i, 1) for i in range(10)])
    await lister.write_records([aged("Other", i, 40) for i in range(10)])
    assert await lister.purge("Event", cutoff) == 0
    assert await lister.purge("Missing", cutoff) == 0
    assert boto3_client(s3_endpoint).list_objects_v2(Bucket=s3_bucket)["KeyCount"] == 20
