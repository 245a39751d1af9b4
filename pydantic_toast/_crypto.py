"""Encryption at rest and signed references: the keyring and the record codec step.

A record of an encrypted class is stored as a small JSON object in place of the model's JSON,
so that every backend stores it unchanged (a JSONB column, a TEXT column, an envelope, a
four-method backend's dict)::

    {"$toast":"A256GCM","kid":"2026-01","zstd":12345,"ct":"<base64 nonce+ciphertext+tag>"}

``kid`` names the key it was sealed under; ``zstd`` is there when the plaintext was
compressed before it was encrypted (and gives its size, which bounds the decompression).
AES-256-GCM authenticates the ciphertext together with the record's class name, id and
schema version and this header (the associated data), so a ciphertext copied onto another
record, another class or another version does not decrypt.

Each keyring key is the root of three separate keys, derived with HKDF-SHA256: the AES key,
the HMAC key of signed references, and the HMAC key that content-addressed ids are computed
with (so that an id does not reveal a guessable value to whoever can compute SHA-256).
Signing needs only the standard library; encryption needs the ``cryptography`` package.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from uuid import UUID

from pydantic_toast._errors import StorageValidationError
from pydantic_toast.backends.records import MAX_DECOMPRESSED_SIZE, Record, compress, decompress

__all__ = [
    "KEYS_VARIABLE",
    "Keyring",
    "content_secret",
    "content_secrets",
    "current_keyring",
    "keyring_from_text",
    "open_data",
    "require_cryptography",
    "seal_data",
    "sealed_key_id",
    "sign_reference",
    "use_keyring",
    "verify_reference",
]

#: The environment variable read when no keyring is installed: ``id:base64url-key,...``.
KEYS_VARIABLE = "PYDANTIC_TOAST_KEYS"

_KEY_ID = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
# 32 bytes are 43 characters in base64url, 64 in hex: an id that long may be a key.
_LONGEST_SHOWN_ID = 40
_KEY_SIZE = 32
_NONCE_SIZE = 12
_TAG_SIZE = 16
_ALGORITHM = "A256GCM"
_SEALED_START = b'{"$toast":"'


def require_cryptography() -> Any:
    """The AES-GCM class of the ``cryptography`` package, or an error naming the extra."""
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError as exc:
        raise StorageValidationError(
            "encryption needs the cryptography package: pip install 'pydantic-toast[crypto]'"
        ) from exc
    return AESGCM


def _hkdf(key: bytes, purpose: bytes) -> bytes:
    """HKDF-SHA256 (RFC 5869) of one 32-byte output, with no salt."""
    prk = hmac.new(b"\0" * 32, key, hashlib.sha256).digest()
    return hmac.new(prk, b"pydantic-toast/1 " + purpose + b"\x01", hashlib.sha256).digest()


@dataclass(frozen=True, slots=True)
class _Derived:
    encryption: bytes
    signing: bytes
    content: bytes


class Keyring:
    """Named 32-byte keys, one of them the primary: new records are sealed and new references
    signed under the primary; reads use whichever key the record names, and references
    signed under any key of the keyring verify. Its ``repr`` shows key ids, never keys."""

    __slots__ = ("__derived", "_cipher", "primary")

    def __init__(self, keys: Mapping[str, bytes], primary: str) -> None:
        if not isinstance(keys, Mapping) or not keys:
            raise StorageValidationError("a Keyring needs at least one key: {key id: 32 bytes}")
        derived: dict[str, _Derived] = {}
        for key_id, key in keys.items():
            if not isinstance(key_id, str):
                # Most often a key given where its id belongs: its repr would be the key.
                raise StorageValidationError(
                    f"invalid key id: a {type(key_id).__name__}, not a str "
                    "(are the ids and the keys swapped?)"
                )
            if _KEY_ID.fullmatch(key_id) is None:
                raise StorageValidationError(
                    f"invalid key id {_shown_id(key_id)}: use 1 to 64 letters, digits, "
                    "'_', '.' and '-'"
                )
            if isinstance(key, str) and len(key_id) >= _LONGEST_SHOWN_ID:
                # A base64url or hex key is a valid id: with a str for its key, it may be one.
                raise StorageValidationError(
                    f"a key id of {len(key_id)} characters (not shown: it may be a key) has a "
                    f"str for its key, not {_KEY_SIZE} bytes (are the ids and the keys swapped?)"
                )
            if not isinstance(key, bytes) or len(key) != _KEY_SIZE:
                size = f"{len(key)} bytes" if isinstance(key, bytes) else type(key).__name__
                raise StorageValidationError(
                    f"key {_shown_id(key_id)} must be {_KEY_SIZE} bytes (AES-256), not {size}"
                )
            derived[key_id] = _Derived(
                _hkdf(key, b"encryption"), _hkdf(key, b"signing"), _hkdf(key, b"content")
            )
        if not isinstance(primary, str) or primary not in derived:
            raise StorageValidationError(
                f"primary key {_shown_id(primary)} is not in the keyring "
                f"(it holds {', '.join(map(_shown_id, derived))})"
            )
        self.__derived = derived
        self.primary = primary
        self._cipher: dict[str, Any] = {}

    @property
    def key_ids(self) -> tuple[str, ...]:
        """The ids of the keys, in the order given."""
        return tuple(self.__derived)

    def __repr__(self) -> str:
        ids = ", ".join(map(_shown_id, self.__derived))
        return f"Keyring(key_ids=[{ids}], primary={_shown_id(self.primary)})"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("a Keyring is not pickled: its keys would travel with it")

    def __copy__(self) -> Keyring:
        return self  # immutable: a copy of a configuration shares it

    def __deepcopy__(self, memo: dict[int, Any]) -> Keyring:
        return self

    def _keys(self, key_id: str) -> _Derived | None:
        return self.__derived.get(key_id)

    def _aead(self, key_id: str) -> Any:
        cipher = self._cipher.get(key_id)
        if cipher is None:
            derived = self.__derived[key_id]
            cipher = self._cipher[key_id] = require_cryptography()(derived.encryption)
        return cipher

    def _signing_keys(self) -> list[bytes]:
        return [derived.signing for derived in self.__derived.values()]

    def _content_key(self) -> bytes:
        """The primary key's secret for content-addressed ids."""
        return self.__derived[self.primary].content


