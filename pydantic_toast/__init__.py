"""pydantic-toast: store Pydantic models out of line and pass tiny references instead."""

from pydantic_toast.backends.base import StorageBackend
from pydantic_toast.bridge import aclose, close
from pydantic_toast.errors import (
    CorruptRecordError,
    ExternalStorageError,
    RecordNotFoundError,
    StorageConnectionError,
    StorageOperationError,
    StorageValidationError,
    UnsupportedOperationError,
)
from pydantic_toast.external import (
    External,
    ExternalField,
    dump,
    dump_json,
    dump_json_sync,
    dump_sync,
    validate,
    validate_sync,
)
from pydantic_toast.model import (
    ExternalBaseModel,
    ExternalConfigDict,
    ExternalMetadata,
    ExternalNameWarning,
    ExternalReference,
)
from pydantic_toast.registry import register_backend

__all__ = [
    "CorruptRecordError",
    "External",
    "ExternalBaseModel",
    "ExternalConfigDict",
    "ExternalField",
    "ExternalMetadata",
    "ExternalNameWarning",
    "ExternalReference",
    "ExternalStorageError",
    "RecordNotFoundError",
    "StorageBackend",
    "StorageConnectionError",
    "StorageOperationError",
    "StorageValidationError",
    "UnsupportedOperationError",
    "aclose",
    "close",
    "dump",
    "dump_json",
    "dump_json_sync",
    "dump_sync",
    "register_backend",
    "validate",
    "validate_sync",
]
