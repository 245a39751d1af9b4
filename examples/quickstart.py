"""Quickstart: save a model out of line, pass its reference around, load it back.

Runs anywhere: the storage is an SQLite file next to this script (no server needed).
    python examples/quickstart.py
"""

import asyncio
import json
import uuid
from pathlib import Path

from pydantic_toast import ExternalBaseModel, ExternalConfigDict, RecordNotFoundError

DATABASE = Path(__file__).with_name("quickstart.db")


class User(ExternalBaseModel):
    model_config = ExternalConfigDict(storage=f"sqlite:///{DATABASE}")

    name: str
    email: str
    tags: list[str] = []


async def main() -> None:
    user = User(name="Ada", email="ada@example.com", tags=["admin"])

    # Store the model; what travels is a tiny reference.
    reference = await user.save_external()
    message = json.dumps({"event": "user.created", "user": reference})
    print("sent:    ", message)

    # Somewhere else (another service, a worker): resolve the reference.
    received = json.loads(message)["user"]
    assert User.is_external_reference(received)
    loaded = await User.load_external(received)
    print("loaded:  ", repr(loaded))
    assert loaded == user

    # Saving the same instance again updates its record: same id, created_at kept.
    user.tags.append("owner")
    assert await user.save_external() == reference
    metadata = (await User.load_external(reference)).external_metadata
    assert metadata is not None
    print(f"metadata: created {metadata.created_at:%X.%f}, updated {metadata.updated_at:%X.%f}")

    # A reference to nothing is a clear error.
    try:
        await User.load_external({"class_name": "User", "id": str(uuid.UUID(int=0))})
    except RecordNotFoundError as error:
        print("missing: ", error)


if __name__ == "__main__":
    asyncio.run(main())

    # The same calls work from synchronous code (scripts, notebooks, Django views).
    reference = User(name="Grace", email="grace@example.com").save_external_sync()
    print("sync:    ", User.load_external_sync(reference).name, "via", reference)