def content_secret(keyring: Keyring) -> bytes:
    """The secret content-addressed ids of encrypted values are keyed with (the primary
    key's)."""
    return keyring._content_key()


def content_secrets(keyring: Keyring) -> tuple[bytes, ...]:
    """The content-id secret of every key of the keyring, the primary's first: a value stored
    before a rotation keeps the id its primary key of the time gave it."""
    primary = keyring._content_key()
    others = (keyring._keys(key_id) for key_id in keyring.key_ids if key_id != keyring.primary)
    return (primary, *(derived.content for derived in others if derived is not None))


def _shown_id(value: object) -> str:
    """A key id for a message. Anything but a str may be a key, and so may a str as long as
    a key's text (an id and a key swapped): of those, only the type or the length shows."""
    if not isinstance(value, str):
        return f"(a {type(value).__name__}, not shown)"
    if len(value) >= _LONGEST_SHOWN_ID:
        return f"({len(value)} characters, not shown: it may be a key)"
    return repr(value)


_installed: Keyring | None = None
_from_environment: tuple[str, Keyring] | None = None


def use_keyring(keyring: Keyring | None) -> None:
    """Install the keyring of every class that sets none of its own (``None`` uninstalls it,
    and `PYDANTIC_TOAST_KEYS` is read again)."""
    global _installed
    if keyring is not None and not isinstance(keyring, Keyring):
        raise StorageValidationError(f"use_keyring takes a Keyring, not {type(keyring).__name__}")
    _installed = keyring


def current_keyring(own: Keyring | None, owner: str) -> Keyring:
    """The keyring of a class: its own, else the installed one, else `PYDANTIC_TOAST_KEYS`."""
    global _from_environment
    if own is not None:
        return own
    if _installed is not None:
        return _installed
    text = os.environ.get(KEYS_VARIABLE, "")
    if not text.strip():
        raise StorageValidationError(
            f"{owner} is encrypted or signed, but no keyring is set: pass "
            f"ExternalConfigDict(keyring=...), call pydantic_toast.use_keyring(...) or set "
            f"{KEYS_VARIABLE}=id:base64url-key"
        )
    if _from_environment is None or not hmac.compare_digest(_from_environment[0], text):
        _from_environment = (text, keyring_from_text(text))
    return _from_environment[1]


