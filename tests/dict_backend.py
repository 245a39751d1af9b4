"""A custom backend with only the four required methods, used to prove that such a backend
gets every feature through the base class's defaults."""

from __future__ import annotations

import asyncio
import json
from typing import Any, ClassVar
from uuid import UUID

from pydantic_toast import StorageBackend, register_backend


class DictBackend(StorageBackend):
    stores: ClassVar[dict[str, dict[UUID, str]]] = {}
    calls: ClassVar[list[str]] = []

    async def connect(self) -> None:
        self.store = self.stores.setdefault(self.url, {})

    async def disconnect(self) -> None:
        pass

    async def save(self, id: UUID, class_name: str, data: dict[str, Any]) -> None:
        self.calls.append("save")
        await asyncio.sleep(0)  # a real backend would await I/O here
        self.store[id] = json.dumps(data)

    async def load(self, id: UUID, class_name: str) -> dict[str, Any] | None:
        self.calls.append("load")
        await asyncio.sleep(0)
        stored = self.store.get(id)
        return None if stored is None else json.loads(stored)


register_backend("dictstore", DictBackend)
