"""A custom backend: four methods, registered for a URL scheme.

This is the FileSystemBackend that docs/how-to/writing-a-backend.md prints; it runs as is:
    python examples/custom_backend.py
"""

import asyncio
import json
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID

from pydantic_toast import ExternalBaseModel, ExternalConfigDict, StorageBackend, register_backend


class FileSystemBackend(StorageBackend):
    """Stores each record as {directory}/{class_name}_{id}.json."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.directory = Path(urlsplit(url).path)

    async def connect(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)

    async def disconnect(self) -> None:
        pass

    async def save(self, id: UUID, class_name: str, data: dict[str, Any]) -> None:
        path = self.directory / f"{class_name}_{id}.json"
        path.write_text(json.dumps(data))

    async def load(self, id: UUID, class_name: str) -> dict[str, Any] | None:
        path = self.directory / f"{class_name}_{id}.json"
        if not path.exists():
            return None
        return json.loads(path.read_text())


register_backend("myfiles", FileSystemBackend)

directory = Path(tempfile.mkdtemp()) / "models"


class Document(ExternalBaseModel):
    model_config = ExternalConfigDict(storage=f"myfiles://{directory}")

    title: str
    body: str


async def main() -> None:
    reference = await Document(title="Hello", body="World").save_external()
    print("reference:", reference)
    print("stored as:", *(path.name for path in directory.iterdir()))
    print("loaded:   ", await Document.load_external(reference))


asyncio.run(main())