def keyring_from_text(text: str) -> Keyring:
    """A keyring from ``id:base64url-key,id:base64url-key`` (the first key primary)."""
    keys: dict[str, bytes] = {}
    for position, item in enumerate(text.split(","), 1):
        key_id, colon, encoded = item.strip().partition(":")
        if not colon:
            raise StorageValidationError(
                f"{KEYS_VARIABLE}: entry {position} is not id:base64url-key"
            )
        try:
            padded = encoded + "=" * (-len(encoded) % 4)
            key = base64.b64decode(padded, altchars=b"-_", validate=True)
        except (binascii.Error, ValueError):
            raise StorageValidationError(
                f"{KEYS_VARIABLE}: the key of entry {position} is not base64url"
            ) from None
        if key_id in keys:
            raise StorageValidationError(
                f"{KEYS_VARIABLE}: key id {_shown_id(key_id)} is given twice"
            )
        keys[key_id] = key
    first = next(iter(keys))
    try:
        return Keyring(keys, first)
    except StorageValidationError as exc:
        raise StorageValidationError(f"{KEYS_VARIABLE}: {exc}") from None


# --- the codec step ------------------------------------------------------------------------


def _associated(record: Record, key_id: str, size: int | None) -> bytes:
    return b"\0".join(
        (
            b"pydantic-toast/1",
            record.class_name.encode(),
            str(record.id).encode(),
            str(record.schema_version).encode(),
            key_id.encode(),
            b"" if size is None else str(size).encode(),
        )
    )


def seal_data(record: Record, keyring: Keyring) -> Record:
    """``record`` with its data compressed (when longer than ``compress_above``), then
    encrypted under the primary key. Returned with ``compress_above`` cleared: ciphertext
    does not compress, so the envelope must not try."""
    key_id = keyring.primary
    plaintext, size = record.data, None
    frame = compress(plaintext, record.compress_above)
    if frame is not None:
        plaintext, size = frame, len(plaintext)
    nonce = os.urandom(_NONCE_SIZE)
    sealed = keyring._aead(key_id).encrypt(nonce, plaintext, _associated(record, key_id, size))
    text = binascii.b2a_base64(nonce + sealed, newline=False)
    middle = b"" if size is None else b',"zstd":' + str(size).encode()
    data = b"".join(
        (_SEALED_START, _ALGORITHM.encode(), b'","kid":"', key_id.encode(), b'"', middle)
    )
    record.data = b"".join((data, b',"ct":"', text, b'"}'))
    record.compress_above = None
    return record


def sealed_key_id(record: Record) -> str | None:
    """The id of the key a record is sealed under, or ``None`` when it is not sealed."""
    try:
        return _header(record)[0]
    except StorageValidationError:
        return None


# The header as `seal_data` writes it, read by position (a JSON store such as JSONB rewrites
# it: that takes the general path).
_FIXED = re.compile(
    rb'\{"\$toast":"A256GCM","kid":"([A-Za-z0-9_.\-]{1,64})"(?:,"zstd":(\d{1,10}))?,"ct":"'
)


def _header(record: Record) -> tuple[str, int | None, bytes | str]:
    """A sealed record's key id, compressed size and ciphertext, checked."""
    data = record.data
    fixed = _FIXED.match(data)
    if fixed is not None and data.endswith(b'"}'):
        size = None if fixed[2] is None else int(fixed[2])
        if size is None or size <= MAX_DECOMPRESSED_SIZE:
            return fixed[1].decode(), size, data[fixed.end() : -2]
    try:
        sealed = json.loads(data)
    except (ValueError, RecursionError):
        sealed = None
    if (
        not isinstance(sealed, dict)
        or sealed.get("$toast") != _ALGORITHM
        or not set(sealed) <= {"$toast", "kid", "zstd", "ct"}
        or not isinstance(sealed.get("kid"), str)
        or not isinstance(sealed.get("ct"), str)
    ):
        raise StorageValidationError(
            f"stored {record.class_name} record {record.id} is not encrypted as the class "
            f"requires (run the rekey command to encrypt records written before encryption "
            f"was turned on)"
        )
    size = sealed.get("zstd")
    if size is not None and (
        not isinstance(size, int)
        or isinstance(size, bool)
        or not 0 <= size <= MAX_DECOMPRESSED_SIZE
    ):
        raise StorageValidationError(
            f"stored {record.class_name} record {record.id} declares a size beyond "
            f"{MAX_DECOMPRESSED_SIZE} bytes"
        )
    return sealed["kid"], size, sealed["ct"]


