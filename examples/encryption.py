"""Encryption at rest, key rotation and signed, expiring references, on a local SQLite file.

Run it as it is: ``python examples/encryption.py`` (needs ``pip install 'pydantic-toast[crypto]'``).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import tempfile
from contextlib import closing
from datetime import timedelta

from pydantic_toast import (
    ExternalBaseModel,
    ExternalConfigDict,
    Keyring,
    StorageValidationError,
    rekey,
    use_keyring,
)

# Keys are 32 random bytes each; in production they come from a secret store, or from
# PYDANTIC_TOAST_KEYS="2026-01:<base64url>,..." (the first one primary).
OLD_KEY, NEW_KEY = os.urandom(32), os.urandom(32)
use_keyring(Keyring({"2026-01": OLD_KEY}, primary="2026-01"))

DATABASE = os.path.join(tempfile.mkdtemp(), "records.db")


class Patient(ExternalBaseModel):
    model_config = ExternalConfigDict(
        storage=f"sqlite:///{DATABASE}",
        encrypt=True,
        signed_references=True,
        reference_ttl=timedelta(hours=1),
    )

    name: str
    diagnosis: str


async def main() -> None:
    reference = await Patient(name="Ada Lovelace", diagnosis="fine").save_external()
    print("reference:", sorted(reference))  # class_name, exp, id, sig

    with closing(sqlite3.connect(DATABASE)) as connection:
        (stored,) = connection.execute("SELECT data FROM external_models").fetchone()
    assert "Ada" not in stored
    print("stored:", stored[:60], "...")

    forged = {**reference, "id": "00000000-0000-4000-8000-000000000000"}
    try:
        await Patient.load_external(forged)
    except StorageValidationError as error:
        print("forged reference refused:", error)

    # Rotation: the new key becomes primary, the old one stays to read (and to verify the
    # references it signed) until every record is re-encrypted.
    use_keyring(Keyring({"2026-06": NEW_KEY, "2026-01": OLD_KEY}, primary="2026-06"))
    report = await rekey(Patient)
    print(f"rekeyed {report.rekeyed} of {report.scanned} records under {report.primary}")
    print("loaded with both keys:", await Patient.load_external(reference))

    use_keyring(Keyring({"2026-06": NEW_KEY}, primary="2026-06"))  # the old key is gone
    fresh = await Patient(name="Grace Hopper", diagnosis="fine").save_external()
    print("loaded after the old key left:", await Patient.load_external(fresh))


if __name__ == "__main__":
    asyncio.run(main())
