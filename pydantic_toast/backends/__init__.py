"""The plug-in API: what a storage backend is made of.

Built-in backends are imported on first use of their scheme (see `pydantic_toast._registry`),
so a driver is only needed when its scheme is used. A backend subclasses `StorageBackend`,
implements its primitives (or the four methods ``connect``, ``disconnect``, ``save`` and
``load``), declares its `Capabilities` and its options as a `BackendOptions` model.
"""

from pydantic_toast.backends.base import Capabilities, StorageBackend
from pydantic_toast.backends.options import BackendOptions, Count, Seconds, StorageURL
from pydantic_toast.backends.records import (
    HEAD_BYTES,
    Record,
    RecordInfo,
    StoredInfo,
    StoredRow,
    encode_envelope,
)

__all__ = [
    "HEAD_BYTES",
    "BackendOptions",
    "Capabilities",
    "Count",
    "Record",
    "RecordInfo",
    "Seconds",
    "StorageBackend",
    "StorageURL",
    "StoredInfo",
    "StoredRow",
    "encode_envelope",
]
