"""Encryption at rest, key rotation and signed references, on every backend.

What a store holds is read back with the engine's own driver (sqlite3, asyncpg, redis-py,
boto3, the files themselves), so "no plaintext at rest" is checked where an attacker would
look, not through the library.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import json
import os
import pickle
import re
import sqlite3
import subprocess
import sys
import traceback
from contextlib import closing
from pathlib import Path
from typing import Annotated, Any
from uuid import UUID, uuid4

import pytest
from pydantic import BaseModel, ValidationError, field_validator

from pydantic_toast import (
    External,
    ExternalBaseModel,
    ExternalConfigDict,
    ExternalField,
    Keyring,
    StorageValidationError,
    UnsupportedOperationError,
    dump,
    rekey,
    use_keyring,
    validate,
)
from pydantic_toast._cli import main
from pydantic_toast._content import content_id
from pydantic_toast._crypto import require_cryptography, seal_data, sign_reference
from pydantic_toast._registry import get_backend
from pydantic_toast.backends.records import Record
from tests.conftest import POSTGRES_URL, REDIS_URL
from tests.dict_backend import DictBackend

# Tests define one stored name in several classes on purpose (a model before and after).
pytestmark = pytest.mark.filterwarnings("ignore::pydantic_toast.ExternalNameWarning")

K1, K2 = bytes(range(32)), bytes(range(100, 132))
SECRET = "alice.secret@example.com"
ROOT = Path(__file__).resolve().parent.parent


def b64(key: bytes) -> str:
    return base64.urlsafe_b64encode(key).rstrip(b"=").decode()


def key_texts(*keys: bytes) -> list[str]:
    """Every way a key could leak into text: raw repr, hex, base64 and base64url."""
    found = []
    for key in keys:
        found += [repr(key), key.hex(), base64.b64encode(key).decode(), b64(key)]
    return found


@pytest.fixture(autouse=True)
def keyring() -> Any:
    ring = Keyring({"k1": K1}, "k1")
    use_keyring(ring)
    yield ring
    use_keyring(None)


def define_user(storage: str, **config: Any) -> type[ExternalBaseModel]:
    class User(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=storage, encrypt=True, **config)
        email: str
        note: str = ""

    return User


# --- what the store holds, read with the engine's own driver ---------------------------------


async def raw_store(storage: str) -> bytes:
    """Everything the storage holds, as its driver returns it."""
    scheme = storage.split(":", 1)[0]
    if scheme == "memory":
        from pydantic_toast.backends.memory import MemoryBackend

        return b"".join(r.data for store in MemoryBackend._stores.values() for r in store.values())
    if scheme == "dictstore":
        return "".join(DictBackend.stores[storage].values()).encode()
    if scheme == "sqlite":
        with closing(sqlite3.connect(storage.removeprefix("sqlite:///"))) as connection:
            rows = connection.execute("SELECT * FROM external_models").fetchall()
        return repr(rows).encode()
    if scheme == "file":
        root = Path(storage.removeprefix("file://"))
        return b"".join(path.read_bytes() for path in root.rglob("*") if path.is_file())
    if scheme == "postgresql":
        import asyncpg

        table = storage.rsplit("table=", 1)[1]
        connection = await asyncpg.connect(POSTGRES_URL)
        try:
            rows = await connection.fetch(f'SELECT t::text AS row FROM "{table}" t')
        finally:
            await connection.close()
        return "".join(row["row"] for row in rows).encode()
    if scheme == "redis":
        import redis.asyncio as aioredis

        prefix = storage.rsplit("prefix=", 1)[1]
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            keys = [key async for key in client.scan_iter(match=f"{prefix}:*")]
            values = [await client.get(key) for key in keys]
        finally:
            await client.aclose()
        return b"".join(value for value in values if value)
    if scheme == "s3":
        import boto3

        bucket = storage.removeprefix("s3://").split("/", 1)[0]
        endpoint = storage.rsplit("endpoint_url=", 1)[1]
        client: Any = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        listed = client.list_objects_v2(Bucket=bucket).get("Contents", [])
        return b"".join(
            client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read() for item in listed
        )
    raise AssertionError(f"no raw reader for {storage}")


# --- keys -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "primary", "message"),
    [
        ({"k1": K1[:16]}, "k1", "key 'k1' must be 32 bytes (AES-256), not 16 bytes"),
        ({"k1": K1 + b"x"}, "k1", "key 'k1' must be 32 bytes (AES-256), not 33 bytes"),
        ({"k1": K1.hex()}, "k1", "key 'k1' must be 32 bytes (AES-256), not str"),
        ({"k 1": K1}, "k 1", "invalid key id 'k 1'"),
        ({"k1": K1}, "k2", "primary key 'k2' is not in the keyring (it holds 'k1')"),
        ({}, "k1", "a Keyring needs at least one key"),
    ],
)
def test_a_bad_keyring_is_refused_at_set_up_without_showing_a_key(
    keys: dict[str, Any], primary: str, message: str
) -> None:
    with pytest.raises(StorageValidationError, match="^" + re.escape(message)) as caught:
        Keyring(keys, primary)
    shown = str(caught.value) + repr(caught.value)
    assert not any(text in shown for text in key_texts(K1, K1[:16]))


@pytest.mark.parametrize(
    ("keys", "primary", "message"),
    [
        (
            {K1: "k1"},
            "k1",
            "invalid key id: a bytes, not a str (are the ids and the keys swapped?)",
        ),
        (
            {b64(K1): "k1"},
            "k1",
            "a key id of 43 characters (not shown: it may be a key) has a str for its key, "
            "not 32 bytes (are the ids and the keys swapped?)",
        ),
        (
            {b64(K1): b"abc"},
            b64(K1),
            "key (43 characters, not shown: it may be a key) must be 32 bytes (AES-256), "
            "not 3 bytes",
        ),
        ({"k1": K1}, K1, "primary key (a bytes, not shown) is not in the keyring (it holds 'k1')"),
        (
            {"k1": K1},
            b64(K1),
            "primary key (43 characters, not shown: it may be a key) is not in the keyring "
            "(it holds 'k1')",
        ),
    ],
)
def test_a_keyring_given_keys_for_ids_does_not_show_them(
    keys: dict[Any, Any], primary: Any, message: str
) -> None:
    with pytest.raises(StorageValidationError, match="^" + re.escape(message) + "$") as caught:
        Keyring(keys, primary)
    shown = str(caught.value) + repr(caught.value)
    assert not any(text in shown for text in key_texts(K1))


def test_a_keyring_shows_its_key_ids_and_never_its_keys() -> None:
    ring = Keyring({"old": K1, "new": K2}, "new")
    assert repr(ring) == str(ring) == "Keyring(key_ids=['old', 'new'], primary='new')"
    named_by_its_text = Keyring({b64(K1): K1}, b64(K1))  # an id as long as a key's text
    assert repr(named_by_its_text) == (
        "Keyring(key_ids=[(43 characters, not shown: it may be a key)], "
        "primary=(43 characters, not shown: it may be a key))"
    )
    assert ring.key_ids == ("old", "new")
    assert not any(text in repr(ring) + str(vars_of(ring)) for text in key_texts(K1, K2))
    with pytest.raises(TypeError, match="not pickled"):
        pickle.dumps(ring)
    assert copy.deepcopy(ring) is ring and copy.copy(ring) is ring


def vars_of(ring: Keyring) -> list[str]:
    return [name for name in dir(ring) if not name.startswith("__")]


async def test_keys_come_from_the_environment_when_no_keyring_is_installed(
    memory_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_keyring(None)
    User = define_user(memory_url)
    monkeypatch.delenv("PYDANTIC_TOAST_KEYS", raising=False)
    with pytest.raises(StorageValidationError, match="User is encrypted or signed, but no keyring"):
        await User(email=SECRET).save_external()
    monkeypatch.setenv("PYDANTIC_TOAST_KEYS", f"env2:{b64(K2)}, env1:{b64(K1)}")
    reference = await User(email=SECRET).save_external()
    stored = await (await get_backend(memory_url)).read_record("User", UUID(reference["id"]))
    assert stored is not None and json.loads(stored.data)["kid"] == "env2"  # the first: primary
    assert await User.load_external(reference) == User(email=SECRET)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("k1", "entry 1 is not id:base64url-key"),
        ("k1:!!!!", "the key of entry 1 is not base64url"),
        (f"k1:{b64(K1[:20])}", "key 'k1' must be 32 bytes (AES-256), not 20 bytes"),
        (f"k1:{b64(K1)},k1:{b64(K2)}", "key id 'k1' is given twice"),
        # an entry written key:id, the id a base64url word that decodes to 3 bytes
        (
            f"{b64(K1)}:abcd",
            "key (43 characters, not shown: it may be a key) must be 32 bytes (AES-256), "
            "not 3 bytes",
        ),
    ],
)
async def test_a_bad_environment_keyring_is_refused_without_showing_a_key(
    memory_url: str, monkeypatch: pytest.MonkeyPatch, text: str, message: str
) -> None:
    use_keyring(None)
    User = define_user(memory_url)
    monkeypatch.setenv("PYDANTIC_TOAST_KEYS", text)
    match = f"^PYDANTIC_TOAST_KEYS: {re.escape(message)}"
    with pytest.raises(StorageValidationError, match=match) as caught:
        await User(email=SECRET).save_external()
    assert not any(key in str(caught.value) for key in key_texts(K1, K2, K1[:20]))
    # A class defined while the variable is set checks it at once.
    match = f"User: PYDANTIC_TOAST_KEYS: {re.escape(message)}"
    with pytest.raises(StorageValidationError, match=match) as caught:
        define_user(memory_url)
    assert not any(key in str(caught.value) for key in key_texts(K1, K2, K1[:20]))


def test_encryption_without_the_cryptography_package_names_the_extra(
    memory_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "cryptography.hazmat.primitives.ciphers.aead", None)
    with pytest.raises(StorageValidationError, match=r"pip install 'pydantic-toast\[crypto\]'"):
        require_cryptography()
    with pytest.raises(StorageValidationError, match=r"User: encryption needs the cryptography"):
        define_user(memory_url)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"encrypt": "yes"}, "encrypt and signed_references are booleans"),
        ({"keyring": {"k1": K1}}, "keyring must be a pydantic_toast.Keyring, not dict"),
        ({"signed_references": True, "reference_ttl": -1}, "reference_ttl must be a positive"),
        (
            {"signed_references": True, "reference_ttl": float("inf")},
            "Account: reference_ttl must be a positive duration, not inf",
        ),
        (
            {"signed_references": True, "reference_ttl": 10**20},
            "Account: reference_ttl must be a positive duration, not 100000000000000000000",
        ),
        ({"reference_ttl": 60}, "reference_ttl needs signed_references=True"),
    ],
)
def test_bad_security_settings_fail_when_the_class_is_defined(
    memory_url: str, config: dict[str, Any], message: str
) -> None:
    with pytest.raises(StorageValidationError, match=message) as caught:

        class Account(ExternalBaseModel):
            model_config = ExternalConfigDict(storage=memory_url, **config)

    assert not any(text in str(caught.value) for text in key_texts(K1))


# --- encryption at rest, on every backend ----------------------------------------------------


async def test_an_encrypted_record_holds_no_field_value_at_rest(storage: str) -> None:
    User = define_user(storage)
    users = [User(email=SECRET, note="private note"), User(email="bob@example.com")]
    one = await users[0].save_external()
    many = await User.save_external_many(users[1:])
    raw = await raw_store(storage)
    for plaintext in (SECRET, "private note", "bob@example.com", "email", "alice"):
        assert plaintext.encode() not in raw
    assert b"kid" in raw and b"k1" in raw and b"A256GCM" in raw  # the metadata stays visible
    if not storage.startswith(("memory:", "dictstore:")):  # these keep the name apart
        assert b"User" in raw
    assert await User.load_external(one) == users[0]
    assert await User.load_external_many([one, *many]) == users


async def test_a_ciphertext_copied_onto_another_id_or_class_does_not_decrypt(storage: str) -> None:
    User = define_user(storage)

    class Admin(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=storage, encrypt=True)
        email: str

    backend = await get_backend(storage)
    reference = await User(email=SECRET).save_external()
    sealed = await backend.read_record("User", UUID(reference["id"]))
    assert sealed is not None
    other = uuid4()
    await backend.write_record(
        Record(other, "User", sealed.data, 1, sealed.created_at, sealed.updated_at)
    )
    with pytest.raises(
        StorageValidationError,
        match=f"^stored User record {other} does not decrypt under key id 'k1': it was tampered",
    ):
        await User.load_external({"class_name": "User", "id": str(other)})
    await backend.write_record(
        Record(sealed.id, "Admin", sealed.data, 1, sealed.created_at, sealed.updated_at)
    )
    with pytest.raises(
        StorageValidationError,
        match=f"^stored Admin record {sealed.id} does not decrypt under key id 'k1'",
    ):
        await Admin.load_external({"class_name": "Admin", "id": str(sealed.id)})
    # Its schema version is bound too: a record cannot be passed off as another version.
    await backend.write_record(
        Record(sealed.id, "User", sealed.data, 2, sealed.created_at, sealed.updated_at)
    )
    User2 = define_user(storage, schema_version=2)
    User2.migration(from_version=1)(lambda data: data)
    with pytest.raises(StorageValidationError, match="does not decrypt under key id 'k1'"):
        await User2.load_external(reference)


async def test_a_record_under_a_key_the_keyring_lacks_names_that_key(storage: str) -> None:
    User = define_user(storage, keyring=Keyring({"gone": K2}, "gone"))
    reference = await User(email=SECRET).save_external()
    Later = define_user(storage, keyring=Keyring({"k1": K1, "k3": K2[::-1]}, "k1"))
    with pytest.raises(
        StorageValidationError,
        match=(
            f"^stored User record {reference['id']} is encrypted under key id 'gone', which "
            r"the keyring lacks \(it holds 'k1', 'k3'\)$"
        ),
    ) as caught:
        await Later.load_external(reference)
    assert not any(text in str(caught.value) for text in key_texts(K1, K2, K2[::-1]))


async def test_a_tampered_ciphertext_is_refused(file_url: str) -> None:
    User = define_user(file_url)
    reference = await User(email=SECRET).save_external()
    backend = await get_backend(file_url)
    sealed = await backend.read_record("User", UUID(reference["id"]))
    assert sealed is not None
    body = json.loads(sealed.data)
    raw = bytearray(base64.b64decode(body["ct"]))
    raw[-1] ^= 1
    for ciphertext in (base64.b64encode(bytes(raw)).decode(), "AAAA", "not base64!"):
        body["ct"] = ciphertext
        sealed.data = json.dumps(body).encode()
        await backend.write_record(sealed)
        with pytest.raises(StorageValidationError, match="does not decrypt under key id 'k1'"):
            await User.load_external(reference)


async def test_a_plaintext_record_of_an_encrypted_class_is_refused(memory_url: str) -> None:
    backend = await get_backend(memory_url)
    id = uuid4()
    now = dt.datetime.now(dt.UTC)
    await backend.write_record(
        Record(id, "User", json.dumps({"email": SECRET}).encode(), 1, now, now)
    )
    User = define_user(memory_url)
    with pytest.raises(
        StorageValidationError, match=f"^stored User record {id} is not encrypted as the class"
    ):
        await User.load_external({"class_name": "User", "id": str(id)})


async def test_unencrypted_records_are_stored_exactly_as_before(file_url: str) -> None:
    class Plain(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=file_url)
        email: str

    await Plain(email=SECRET).save_external()
    raw = await raw_store(file_url)
    assert raw.endswith(b'"class_name":"Plain","data":{"email":"' + SECRET.encode() + b'"}}')


# --- composition -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["file", "postgresql"])
async def test_compression_comes_before_encryption(
    request: pytest.FixtureRequest, kind: str
) -> None:
    storage = request.getfixturevalue(f"{kind}_url")
    User = define_user(storage, compress_above=100)
    user = User(email=SECRET, note="compressible " * 2000)
    reference = await user.save_external()
    backend = await get_backend(storage)
    sealed = await backend.read_record("User", UUID(reference["id"]))
    assert sealed is not None
    body = json.loads(sealed.data)
    assert body["zstd"] == len(user.model_dump_json())  # the plaintext's size, declared
    assert len(base64.b64decode(body["ct"])) < len(user.model_dump_json()) // 20
    assert await User.load_external(reference) == user


async def test_content_addressed_encrypted_records_share_a_keyed_id(storage: str) -> None:
    User = define_user(storage, content_addressed=True)
    first = await User(email=SECRET).save_external()
    again = await User(email=SECRET).save_external()
    other = await User(email="bob@example.com").save_external()
    assert first["id"] == again["id"] != other["id"]
    id = UUID(first["id"])
    assert id.version == 8
    # Whoever guesses the value cannot confirm it from the id: it is not the plain digest.
    assert id != content_id("User", User(email=SECRET).model_dump_json().encode())
    Elsewhere = define_user(storage, content_addressed=True, keyring=Keyring({"x": K2}, "x"))
    assert (await Elsewhere(email=SECRET).save_external())["id"] != first["id"]
    assert await User.load_external(first) == User(email=SECRET)


async def test_an_encrypted_record_migrates_and_is_written_back_sealed(storage: str) -> None:
    Old = define_user(storage)
    reference = await Old(email=SECRET).save_external()

    class User(ExternalBaseModel):
        model_config = ExternalConfigDict(
            storage=storage, encrypt=True, schema_version=2, save_migrated=True
        )
        email: str
        domain: str

    @User.migration(from_version=1)
    def add_domain(data: dict[str, Any]) -> dict[str, Any]:
        return {**data, "domain": data["email"].split("@")[1]}

    assert await User.load_external(reference) == User(email=SECRET, domain="example.com")
    backend = await get_backend(storage)
    stored = await backend.read_record("User", UUID(reference["id"]))
    assert stored is not None and stored.schema_version == 2
    assert b"example.com" not in await raw_store(storage)
    assert await User.load_external(reference) == User(email=SECRET, domain="example.com")


# --- External fields ---------------------------------------------------------------------------


class Card(BaseModel):
    number: str


async def test_an_encrypted_external_value_holds_no_field_value_at_rest(storage: str) -> None:
    class Vault(BaseModel):
        card: Annotated[Card, ExternalField(encrypt=True)]
        cards: list[Annotated[Card, ExternalField(encrypt=True, content_addressed=False)]]

    vault = Vault(card=Card(number="4111-1111"), cards=[Card(number="5500-0000")])
    dumped = await dump(vault, storage=storage)
    raw = await raw_store(storage)
    assert b"4111" not in raw and b"5500" not in raw and b"A256GCM" in raw
    assert await validate(Vault, dumped, storage=storage) == vault
    assert Vault.model_validate(dumped, context={"storage": storage}) == vault


async def test_a_record_that_no_longer_validates_never_shows_its_decrypted_data(
    memory_url: str,
) -> None:
    reference = await define_user(memory_url)(email=SECRET).save_external()

    class User(ExternalBaseModel):  # the same class, a validator added since
        model_config = ExternalConfigDict(storage=memory_url, encrypt=True)
        email: str

        @field_validator("email")
        @classmethod
        def short(cls, value: str) -> str:
            if len(value) > 10:
                raise ValueError(f"{value!r} is too long")  # it quotes the decrypted value
            return value

    with pytest.raises(StorageValidationError) as caught:
        await User.load_external(reference)
    assert str(caught.value) == (
        f"stored User record {reference['id']} no longer validates: 1 validation error: "
        "email (messages not shown: the record is encrypted)"
    )
    assert SECRET not in "".join(traceback.format_exception(caught.value))

    class Pocket(BaseModel):  # and through an External field of another model
        user: External[User]

    with pytest.raises(ValidationError) as invalid:
        await validate(Pocket, {"user": reference}, storage=memory_url)
    assert invalid.value.errors()[0]["type"] == "external_invalid"
    assert SECRET not in "".join(traceback.format_exception(invalid.value))


def test_encrypt_on_an_external_field_of_a_clear_model_is_refused(memory_url: str) -> None:
    class Clear(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=memory_url)
        email: str

    with pytest.raises(StorageValidationError, match=r"ExternalField\(encrypt=True\) on Clear"):

        class Holder(BaseModel):
            clear: Annotated[Clear, ExternalField(encrypt=True)]


# --- rotation ----------------------------------------------------------------------------------


async def test_rekey_moves_every_record_to_the_primary_key_and_the_old_key_can_go(
    storage: str,
) -> None:
    User = define_user(storage)
    users = [User(email=f"user{i}@example.com") for i in range(7)]
    references = await User.save_external_many(users)
    if storage.startswith("dictstore:"):  # a four-method backend cannot list its records
        with pytest.raises(UnsupportedOperationError, match="does not support listing"):
            await rekey(User)
        return
    use_keyring(Keyring({"k1": K1, "k2": K2}, "k2"))
    newer = User(email="new@example.com")
    references.append(await newer.save_external())  # already under k2
    dry = await rekey(User, dry_run=True, batch_size=3)
    assert (dry.scanned, dry.rekeyed, dry.skipped, dry.failed) == (8, 7, 1, 0)
    seen: list[int] = []
    report = await rekey(User, batch_size=3, on_progress=lambda r: seen.append(r.scanned))
    assert (report.scanned, report.rekeyed, report.skipped, report.failed) == (8, 7, 1, 0)
    assert seen == [3, 6, 8]
    again = await rekey(User)  # resumable: what is done is skipped
    assert (again.rekeyed, again.skipped) == (0, 8)
    use_keyring(Keyring({"k2": K2}, "k2"))  # the old key is dropped
    assert await User.load_external_many(references) == [*users, newer]
    backend = await get_backend(storage)
    stored = await backend.read_record("User", UUID(references[0]["id"]))
    assert stored is not None and json.loads(stored.data)["kid"] == "k2"
    assert stored.created_at == users[0].external_metadata.created_at  # type: ignore[union-attr]


async def test_rekey_encrypts_records_written_before_encryption_and_reports_failures(
    sqlite_url: str,
) -> None:
    class User(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=sqlite_url)
        email: str

    plain = await User(email=SECRET).save_external()
    Sealed = define_user(sqlite_url, keyring=Keyring({"lost": K2}, "lost"))
    lost = await Sealed(email="lost@example.com").save_external()
    Now = define_user(sqlite_url)
    report = await rekey(Now)
    assert (report.scanned, report.rekeyed, report.failed) == (2, 1, 1)
    assert report.failures[0][0] == lost["id"]
    assert "key id 'lost', which the keyring lacks" in report.failures[0][1]
    assert SECRET.encode() not in await raw_store(sqlite_url)
    assert await Now.load_external(plain) == Now(email=SECRET)


class NotStored(BaseModel):
    email: str


@pytest.mark.parametrize(
    ("cls", "message"),
    [
        (NotStored, "rekey needs an ExternalBaseModel subclass, not NotStored"),
        ("User", "rekey needs an ExternalBaseModel subclass, not 'User'"),
    ],
)
async def test_rekey_refuses_what_is_no_stored_model_class(cls: Any, message: str) -> None:
    with pytest.raises(StorageValidationError) as caught:
        await rekey(cls)
    assert str(caught.value) == message


def test_the_rekey_command_rotates_a_class_given_as_module_and_class(
    sqlite_url: str, tmp_path: Path
) -> None:
    module = tmp_path / "crypto_models.py"
    module.write_text(
        "from pydantic_toast import ExternalBaseModel, ExternalConfigDict\n"
        "class User(ExternalBaseModel):\n"
        f"    model_config = ExternalConfigDict(storage={sqlite_url!r}, encrypt=True)\n"
        "    email: str\n"
    )
    setup = (
        "import sys; sys.path.insert(0, sys.argv[1]); from crypto_models import User;"
        "[User(email='u{}@example.com'.format(i)).save_external_sync() for i in range(5)]"
    )
    env = {**os.environ, "PYDANTIC_TOAST_KEYS": f"k1:{b64(K1)}", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", setup, str(tmp_path)], check=True, env=env, timeout=60)

    def cli(*arguments: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "pydantic_toast", *arguments]
        return subprocess.run(
            command, capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path
        )

    env["PYDANTIC_TOAST_KEYS"] = f"k2:{b64(K2)},k1:{b64(K1)}"
    dry = cli("rekey", "crypto_models:User", "--dry-run", "--storage", sqlite_url, "--json")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout) == {
        "class_name": "User",
        "primary": "k2",
        "dry_run": True,
        "scanned": 5,
        "rekeyed": 5,
        "skipped": 0,
        "changed": 0,
        "failed": 0,
        "failures": [],
    }
    done = cli("--storage", sqlite_url, "rekey", "crypto_models:User")
    assert done.returncode == 0, done.stderr
    assert (
        done.stdout == "rekeyed 5 of 5 User records under key 'k2'; 0 already under it or expired\n"
    )
    env["PYDANTIC_TOAST_KEYS"] = f"k2:{b64(K2)}"
    after = cli("--storage", sqlite_url, "rekey", "crypto_models:User")
    assert after.stdout.startswith("rekeyed 0 of 5 User records"), after.stderr
    env["PYDANTIC_TOAST_KEYS"] = f"k3:{b64(K1[::-1])}"
    failed = cli("--storage", sqlite_url, "rekey", "crypto_models:User")
    assert failed.returncode == 1
    assert "encrypted under key id 'k2', which the keyring lacks" in failed.stderr
    wrong = cli("--storage", sqlite_url, "rekey", "crypto_models")
    assert (wrong.returncode, wrong.stderr) == (
        1,
        "error: give the model as module:Class, not 'crypto_models'\n",
    )
    for result in (dry, done, after, failed, wrong):
        shown = result.stdout + result.stderr
        assert not any(text in shown for text in key_texts(K1, K2, K1[::-1]))


# --- signed references ------------------------------------------------------------------------


def define_signed(storage: str, **config: Any) -> type[ExternalBaseModel]:
    class Invoice(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=storage, signed_references=True, **config)
        total: int

    return Invoice


@pytest.mark.parametrize(
    ("config", "required"), [({}, ["sig"]), ({"reference_ttl": 60}, ["sig", "exp"])]
)
def test_the_json_schema_of_a_signed_reference_types_and_requires_sig_and_exp(
    config: dict[str, Any], required: list[str]
) -> None:
    """OpenAPI clients are generated from it: they must send a string sig (and integer exp)."""
    Invoice = define_signed("memory://schema", **config)

    class Order(BaseModel):
        invoice: External[Invoice]  # type: ignore[valid-type]

    schema = Order.model_json_schema()["$defs"]["InvoiceReference"]
    assert schema["required"] == ["class_name", "id", *required]
    assert schema["properties"]["sig"] == {"title": "Sig", "type": "string"}
    assert schema["properties"]["exp"] == {"title": "Exp", "type": "integer"}
    assert schema["additionalProperties"] is False


async def test_a_signed_reference_carries_sig_and_exp_and_loads(storage: str) -> None:
    Invoice = define_signed(storage, reference_ttl=dt.timedelta(minutes=5))
    before = dt.datetime.now(dt.UTC).timestamp()
    reference = await Invoice(total=12).save_external()
    after = dt.datetime.now(dt.UTC).timestamp()
    assert set(reference) == {"class_name", "id", "sig", "exp"}
    assert int(before) + 300 <= reference["exp"] <= after + 300  # five minutes from the save
    assert Invoice.is_external_reference(reference)
    assert ExternalBaseModel.is_external_reference(reference)
    assert not Invoice.is_external_reference({**reference, "extra": 1})
    assert not Invoice.is_external_reference({**reference, "sig": 5})
    assert await Invoice.load_external(reference) == Invoice(total=12)
    assert await Invoice.load_external_many([reference]) == [Invoice(total=12)]
    assert await Invoice.exists_external(reference)
    if not storage.startswith("dictstore:"):  # a four-method backend cannot delete
        assert await Invoice.delete_external(reference)
    many = await Invoice.save_external_many([Invoice(total=1), Invoice(total=2)])
    assert all(set(r) == {"class_name", "id", "sig", "exp"} for r in many)


def flip(signature: str) -> str:
    """The signature with its first character changed."""
    return ("B" if signature[0] == "A" else "A") + signature[1:]


def hostile_references(reference: dict[str, Any], keyring: Keyring) -> list[tuple[Any, str]]:
    id = UUID(reference["id"])
    expired = sign_reference(keyring, "Invoice", id, dt.timedelta(seconds=-5))
    other_id = sign_reference(keyring, "Invoice", uuid4(), None)
    return [
        ({"class_name": "Invoice", "id": reference["id"]}, "is not signed, and Invoice requires"),
        ({**reference, "sig": reference["sig"][:-1]}, "has a malformed signature"),
        ({**reference, "sig": flip(reference["sig"])}, "invalid signature: forged"),
        ({**reference, "sig": other_id["sig"]}, "invalid signature: forged"),
        ({**reference, "exp": reference["exp"] + 3600}, "invalid signature: forged"),
        ({k: v for k, v in reference.items() if k != "exp"}, "has no expiry, and Invoice's"),
        # signed right, but without the expiry the class's reference_ttl asks for (as one
        # signed before the ttl was set): it would never expire
        (sign_reference(keyring, "Invoice", id, None), "has no expiry, and Invoice's references"),
        ({**reference, "exp": "soon"}, "has a malformed expiry"),
        ({**reference, "exp": 10**5000}, "has a malformed expiry"),  # too long to format
        ({**reference, "sig": ["x"]}, "has a malformed signature"),
        (expired, r"expired at \d+ \(Unix time\)"),
    ]


async def test_unsigned_forged_truncated_and_expired_references_are_refused_before_any_io(
    namespace: str, keyring: Keyring
) -> None:
    storage = f"dictstore://{namespace}"
    Invoice = define_signed(storage, reference_ttl=600)
    reference = dict(await Invoice(total=7).save_external())
    await Invoice.load_external(reference)
    DictBackend.calls.clear()
    extra = ({**reference, "extra": 1}, "has only 'class_name', 'id', 'sig' and 'exp', not")
    for hostile, message in [*hostile_references(reference, keyring), extra]:
        for operation in (
            Invoice.load_external,
            lambda r: Invoice.load_external_many([r]),
            Invoice.exists_external,
            Invoice.delete_external,
            lambda r: Invoice.delete_external_many([r]),
        ):
            with pytest.raises(StorageValidationError, match=message):
                await operation(hostile)
    assert DictBackend.calls == []  # not one storage call
    assert await Invoice.load_external(reference) == Invoice(total=7)


async def test_external_resolution_refuses_bad_references_before_any_io(
    namespace: str, keyring: Keyring
) -> None:
    storage = f"dictstore://{namespace}"
    Invoice = define_signed(storage, reference_ttl=600)

    class Order(BaseModel):
        invoice: External[Invoice]  # type: ignore[valid-type]

    order = Order(invoice=Invoice(total=3))
    dumped = await dump(order, storage=storage)
    reference = dumped["invoice"]
    assert set(reference) == {"class_name", "id", "sig", "exp"}
    assert await validate(Order, dumped) == order
    assert Order.model_validate(dumped, context={"storage": storage}) == order
    DictBackend.calls.clear()
    for hostile, message in hostile_references(reference, keyring):
        data = {"invoice": hostile}
        with pytest.raises(ValueError, match=message):
            await validate(Order, data)
        with pytest.raises(ValueError, match=message):
            Order.model_validate(data, context={"storage": storage})
    assert DictBackend.calls == []


async def test_references_signed_under_an_older_key_stay_valid_after_rotation(
    storage: str,
) -> None:
    Invoice = define_signed(storage)
    reference = await Invoice(total=5).save_external()
    assert "exp" not in reference
    use_keyring(Keyring({"k1": K1, "k2": K2}, "k2"))
    fresh = await Invoice(total=6).save_external()
    assert (
        fresh["sig"]
        != sign_reference(Keyring({"k1": K1}, "k1"), "Invoice", UUID(fresh["id"]), None)["sig"]
    )
    assert await Invoice.load_external_many([reference, fresh]) == [
        Invoice(total=5),
        Invoice(total=6),
    ]
    use_keyring(Keyring({"k2": K2}, "k2"))  # the old key leaves: so does its signature
    with pytest.raises(StorageValidationError, match="invalid signature"):
        await Invoice.load_external(reference)
    assert await Invoice.load_external(fresh) == Invoice(total=6)


async def test_a_signed_and_encrypted_class_on_one_keyring(postgresql_url: str) -> None:
    User = define_user(postgresql_url, signed_references=True, reference_ttl=60)
    reference = await User(email=SECRET).save_external()
    assert "sig" in reference and "exp" in reference
    assert SECRET.encode() not in await raw_store(postgresql_url)
    assert await User.load_external(reference) == User(email=SECRET)


def test_the_get_command_takes_a_signed_reference_and_shows_only_ciphertext(
    sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    User = define_user(sqlite_url, signed_references=True, reference_ttl=60)
    reference = User(email=SECRET).save_external_sync()
    assert main(["--storage", sqlite_url, "get", json.dumps(reference)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["class_name"], shown["id"]) == ("User", reference["id"])
    assert set(shown["data"]) == {"$toast", "kid", "ct"} and shown["data"]["kid"] == "k1"
    assert SECRET not in json.dumps(shown)


async def test_rekey_keeps_what_is_left_of_a_redis_records_ttl(redis_url: str) -> None:
    import redis.asyncio as aioredis

    User = define_user(redis_url, ttl=3600)
    reference = await User(email=SECRET).save_external()
    backend = await get_backend(redis_url)
    stored = await backend.read_record("User", UUID(reference["id"]))
    assert stored is not None
    stored.updated_at -= dt.timedelta(minutes=30)  # as if saved half an hour ago
    stored.ttl = dt.timedelta(minutes=30)
    await backend.write_record(stored)
    use_keyring(Keyring({"k1": K1, "k2": K2}, "k2"))
    assert (await rekey(User)).rekeyed == 1
    prefix = redis_url.rsplit("prefix=", 1)[1]
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        left = await client.ttl(f"{prefix}:User:{reference['id']}")
    finally:
        await client.aclose()
    assert 1700 <= left <= 1800  # the half hour left, not a fresh hour
    assert await User.load_external(reference) == User(email=SECRET)


async def test_references_inside_encrypted_values_resolve_in_one_prefetch(
    namespace: str,
) -> None:
    from pydantic_toast._external import _Session

    storage = f"memory://{namespace}"

    class Line(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=storage, encrypt=True)
        sku: str

    class Order(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=storage, encrypt=True)
        lines: list[External[Line]]  # type: ignore[valid-type]

    class Basket(BaseModel):
        order: External[Order]  # type: ignore[valid-type]

    basket = Basket(order=Order(lines=[Line(sku="A-1"), Line(sku="B-2")]))
    dumped = await dump(basket, storage=storage)
    assert b"A-1" not in await raw_store(storage)
    session = _Session(None, batched=True)
    await session.prefetch(dumped, storage)
    assert sorted(name for _, name, _ in session.fetched) == ["Line", "Line", "Order"]
    assert await validate(Basket, dumped, storage=storage) == basket


# --- one compression codec: the stored forms are those written before it -------------------

PINNED_TIME = dt.datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC)
PINNED_DATA = b'{"text":"' + b"toast " * 20 + b'"}'


def test_a_compressed_envelope_is_byte_for_byte_the_one_written_before() -> None:
    from pydantic_toast.backends.records import encode_envelope

    record = Record(UUID(int=7), "Note", PINNED_DATA, 1, PINNED_TIME, PINNED_TIME, 16)
    assert encode_envelope(record) == (
        b'{"created_at":"2024-01-02T03:04:05.678901+00:00","updated_at":"2024-01-02T03:04:05.'
        b'678901+00:00","schema_version":1,"class_name":"Note","codec":"zstd","size":131}\n'
        b'(\xb5/\xfd \x83\xc5\x00\x00\x88{"text":"toast "}\x01\x00/i\xa9\x03'
    )


def test_a_compressed_sealed_record_written_before_still_opens() -> None:
    from pydantic_toast._crypto import open_data

    sealed = (
        b'{"$toast":"A256GCM","kid":"k1","zstd":131,"ct":"UAkJSnHT60XNKWkrHSgBxOQVHEdGiHeazPNia'
        b'ivYjyw5urg+f1xGQD3X8sUJ/cgEyWN0IjNmeuX6Vc0SoQ=="}'
    )
    record = Record(UUID(int=7), "Note", sealed, 1, PINNED_TIME, PINNED_TIME)
    assert open_data(record, Keyring({"k1": K1}, "k1")) == PINNED_DATA
    # and a record sealed now has the same layout: the same header, a nonce of its own
    fresh = seal_data(
        Record(UUID(int=7), "Note", PINNED_DATA, 1, PINNED_TIME, PINNED_TIME, 16),
        Keyring({"k1": K1}, "k1"),
    )
    assert fresh.data.startswith(b'{"$toast":"A256GCM","kid":"k1","zstd":131,"ct":"')
    assert len(fresh.data) == len(sealed)
    assert open_data(fresh, Keyring({"k1": K1}, "k1")) == PINNED_DATA
