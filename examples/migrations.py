"""Schema migrations: old records keep loading after the model changes.

Version 1 of `User` had `name`; version 2 renamed it to `full_name` and added `initials`,
computed from the name. Records saved as version 1 are upgraded step by step when loaded
(and, with ``save_migrated=True``, written back upgraded).
    python examples/migrations.py
"""

import asyncio
import sqlite3
import tempfile
import uuid
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic_toast import ExternalBaseModel, ExternalConfigDict, aclose

DATABASE = Path(tempfile.mkdtemp()) / "users.db"


class User(ExternalBaseModel):
    model_config = ExternalConfigDict(
        storage=f"sqlite:///{DATABASE}", schema_version=2, save_migrated=True
    )

    full_name: str
    initials: str


@User.migration(from_version=1)
def rename_and_add_initials(data: dict[str, Any]) -> dict[str, Any]:
    full_name = data.pop("name")
    initials = "".join(part[0] for part in full_name.split())
    return {**data, "full_name": full_name, "initials": initials}


async def main() -> None:
    # A record that version 1 of the code saved last year.
    await User(full_name="x", initials="x").save_external()  # creates the table
    old_id = str(uuid.uuid4())
    last_year = datetime(2025, 1, 1, tzinfo=UTC).isoformat(timespec="microseconds")
    with closing(sqlite3.connect(DATABASE, isolation_level=None)) as connection:
        connection.execute(
            "INSERT INTO external_models VALUES (?, 'User', ?, 1, ?, ?)",
            (old_id, '{"name": "Ada Lovelace"}', last_year, last_year),
        )
    print("stored by version 1: ", '{"name": "Ada Lovelace"}')

    user = await User.load_external({"class_name": "User", "id": old_id})
    print("loaded by version 2: ", user.model_dump())
    with closing(sqlite3.connect(DATABASE, isolation_level=None)) as connection:
        row = connection.execute(
            "SELECT schema_version, data FROM external_models WHERE id = ?", (old_id,)
        ).fetchone()
    print("written back as:     ", f"version {row[0]}, {row[1]}")
    await aclose()


if __name__ == "__main__":
    asyncio.run(main())
