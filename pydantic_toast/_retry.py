"""Retries of idempotent operations after transient connection failures.

Everything the model layer asks of a backend is idempotent: a load, an upsert by an id chosen
before the first attempt, a delete. So when one fails with `StorageConnectionError` (a server
restarting, a connection dropped), trying again a bounded number of times, with exponential
backoff and jitter, turns a blip into a delay instead of an error. A failure that outlasts the
retries is raised as it was.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from pydantic_toast._errors import StorageConnectionError
from pydantic_toast._registry import get_backend, live_backend
from pydantic_toast.backends.base import StorageBackend

if TYPE_CHECKING:
    from pydantic_toast._telemetry import Operation

__all__ = ["RetryPolicy", "with_backend"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``retries`` more attempts after the first, waiting ``backoff`` seconds, then twice
    that, and so on (each with up to 50% random jitter); ``retries=0`` turns retrying off."""

    retries: int = 2
    backoff: float = 0.05

    def delay(self, attempt: int) -> float:
        return self.backoff * 2.0**attempt * (1 + random.random() / 2)


DEFAULT_RETRY_POLICY = RetryPolicy()


async def with_backend(
    storage: str,
    operation: Callable[[StorageBackend], Awaitable[T]],
    policy: RetryPolicy = DEFAULT_RETRY_POLICY,
    observed: Operation | None = None,
) -> T:
    """Run ``operation`` on the live backend of ``storage``, retrying connection failures
    (connecting included) as ``policy`` allows; each retry is counted on ``observed``."""
    attempt = 0
    while True:
        try:
            backend = live_backend(storage)
            if backend is None:
                backend = await get_backend(storage)
            return await operation(backend)
        except StorageConnectionError:
            if attempt >= policy.retries:
                raise
            if observed is not None:
                observed.retried()
            await asyncio.sleep(policy.delay(attempt))
            attempt += 1