def open_data(record: Record, keyring: Keyring) -> bytes:
    """The model's JSON of a sealed record: decrypted, its binding to class, id and schema
    version checked, and decompressed. Anything wrong is a `StorageValidationError` naming
    class, id and key id."""
    key_id, size, text = _header(record)
    where = f"{record.class_name} record {record.id}"
    if keyring._keys(key_id) is None:
        raise StorageValidationError(
            f"stored {where} is encrypted under key id {_shown_id(key_id)}, which the "
            f"keyring lacks (it holds {', '.join(map(repr, keyring.key_ids))})"
        )
    limit = (MAX_DECOMPRESSED_SIZE if size is None else MAX_DECOMPRESSED_SIZE // 2) * 4 // 3 + 64
    try:
        if len(text) > limit:
            raise ValueError("too long")
        # Not validated as base64 (a slow path): whatever is not base64 fails the tag.
        raw = binascii.a2b_base64(text)
        if len(raw) < _NONCE_SIZE + _TAG_SIZE:
            raise ValueError("too short")
        plaintext: bytes = keyring._aead(key_id).decrypt(
            raw[:_NONCE_SIZE], raw[_NONCE_SIZE:], _associated(record, key_id, size)
        )
    except Exception:  # noqa: BLE001 - InvalidTag, a bad length or base64: all one answer
        plaintext = b""
        failed = True
    else:
        failed = False
    if failed:
        raise StorageValidationError(
            f"stored {where} does not decrypt under key id {key_id!r}: it was tampered with, "
            "or copied from another record, class or schema version"
        )
    if size is None:
        return plaintext
    return _decompress(plaintext, size, where)


def _decompress(frame: bytes, size: int, where: str) -> bytes:
    try:
        return decompress(frame, size)
    except ValueError:
        pass  # raised outside the handler: the error keeps no buffer of the decompression
    raise StorageValidationError(f"stored {where} does not decompress to its declared size")


# --- signed references -------------------------------------------------------------------

_SIGNATURE_LENGTH = 43  # base64url of 32 bytes, unpadded


# Unix seconds fit in 64 bits (timedelta.max from now does); a longer int is hostile, and
# one past 4300 digits cannot even be formatted into the signed message.
_EXP_BITS = 64


def _signature(key: bytes, class_name: str, id: UUID, exp: int | None) -> str:
    message = f"pydantic-toast/ref/1\0{class_name}\0{id}\0{'' if exp is None else exp}"
    mac = hmac.new(key, message.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def sign_reference(
    keyring: Keyring, class_name: str, id: UUID, ttl: timedelta | None
) -> dict[str, Any]:
    """The signed reference to a record, expiring ``ttl`` from now when given."""
    exp = None if ttl is None else int(time.time() + ttl.total_seconds())
    reference: dict[str, Any] = {"class_name": class_name, "id": str(id)}
    if exp is not None:
        reference["exp"] = exp
    reference["sig"] = _signature(keyring._keys(keyring.primary).signing, class_name, id, exp)  # type: ignore[union-attr]
    return reference


def verify_reference(
    keyring: Keyring,
    class_name: str,
    id: UUID,
    reference: Mapping[str, Any],
    *,
    expiring: bool = False,
) -> None:
    """Refuse a reference to ``class_name`` whose signature is missing, malformed or wrong
    under every key of the keyring, or whose expiry has passed; with ``expiring`` (the class
    has a ``reference_ttl``), one without an expiry too, such as one signed before the ttl
    was set, which would never expire. Touches no storage."""
    sig, exp = reference.get("sig"), reference.get("exp")
    where = f"reference to {class_name} {id}"
    if sig is None:
        raise StorageValidationError(f"{where} is not signed, and {class_name} requires it")
    if exp is None and expiring:
        raise StorageValidationError(
            f"{where} has no expiry, and {class_name}'s references expire (reference_ttl)"
        )
    if not isinstance(sig, str) or len(sig) != _SIGNATURE_LENGTH:
        raise StorageValidationError(f"{where} has a malformed signature")
    if exp is not None and (
        not isinstance(exp, int) or isinstance(exp, bool) or exp.bit_length() > _EXP_BITS
    ):
        raise StorageValidationError(f"{where} has a malformed expiry")
    expected = sig.encode()
    valid = False
    for key in keyring._signing_keys():  # every key, whatever matched: the time says nothing
        valid |= hmac.compare_digest(_signature(key, class_name, id, exp).encode(), expected)
    if not valid:
        raise StorageValidationError(f"{where} has an invalid signature: forged or altered")
    if exp is not None and exp <= time.time():
        raise StorageValidationError(f"{where} expired at {exp} (Unix time)")
