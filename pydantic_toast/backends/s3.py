"""``s3://bucket/prefix``: one object per record, ``{prefix}/{ClassName}/{uuid}.json``.

Each object holds the record envelope (metadata, then the model's fields) as
``application/json``. One aiobotocore client is created on `connect` and shared by every
operation: creating a client loads botocore's service model and opens a connection pool, far
too costly per call. Endpoint, region and credentials come from the URL's options or, as any
botocore user expects, from the standard environment and config files (``AWS_ENDPOINT_URL``,
``AWS_REGION``/``AWS_DEFAULT_REGION``, ``AWS_PROFILE``, the credentials chain); the URL never
carries credentials.

A first save is a conditional PutObject (``If-None-Match: *``): when an object is already
there, the spine reads its ``created_at`` and the save overwrites it keeping that (not
atomically: S3 has no conditional "keep this field" write).

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
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Annotated, Any, TypeVar
from urllib.parse import urlsplit
from uuid import UUID

import aiohttp
from aiobotocore.config import AioConfig  # type: ignore[import-untyped]
from aiobotocore.session import AioSession  # type: ignore[import-untyped]
from botocore import exceptions as boto_errors  # type: ignore[import-untyped]
from botocore.exceptions import ClientError  # type: ignore[import-untyped]
from pydantic import AfterValidator, Field

from pydantic_toast._errors import StorageOperationError, StorageValidationError
from pydantic_toast.backends.base import Capabilities, StorageBackend
from pydantic_toast.backends.options import BackendOptions, Count, Seconds
from pydantic_toast.backends.records import (
    HEAD_BYTES,
    Record,
    StoredInfo,
    check_class_name,
    encode_envelope,
    holds_unchanged,
)

__all__ = ["S3Backend"]

T = TypeVar("T")

DEFAULT_MAX_CONCURRENCY = 32
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_READ_TIMEOUT = 30.0
# DeleteObjects takes at most 1,000 keys per request.
DELETE_CHUNK = 1000
# ListObjectsV2 returns at most 1,000 keys per page.
LIST_PAGE = 1000

# Today's bucket naming rules (AWS, MinIO): 3-63 lowercase letters, digits, "." and "-",
# starting and ending with a letter or digit, no "..", not an IPv4 address.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")
# The total size in a ranged GET's Content-Range: "bytes 0-511/12345".
_CONTENT_RANGE_TOTAL = re.compile(r"bytes \d+-\d+/(\d+)")
# Failures that go away by themselves: no connection, a timeout, a connection cut, and the
# server asking to slow down or failing inside (5xx).
_TRANSIENT = (
    boto_errors.EndpointConnectionError,
    boto_errors.ConnectionClosedError,
    boto_errors.ReadTimeoutError,
    boto_errors.ConnectTimeoutError,
    boto_errors.ResponseStreamingError,
    aiohttp.ClientConnectionError,
    aiohttp.ServerTimeoutError,
    aiohttp.ClientPayloadError,
)
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "RequestTimeout",
        "Throttling",
        "ThrottlingException",
        "InternalError",
        "ServiceUnavailable",
        "RequestTimeTooSkewed",
    }
)


def _endpoint(value: str) -> str:
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - parsing the port validates it
    except ValueError as exc:
        raise ValueError(f"not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected http(s)://host[:port]")
    if "@" in parts.netloc:
        raise ValueError(
            "it must not carry credentials: they come from the AWS environment, config files "
            "or the profile option"
        )
    return value


#: A non-empty printable name (a region, a profile).
Name = Annotated[
    str, Field(pattern=r"^[^\x00-\x1f\x7f]+$", description="a non-empty printable name")
]


class S3Options(BackendOptions):
    label = "S3"

    endpoint_url: Annotated[str, AfterValidator(_endpoint)] | None = None
    region: Name | None = None
    profile: Name | None = None
    max_concurrency: Count = DEFAULT_MAX_CONCURRENCY
    timeout: Seconds | None = None
    max_size: Count | None = None


class S3Backend(StorageBackend):
    """Options (URL query or keyword arguments):

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

    options_model = S3Options
    options: S3Options
    capabilities = Capabilities(
        delete=True,
        scan=True,
        put_if_absent=True,
        conditional_write=True,
        batch_size=1,
        delete_batch_size=DELETE_CHUNK,
        concurrency=DEFAULT_MAX_CONCURRENCY,
    )

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url, **options)
        location = self.location
        if location.fragment:
            raise StorageValidationError("S3 URLs take no '#' fragment")
        if location.username is not None or location.password is not None:
            raise StorageValidationError(
                "S3 URLs carry no credentials: they come from the AWS environment, config "
                "files or the profile option"
            )
        self.bucket = _bucket_of(location.netloc)
        prefix = location.unquoted_path.strip("/")
        if prefix and any(segment in ("", ".", "..") for segment in prefix.split("/")):
            raise StorageValidationError(
                f"invalid S3 key prefix {prefix!r}: no empty, '.' or '..' segments"
            )
        if any(ord(char) < 32 or ord(char) == 127 for char in prefix):
            raise StorageValidationError("invalid S3 key prefix: control characters")
        self.prefix = prefix
        self._key_base = f"{prefix}/" if prefix else ""
        self.endpoint_url = self.options.endpoint_url
        self.region = self.options.region
        self.profile = self.options.profile
        self.max_concurrency = self.options.max_concurrency
        self.timeout = self.options.timeout
        self.max_size = self.options.max_size
        self.capabilities = replace(self.capabilities, concurrency=self.max_concurrency)

        self._stack: contextlib.AsyncExitStack | None = None
        self._s3: Any = None  # the aiobotocore client: untyped, so confined to this module

    @property
    def where(self) -> str:
        return f"S3 bucket {self.bucket!r}"

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
        except BaseException:  # e.g. an unknown profile
            await stack.aclose()
            raise
        try:
            await client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            # HeadBucket needs s3:ListBucket, which a least-privilege role may lack while it
            # may get and put objects: a 403 is left for those calls to report, if real.
            if _status(exc) != 403:
                await stack.aclose()
                if _status(exc) == 404:
                    raise StorageOperationError(
                        f"S3 bucket {self.bucket!r} does not exist at {_endpoint_of(client)}",
                        self.url,
                    ) from exc
                raise
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
        return f"{self._key_base}{class_name}/{id}.json"

    @property
    def _client(self) -> Any:
        if self._s3 is None:
            raise self.closed()
        return self._s3

    async def put_many(self, records: Sequence[Record]) -> None:
        for record in records:  # one record per call (batch_size 1); the spine runs many
            await self._put_object(record)

    async def put_new(self, records: Sequence[Record]) -> list[bool]:
        return [await self._put_object(record, only_new=True) for record in records]

    async def put_unchanged(
        self, records: Sequence[Record], expected: Sequence[datetime]
    ) -> list[bool]:
        """Read the object and its ETag; if it holds the record as expected, put the new
        one with ``If-Match`` on that ETag, so that S3 refuses it (412) when another save
        replaced the object in between."""
        written = []
        for record, updated_at in zip(records, expected, strict=True):
            found = await self._get_object(record.class_name, record.id)
            if found is None or not holds_unchanged(found[0], record, updated_at):
                written.append(False)
                continue
            written.append(await self._put_object(record, if_match=found[1]))
        return written

    async def _put_object(
        self, record: Record, *, only_new: bool = False, if_match: str | None = None
    ) -> bool:
        body = encode_envelope(record)
        request: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": self._key(record.class_name, record.id),
            "Body": body,
            "ContentType": "application/json",
        }
        if only_new:
            request["IfNoneMatch"] = "*"
        if if_match is not None:
            request["IfMatch"] = if_match
        try:
            await self._sending(len(body), self._client.put_object(**request))
        except ClientError as exc:
            # 412: the object changed since it was read; 404: it was deleted; 409: another
            # conditional write to the key is under way.
            if if_match is not None and _status(exc) in (404, 409, 412):
                return False
            # 412: an object is there already; 409: another conditional write to the key is
            # under way. Either way the key is taken: the spine keeps its created_at.
            if only_new and _status(exc) in (409, 412):
                return False
            raise
        return True

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

    async def get_many(self, class_name: str, ids: Sequence[UUID]) -> list[bytes | None]:
        return [await self._get(class_name, id) for id in ids]

    async def _get(self, class_name: str, id: UUID) -> bytes | None:
        found = await self._get_object(class_name, id)
        return None if found is None else found[0]

    async def _get_object(self, class_name: str, id: UUID) -> tuple[bytes, str] | None:
        """The object's bytes and its ETag, or ``None``."""
        try:
            response = await self._client.get_object(
                Bucket=self.bucket, Key=self._key(class_name, id)
            )
        except ClientError as exc:
            if _code(exc) == "NoSuchKey":
                return None
            raise
        async with response["Body"] as body:
            size = response.get("ContentLength")
            if self.max_size is not None and isinstance(size, int) and size > self.max_size:
                raise StorageValidationError(
                    f"stored {class_name} record {id} is {size} bytes, "
                    f"more than max_size={self.max_size}"
                )
            raw: bytes = await body.read()
        return raw, response["ETag"]

    async def delete_many(self, class_name: str, ids: Sequence[UUID]) -> int:
        """Delete every requested object (one DeleteObjects, up to 1,000 keys); return how
        many of them existed.

        S3's DeleteObjects reports a key as deleted whether or not it existed, so the count
        comes from a HEAD of each key just before the delete. The delete itself covers every
        requested key, so none of them is left behind; only the count can miss an object
        another client writes or deletes between the two steps.
        """
        keys = [self._key(class_name, id) for id in ids]
        gate = asyncio.Semaphore(self.max_concurrency)

        async def exists(key: str) -> bool:
            async with gate:
                return await self._exists(key)

        existed = sum(await asyncio.gather(*(exists(key) for key in keys)))
        await self._delete_keys(class_name, keys)
        return existed

    async def _delete_keys(self, class_name: str, keys: Sequence[str]) -> None:
        response = await self._sending(
            sum(len(key) + 40 for key in keys),  # the XML body, roughly
            self._client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": key} for key in keys], "Quiet": True},
            ),
        )
        errors = response.get("Errors") or []
        if errors:
            first = errors[0]
            raise StorageOperationError(
                f"cannot delete {len(errors)} {class_name} record(s), first "
                f"{first.get('Key')!r}: {first.get('Code')}: {first.get('Message')}",
                self.url,
            )

    async def scan(self, class_name: str | None) -> AsyncIterator[StoredInfo]:
        """Every record under ``{prefix}/{class_name}/`` (or the whole prefix), page by page.

        Keys that are not ``{ClassName}/{uuid}.json`` under the prefix are not records and are
        skipped, as are objects deleted between the listing and the read. Each page's headers
        come from ranged GETs of their first 512 bytes, at most ``max_concurrency`` at once.
        """
        base = self._key_base
        if class_name is not None:
            base += class_name + "/"
        gate = asyncio.Semaphore(self.max_concurrency)

        async def head(listed: tuple[str, tuple[str, UUID], int | None]) -> StoredInfo | None:
            async with gate:
                return await self._head_info(listed)

        token: str | None = None
        while True:
            request: dict[str, Any] = {"Bucket": self.bucket, "Prefix": base, "MaxKeys": LIST_PAGE}
            if token is not None:
                request["ContinuationToken"] = token
            page = await self._client.list_objects_v2(**request)
            found = [
                (item["Key"], parsed, item.get("Size"))
                for item in page.get("Contents") or []
                if (parsed := self._parse_key(item["Key"])) is not None
            ]
            for info in await asyncio.gather(*(head(listed) for listed in found)):
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
    ) -> StoredInfo | None:
        """The listing entry of one object, from a ranged GET of its envelope header; ``None``
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
                return StoredInfo(id, class_name, 0, None, b"")
            raise
        # The size of the very object whose header was read (it may have been rewritten since
        # the listing) is in Content-Range; a server that ignores Range sends the whole object.
        total = _CONTENT_RANGE_TOTAL.fullmatch(str(response.get("ContentRange") or ""))
        if total is not None:
            size = int(total[1])
        elif response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 200:
            size = len(head)
        else:
            size = listed_size if isinstance(listed_size, int) else len(head)
        return StoredInfo(id, class_name, size, None, head)

    async def _exists(self, key: str) -> bool:
        try:
            await self._client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _status(exc) == 404:
                return False
            raise
        return True

    def invalid(self, exc: BaseException) -> bool:
        # Configuration botocore cannot use: the fault is the caller's, not the store's.
        return isinstance(exc, boto_errors.ProfileNotFound | boto_errors.NoCredentialsError)

    def is_transient(self, exc: BaseException) -> bool:
        if isinstance(exc, ClientError):
            status = _status(exc)
            return _code(exc) in _TRANSIENT_CODES or (status is not None and status >= 500)
        return isinstance(exc, _TRANSIENT) or super().is_transient(exc)


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


def _endpoint_of(client: Any) -> str:
    """The endpoint botocore resolved (or was given), for messages."""
    try:
        return str(client.meta.endpoint_url)
    except AttributeError:
        return "the default S3 endpoint"
