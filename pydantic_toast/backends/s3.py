"""``s3://bucket/prefix``: one object per record, ``{prefix}/{ClassName}/{uuid}.json``.

Each object holds the record envelope (metadata, then the model's fields) as
``application/json``. One aiobotocore client is created on `connect` and shared by every
operation: creating a client loads botocore's service model and opens a connection pool, far
too costly per call. Endpoint, region and credentials come from the URL's options or, as any
botocore user expects, from the standard environment and config files (``AWS_ENDPOINT_URL``,
``AWS_REGION``/``AWS_DEFAULT_REGION``, ``AWS_PROFILE``, the credentials chain); the URL never
carries credentials.

S3 has no conditional "keep created_at" upsert, so a write stores the record as given: the
model layer already put the ``created_at`` it knows in it.

Listing pages through ListObjectsV2 (continuation tokens, nothing held on the server) and reads
each record's envelope header with a ranged GET of its first 512 bytes, a page at a time, with
at most ``max_concurrency`` requests in flight. `purge` deletes what the listing found old, with
one DeleteObjects per batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import math
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, NoReturn, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit
from uuid import UUID

import aiohttp
from aiobotocore.config import AioConfig  # type: ignore[import-untyped]
from aiobotocore.session import AioSession  # type: ignore[import-untyped]
from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

from pydantic_toast.backends.base import (
    HEAD_BYTES,
    Record,
    RecordInfo,
    StorageBackend,
    check_class_name,
    decode_envelope,
    decode_envelope_info,
    encode_envelope,
)
from pydantic_toast.errors import StorageConnectionError, StorageValidationError

__all__ = ["S3Backend"]

A = TypeVar("A")
T = TypeVar("T")

OPTIONS = ("endpoint_url", "region", "profile", "max_concurrency", "timeout", "max_size")
DEFAULT_MAX_CONCURRENCY = 32
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_READ_TIMEOUT = 30.0
# DeleteObjects takes at most 1,000 keys per request.
DELETE_CHUNK = 1000
# ListObjectsV2 returns at most 1,000 keys per page.
LIST_PAGE = 1000
# The envelope header (metadata before the model's fields) fits in the first 512 bytes.

# Today's bucket naming rules (AWS, MinIO): 3-63 lowercase letters, digits, "." and "-",
# starting and ending with a letter or digit, no "..", not an IPv4 address.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")
# What botocore, aiohttp and the socket layer raise when S3 cannot be reached or refuses a
# request. `asyncio.TimeoutError` is `TimeoutError`, an `OSError`.
_DRIVER_ERRORS = (BotoCoreError, ClientError, aiohttp.ClientError, OSError)
# The total size in a ranged GET's Content-Range: "bytes 0-511/12345".
_CONTENT_RANGE_TOTAL = re.compile(r"bytes \d+-\d+/(\d+)")


class S3Backend(StorageBackend):
    """Options (URL query or keyword arguments; keywords win):

    ``endpoint_url``
        A custom endpoint such as MinIO or LocalStack (``http://localhost:9000``); requests
        then use path-style addressing. Default: ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``,
        else AWS.
    ``region``
        Default: ``AWS_REGION``/``AWS_DEFAULT_REGION`` or the profile's region.
    ``profile``
        A named profile of the shared AWS config; default ``AWS_PROFILE``, else the chain.
    ``max_concurrency``
        Requests in flight for one batch, and the size of the connection pool (default 32).
    ``timeout``
        Seconds to connect and to wait for a response (default 5 to connect, 30 to read). A
        request that sends a body (a save, a delete) must also be done within the connect
        timeout plus the read timeout per started MiB of body plus one more.
    ``max_size``
        Refuse to read a stored object larger than this many bytes (default: no limit).
    """

    def __init__(
        self,
        url: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        profile: str | None = None,
        max_concurrency: int | None = None,
        timeout: float | None = None,
        max_size: int | None = None,
    ) -> None:
        super().__init__(url)
        parts = urlsplit(url)
        if parts.fragment:
            raise StorageValidationError("S3 URLs take no '#' fragment")
        self.bucket = _bucket_of(parts.netloc)
        prefix = unquote(parts.path).strip("/")
        if prefix and any(segment in ("", ".", "..") for segment in prefix.split("/")):
            raise StorageValidationError(
                f"invalid S3 key prefix {prefix!r}: no empty, '.' or '..' segments"
            )
        if any(ord(char) < 32 or ord(char) == 127 for char in prefix):
            raise StorageValidationError("invalid S3 key prefix: control characters")
        self.prefix = prefix
        self._key_base = f"{prefix}/" if prefix else ""

        options = _query_options(parts.query)
        given = {
            "endpoint_url": endpoint_url,
            "region": region,
            "profile": profile,
            "max_concurrency": max_concurrency,
            "timeout": timeout,
            "max_size": max_size,
        }
        options.update({key: value for key, value in given.items() if value is not None})
        self.endpoint_url = _endpoint(options.get("endpoint_url"))
        self.region = _name(options.get("region"), "region")
        self.profile = _name(options.get("profile"), "profile")
        self.max_concurrency = _number(
            options.get("max_concurrency"), "max_concurrency", int, DEFAULT_MAX_CONCURRENCY
        )
        self.timeout: float | None = _number(options.get("timeout"), "timeout", float, None)
        self.max_size: int | None = _number(options.get("max_size"), "max_size", int, None)

        self._stack: contextlib.AsyncExitStack | None = None
        self._s3: Any = None  # the aiobotocore client: untyped, so confined to this module

    # --- lifecycle ----------------------------------------------------------------------------

    async def connect(self) -> None:
        """Create the one client and check that the bucket exists, so a wrong bucket or an
        unreachable endpoint fails here, once, with a clear message."""
        if self._s3 is not None:
            return
        stack = contextlib.AsyncExitStack()
        try:
            client = await stack.enter_async_context(
                AioSession(profile=self.profile).create_client(
                    "s3",
                    endpoint_url=self.endpoint_url,
                    region_name=self.region,
                    config=self._config(),
                )
            )
        except _DRIVER_ERRORS as exc:  # e.g. an unknown profile
            await stack.aclose()
            raise StorageConnectionError(
                f"cannot create the S3 client: {type(exc).__name__}: {exc}", self.url
            ) from exc
        try:
            await client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            # HeadBucket needs s3:ListBucket, which a least-privilege role may lack while it
            # may get and put objects: a 403 is left for those calls to report, if real.
            if _status(exc) != 403:
                await stack.aclose()
                if _status(exc) == 404:
                    message = f"S3 bucket {self.bucket!r} does not exist at {_endpoint_of(client)}"
                else:
                    message = _cannot_open(self.bucket, client, exc)
                raise StorageConnectionError(message, self.url) from exc
        except _DRIVER_ERRORS as exc:
            await stack.aclose()
            raise StorageConnectionError(_cannot_open(self.bucket, client, exc), self.url) from exc
        except BaseException:
            await stack.aclose()
            raise
        self._s3, self._stack = client, stack

    async def disconnect(self) -> None:
        stack, self._stack, self._s3 = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    def _timeouts(self) -> tuple[float, float]:
        """Seconds to connect, and to wait for a response."""
        if self.timeout is None:
            return DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT
        return self.timeout, self.timeout

    def _config(self) -> Any:
        connect_timeout, read_timeout = self._timeouts()
        options: dict[str, Any] = {
            "connect_timeout": connect_timeout,
            "read_timeout": read_timeout,
            "max_pool_connections": self.max_concurrency,
        }
        # One attempt per call: the model layer retries connection failures (its `retries`
        # and `retry_backoff`), and botocore's own retries on top of those multiplied every
        # attempt (3 x 3, with backoffs of up to 3 s), so that `retries=0` was not off and a
        # refused connection took seconds. AWS_RETRY_MODE/AWS_MAX_ATTEMPTS still win.
        if not {"AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS"} & os.environ.keys():
            options["retries"] = {"mode": "standard", "total_max_attempts": 1}
        # S3-compatible servers are rarely reachable as bucket.host: use path-style there.
        if self.endpoint_url is not None or _endpoint_from_environment():
            options["s3"] = {"addressing_style": "path"}
        return AioConfig(**options)

    # --- records ------------------------------------------------------------------------------

    def _key(self, class_name: str, id: UUID) -> str:
        return f"{self._key_base}{check_class_name(class_name)}/{id}.json"

    @property
    def _client(self) -> Any:
        if self._s3 is None:
            raise StorageConnectionError("the S3 backend is not connected", self.url)
        return self._s3

    async def write_record(self, record: Record) -> None:
        key = self._key(record.class_name, record.id)
        body = encode_envelope(record)
        try:
            await self._sending(
                len(body),
                self._client.put_object(
                    Bucket=self.bucket, Key=key, Body=body, ContentType="application/json"
                ),
            )
        except _DRIVER_ERRORS as exc:
            self._fail(
                exc, f"cannot write {record.class_name} record {record.id}", [str(record.id)]
            )

    async def _sending(self, size: int, request: Awaitable[T]) -> T:
        """Await a request that sends a body of ``size`` bytes, within a deadline.

        aiohttp's read timeout only starts once the body is sent, and nothing bounds the
        sending: botocore asks for ``Expect: 100-continue`` and aiohttp waits for the
        ``100 Continue`` without a timeout, and a large body blocks on a server that stopped
        reading. So a stalled server hung a save forever. The deadline allows the connect
        timeout, then the read timeout for every started MiB of the body and once more for the
        response: a request that moves less than 1 MiB per read timeout fails.
        """
        connect, read = self._timeouts()
        deadline = connect + read * (1 + math.ceil(size / (1 << 20)))
        try:
            async with asyncio.timeout(deadline) as timer:
                return await request
        except TimeoutError:
            if not timer.expired():
                raise
            raise TimeoutError(
                f"no complete response from {_endpoint_of(self._s3)} within {deadline:g}s"
            ) from None

    async def read_record(self, class_name: str, id: UUID) -> Record | None:
        key = self._key(class_name, id)
        try:
            response = await self._client.get_object(Bucket=self.bucket, Key=key)
            async with response["Body"] as body:
                size = response.get("ContentLength")
                if self.max_size is not None and isinstance(size, int) and size > self.max_size:
                    raise StorageValidationError(
                        f"stored {class_name} record {id} is {size} bytes, "
                        f"more than max_size={self.max_size}"
                    )
                raw: bytes = await body.read()
        except ClientError as exc:
            if _code(exc) == "NoSuchKey":
                return None
            self._fail(exc, f"cannot read {class_name} record {id}")
        except _DRIVER_ERRORS as exc:
            self._fail(exc, f"cannot read {class_name} record {id}")
        return decode_envelope(raw, id, class_name)

    async def write_records(self, records: Sequence[Record]) -> None:
        """Concurrent PutObjects: each object is written whole or not at all, the batch is
        not atomic. A failure cancels the puts not yet done and names in ``failed_ids`` every
        record without a completed put."""
        for record in records:  # check every name before the first request
            check_class_name(record.class_name)
        written: set[UUID] = set()

        async def write(record: Record) -> None:
            await self.write_record(record)
            written.add(record.id)

        try:
            await self._each(write, records)
        except StorageConnectionError as exc:
            exc.failed_ids = list(dict.fromkeys(str(r.id) for r in records if r.id not in written))
            raise

    async def read_records(self, class_name: str, ids: Sequence[UUID]) -> list[Record | None]:
        check_class_name(class_name)
        return await self._each(lambda id: self.read_record(class_name, id), ids)

    async def delete_records(self, class_name: str, ids: Sequence[UUID]) -> int:
        """Delete every requested object; return how many of them existed.

        S3's DeleteObjects reports a key as deleted whether or not it existed, so the count
        comes from a HEAD of each key just before the delete. The delete itself covers every
        requested key, so none of them is left behind; only the count can miss an object
        another client writes or deletes between the two steps.
        """
        keys = list(dict.fromkeys(self._key(class_name, id) for id in ids))
        existed = sum(await self._each(self._exists, keys))
        await self._delete_keys(class_name, keys)
        return existed

    async def _delete_keys(self, class_name: str, keys: Sequence[str]) -> None:
        """DeleteObjects for every key, `DELETE_CHUNK` keys a request."""
        for start in range(0, len(keys), DELETE_CHUNK):
            chunk = keys[start : start + DELETE_CHUNK]
            try:
                response = await self._sending(
                    sum(len(key) + 40 for key in chunk),  # the XML body, roughly
                    self._client.delete_objects(
                        Bucket=self.bucket,
                        Delete={"Objects": [{"Key": key} for key in chunk], "Quiet": True},
                    ),
                )
            except _DRIVER_ERRORS as exc:
                self._fail(exc, f"cannot delete {class_name} records")
            errors = response.get("Errors") or []
            if errors:
                first = errors[0]
                raise StorageConnectionError(
                    f"cannot delete {len(errors)} {class_name} record(s), first "
                    f"{first.get('Key')!r}: {first.get('Code')}: {first.get('Message')}",
                    self.url,
                )

    async def purge(self, class_name: str, before: datetime, *, batch_size: int = 500) -> int:
        """Scan the class and delete its records last updated before ``before``, one
        DeleteObjects per ``batch_size`` of them.

        Unlike `delete_records`, no HEAD request counts them: the scan has just read each
        one's header, so each deleted key is counted as existing. A record another client
        deletes between the scan and the delete is still counted; one it re-saves in that
        window is still deleted (S3 has no conditional DeleteObjects everywhere).
        """
        check_class_name(class_name)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, not {batch_size!r}")
        deleted = 0
        doomed: list[str] = []
        async for info in self.scan_records(class_name):
            if info.updated_at < before:
                doomed.append(self._key(class_name, info.id))
                if len(doomed) >= batch_size:
                    await self._delete_keys(class_name, doomed)
                    deleted, doomed = deleted + len(doomed), []
        if doomed:
            await self._delete_keys(class_name, doomed)
            deleted += len(doomed)
        return deleted

    async def scan_records(self, class_name: str | None = None) -> AsyncIterator[RecordInfo]:
        """Every record under ``{prefix}/{class_name}/`` (or the whole prefix), page by page.

        Keys that are not ``{ClassName}/{uuid}.json`` under the prefix are not records and are
        skipped, as are objects deleted between the listing and the read. An object under a
        record key that holds no envelope is a `StorageValidationError` naming it.
        """
        base = self._key_base
        if class_name is not None:
            base += check_class_name(class_name) + "/"
        token: str | None = None
        while True:
            request: dict[str, Any] = {"Bucket": self.bucket, "Prefix": base, "MaxKeys": LIST_PAGE}
            if token is not None:
                request["ContinuationToken"] = token
            try:
                page = await self._client.list_objects_v2(**request)
            except _DRIVER_ERRORS as exc:
                self._fail(exc, f"cannot list {class_name or 'the'} records")
            found = [
                (item["Key"], parsed, item.get("Size"))
                for item in page.get("Contents") or []
                if (parsed := self._parse_key(item["Key"])) is not None
            ]
            for info in await self._each(self._head_info, found):
                if info is not None:
                    yield info
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    def _parse_key(self, key: str) -> tuple[str, UUID] | None:
        """``(class_name, id)`` of a record key, or ``None`` for any other key."""
        if not key.startswith(self._key_base):
            return None
        name, slash, file = key[len(self._key_base) :].partition("/")
        stem = file.removesuffix(".json")
        if not slash or stem == file or "/" in stem:
            return None
        try:
            id = UUID(stem)
            check_class_name(name)
        except (ValueError, StorageValidationError):
            return None
        # Only the canonical spelling `_key` writes: "{ABC...}" or hex without dashes is not ours.
        return (name, id) if str(id) == stem else None

    async def _head_info(
        self, listed: tuple[str, tuple[str, UUID], int | None]
    ) -> RecordInfo | None:
        """The listing view of one object, from a ranged GET of its envelope header; ``None``
        when the object is gone."""
        key, (class_name, id), listed_size = listed
        try:
            response = await self._client.get_object(
                Bucket=self.bucket, Key=key, Range=f"bytes=0-{HEAD_BYTES - 1}"
            )
            async with response["Body"] as body:
                head: bytes = await body.read()
        except ClientError as exc:
            if _code(exc) == "NoSuchKey":
                return None  # deleted since the listing
            if _code(exc) == "InvalidRange":  # an empty object
                raise StorageValidationError(
                    f"stored {class_name} record {id} is corrupt: object {key!r} is empty"
                ) from exc
            self._fail(exc, f"cannot read {class_name} record {id}")
        except _DRIVER_ERRORS as exc:
            self._fail(exc, f"cannot read {class_name} record {id}")
        # The size of the very object whose header was read (it may have been rewritten since
        # the listing) is in Content-Range; a server that ignores Range sends the whole object.
        total = _CONTENT_RANGE_TOTAL.fullmatch(str(response.get("ContentRange") or ""))
        if total is not None:
            size = int(total[1])
        elif response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 200:
            size = len(head)
        else:
            size = listed_size if isinstance(listed_size, int) else len(head)
        try:
            info = decode_envelope_info(head, id, size)
        except StorageValidationError as exc:
            raise StorageValidationError(
                f"stored {class_name} record {id} is corrupt: object {key!r} does not start"
                " with a pydantic-toast envelope header"
            ) from exc
        # Listed under the class its key names, which is the class that reads and deletes it.
        return RecordInfo(class_name, id, info.size, info.updated_at)

    async def _exists(self, key: str) -> bool:
        try:
            await self._client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _status(exc) == 404:
                return False
            self._fail(exc, f"cannot check object {key!r}")
        except _DRIVER_ERRORS as exc:
            self._fail(exc, f"cannot check object {key!r}")
        return True

    # --- helpers ------------------------------------------------------------------------------

    async def _each(self, operation: Callable[[A], Awaitable[T]], items: Sequence[A]) -> list[T]:
        """Run ``operation`` on every item with at most `max_concurrency` in flight, in order.

        A fixed set of workers pulls items, so a batch of 100,000 makes `max_concurrency`
        tasks, not 100,000; on the first failure the other workers are cancelled.
        """
        if len(items) <= 1:
            return [await operation(item) for item in items]
        results: dict[int, T] = {}
        pending = iter(range(len(items)))

        async def worker() -> None:
            for index in pending:
                results[index] = await operation(items[index])

        tasks = [
            asyncio.create_task(worker()) for _ in range(min(self.max_concurrency, len(items)))
        ]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)
            raise
        return [results[index] for index in range(len(items))]

    def _fail(self, exc: BaseException, what: str, failed_ids: Sequence[str] = ()) -> NoReturn:
        """Raise the driver's failure as ours, naming the bucket; the driver's is the cause."""
        raise StorageConnectionError(
            f"{what} in S3 bucket {self.bucket!r}: {type(exc).__name__}: {exc}",
            self.url,
            failed_ids=failed_ids,
        ) from exc


def _bucket_of(netloc: str) -> str:
    if not netloc:
        raise StorageValidationError("S3 URLs name a bucket: s3://bucket or s3://bucket/prefix")
    if "@" in netloc:
        raise StorageValidationError(
            "S3 URLs carry no credentials: they come from the AWS environment, config files "
            "or the profile option"
        )
    if _BUCKET.fullmatch(netloc) is None or ".." in netloc or _is_ip_address(netloc):
        raise StorageValidationError(
            f"invalid S3 bucket name {netloc[:80]!r}: 3-63 lowercase letters, digits, '.' and "
            "'-', starting and ending with a letter or digit"
        )
    return netloc


def _is_ip_address(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def _query_options(query: str) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key in options:
            raise StorageValidationError(f"S3 option {key!r} is given twice")
        options[key] = value
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise StorageValidationError(
            f"unknown S3 option(s): {', '.join(sorted(unknown))}; "
            f"known options: {', '.join(OPTIONS)}"
        )
    return options


def _endpoint(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise StorageValidationError(f"S3 endpoint_url must be a string, not {value!r}")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - parsing the port validates it
    except ValueError as exc:
        raise StorageValidationError(f"invalid S3 endpoint_url: {exc}") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise StorageValidationError(
            f"invalid S3 endpoint_url {value[:80]!r}: expected http(s)://host[:port]"
        )
    if "@" in parts.netloc:
        raise StorageValidationError(
            "the S3 endpoint_url must not carry credentials: they come from the AWS "
            "environment, config files or the profile option"
        )
    return value


def _name(value: object, option: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or not value.isprintable():
        raise StorageValidationError(f"S3 {option} must be a non-empty name, not {value!r}")
    return value


def _number(value: object, option: str, kind: type[T], default: T) -> T:
    if value is None:
        return default
    try:
        if isinstance(value, bool):
            raise ValueError("not a number")
        number = kind(value)  # type: ignore[call-arg]
        if not number > 0:  # type: ignore[operator]
            raise ValueError("must be positive")
    except (TypeError, ValueError, OverflowError) as exc:
        raise StorageValidationError(
            f"S3 {option} must be a positive {kind.__name__}, not {value!r}"
        ) from exc
    return number


def _endpoint_from_environment() -> bool:
    ignored = os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() == "true"
    return not ignored and bool(
        os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    )


def _code(exc: Any) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: Any) -> int | None:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status if isinstance(status, int) else None


def _cannot_open(bucket: str, client: Any, exc: BaseException) -> str:
    return (
        f"cannot reach S3 bucket {bucket!r} at {_endpoint_of(client)}: {type(exc).__name__}: {exc}"
    )


def _endpoint_of(client: Any) -> str:
    """The endpoint botocore resolved (or was given), for messages."""
    try:
        return str(client.meta.endpoint_url)
    except AttributeError:
        return "the default S3 endpoint"
