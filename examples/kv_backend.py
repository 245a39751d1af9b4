"""A backend on the spine: primitives, capabilities and typed options, nothing else.

The store here is a dict of bytes (think of any key-value service); the library does the
rest: name and id checks, batching, keeping `created_at`, class filtering, decoding what was
read, and mapping failures to its errors. It runs as is, and `mypy --strict` checks it:
    python examples/kv_backend.py
"""

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import ClassVar
from uuid import UUID

from pydantic_toast import ExternalBaseModel, ExternalConfigDict, register_backend
from pydantic_toast.backends import (
    HEAD_BYTES,
    BackendOptions,
    Capabilities,
    Count,
    Record,
    Seconds,
    StorageBackend,
    StoredInfo,
    encode_envelope,
)


class KVOptions(BackendOptions):
    """``kv://name?timeout=2.5&max_keys=1000``, or the same as keyword arguments."""

    label = "kv"
    timeout: Seconds = 5.0
    max_keys: Count = 100_000


class KVBackend(StorageBackend):
    options_model = KVOptions
    options: KVOptions  # what `self.options` is, for type checkers
    capabilities = Capabilities(delete=True, scan=True, batch_size=500, concurrency=4)

    stores: ClassVar[dict[str, dict[str, bytes]]] = {}

    def __init__(self, url: str, **options: object) -> None:
        super().__init__(url, **options)  # parses the URL and the options
        self.name = self.location.netloc

    async def connect(self) -> None:
        self.data = self.stores.setdefault(self.name, {})

    async def disconnect(self) -> None:
        pass

    def key(self, class_name: str, id: UUID) -> str:
        return f"{class_name}:{id}"  # the spine checked both

    async def get_many(self, class_name: str, ids: Sequence[UUID]) -> list[bytes | None]:
        # Envelopes (encode_envelope) as bytes; rows (StoredRow) and dicts are decoded too.
        return [self.data.get(self.key(class_name, id)) for id in ids]

    async def put_many(self, records: Sequence[Record]) -> None:
        # Without keeps_created_at, the spine has set each record's created_at already.
        if len(self.data) + len(records) > self.options.max_keys:
            raise OSError("the store is full")  # a permanent StorageOperationError
        for record in records:
            self.data[self.key(record.class_name, record.id)] = encode_envelope(record)

    async def delete_many(self, class_name: str, ids: Sequence[UUID]) -> int:
        keys = [self.key(class_name, id) for id in ids]
        return sum(self.data.pop(key, None) is not None for key in keys)

    async def scan(self, class_name: str | None) -> AsyncIterator[StoredInfo]:
        for key, value in list(self.data.items()):
            name, _, id = key.partition(":")
            if class_name is None or name == class_name:
                yield StoredInfo(UUID(id), name, len(value), None, value[:HEAD_BYTES])

    def is_transient(self, exc: BaseException) -> bool:
        return isinstance(exc, TimeoutError)  # what a retry can cure


register_backend("kv", KVBackend)


class Note(ExternalBaseModel):
    model_config = ExternalConfigDict(storage="kv://notes?timeout=2.5")

    text: str


async def main() -> None:
    references = await Note.save_external_many([Note(text=f"note {i}") for i in range(3)])
    loaded = await Note.load_external_many(references)
    print("saved and loaded:", [note.text for note in loaded])
    metadata = loaded[0].external_metadata
    assert metadata is not None and isinstance(metadata.created_at, datetime)
    print("deleted:", await Note.delete_external_many(references[:1]))
    print("purged:", await Note.purge_external(older_than=3600))  # none is an hour old


asyncio.run(main())
