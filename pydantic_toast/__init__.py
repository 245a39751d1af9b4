"""pydantic-toast: store Pydantic models out of line and pass tiny references instead."""

import importlib.metadata as _metadata

from pydantic_toast._bridge import aclose, close
from pydantic_toast._config import ExternalConfigDict, ExternalNameWarning
from pydantic_toast._crypto import Keyring, use_keyring
from pydantic_toast._errors import (
    CorruptRecordError,
    ExternalStorageError,
    RecordNotFoundError,
    StorageConnectionError,
    StorageOperationError,
    StorageValidationError,
    UnsupportedOperationError,
)
from pydantic_toast._external import (
    External,
    ExternalField,
    dump,
    dump_json,
    dump_json_sync,
    dump_sync,
    validate,
    validate_sync,
)
from pydantic_toast._gc import GarbageReport, collect_garbage, collect_garbage_sync
from pydantic_toast._model import ExternalBaseModel, ExternalMetadata
from pydantic_toast._references import ExternalReference
from pydantic_toast._registry import register_backend
from pydantic_toast._rekey import RekeyReport, rekey, rekey_sync
from pydantic_toast.backends.base import StorageBackend

try:
    # The version lives in pyproject.toml alone; installed metadata carries it here.
    __version__ = _metadata.version("pydantic-toast")
except _metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

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
    "GarbageReport",
    "Keyring",
    "RecordNotFoundError",
    "RekeyReport",
    "StorageBackend",
    "StorageConnectionError",
    "StorageOperationError",
    "StorageValidationError",
    "UnsupportedOperationError",
    "aclose",
    "close",
    "collect_garbage",
    "collect_garbage_sync",
    "dump",
    "dump_json",
    "dump_json_sync",
    "dump_sync",
    "register_backend",
    "rekey",
    "rekey_sync",
    "use_keyring",
    "validate",
    "validate_sync",
]
