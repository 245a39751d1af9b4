"""Storage backends: one module per engine, each moving JSON records by id.

Built-in backends are imported on first use of their scheme (see `pydantic_toast.registry`),
so a driver is only needed when its scheme is used.
"""

from pydantic_toast.backends.base import Record, StorageBackend

__all__ = ["Record", "StorageBackend"]
