"""Configuration of an `ExternalBaseModel`: `ExternalConfigDict`, checked when a class is
defined, so that a wrong URL, a misspelt key or two classes claiming one stored name fail
at import time, naming the class, and never at the first save in production."""

from __future__ import annotations

import difflib
import os
import sys
import warnings
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import timedelta
from typing import Any

from pydantic import ConfigDict

from pydantic_toast._crypto import (
    KEYS_VARIABLE,
    Keyring,
    keyring_from_text,
    require_cryptography,
)
from pydantic_toast._errors import StorageValidationError, mask_url
from pydantic_toast._references import short
from pydantic_toast._registry import check_storage_url, registered_schemes
from pydantic_toast._retry import RetryPolicy
from pydantic_toast.backends.records import check_class_name, require_zstd

__all__ = [
    "ExternalConfigDict",
    "ExternalNameWarning",
    "ModelSettings",
    "as_duration",
    "settings_for",
]


class ExternalConfigDict(ConfigDict, total=False):
    """Pydantic's `ConfigDict` plus the storage settings of an `ExternalBaseModel`."""

    storage: str
    """The storage URL, such as ``"sqlite:///models.db"`` or ``"postgresql://host/db"``."""

    schema_version: int
    """Stored with every record (default 1); raise it when the model's shape changes, and
    register a `migration` from the previous version."""

    class_name: str
    """The stable name records are stored under (default: the class's ``__name__``). Set it to
    rename or move the class without orphaning its records, or to tell apart two classes of
    the same name in one storage (``"billing.User"``)."""

    ttl: float | timedelta
    """Time to live of the records (seconds or a timedelta), counted from their last save.
    Redis expires them itself; elsewhere an expired record loads as missing, and
    `purge_external` deletes them."""

    save_migrated: bool
    """Write a record back after a load migrated it to the current schema version."""

    retries: int
    """How many times a load, save or delete is tried again after a connection failure
    (default 2, with exponential backoff); 0 turns retrying off."""

    retry_backoff: float
    """Seconds before the first retry (default 0.05), doubling for each next one."""

    compress_above: int
    """Compress a record's JSON with zstd when it is longer than this many bytes, on the
    backends that store bytes (Redis, S3, files); needs ``pydantic-toast[zstd]``."""

    content_addressed: bool
    """Store each saved state under an id derived from its content (default false: a model
    keeps its random id and is saved in place). Equal models then share one record, a changed
    model gets a new reference, and every load verifies the content against its id."""

    encrypt: bool
    """Store the records encrypted with AES-256-GCM under the class's keyring (needs
    ``pydantic-toast[crypto]``): the stored form shows no field values, only the metadata."""

    keyring: Keyring
    """This class's own keys (default: the one `use_keyring` installed, else the keys in
    ``PYDANTIC_TOAST_KEYS``)."""

    signed_references: bool
    """Sign this class's references with HMAC-SHA256 under a key derived from the keyring,
    and refuse unsigned, forged or expired ones before any storage access."""

    reference_ttl: float | timedelta
    """How long a signed reference stays valid (seconds or a timedelta): its ``"exp"``."""


class ExternalNameWarning(UserWarning):
    """Two classes defined inside functions store under one name in one storage."""


@dataclass(frozen=True, slots=True)
class ModelSettings:
    """What a class's configuration says, checked."""

    storage: str
    class_name: str
    schema_version: int
    ttl: timedelta | None
    compress_above: int | None
    retry: RetryPolicy
    save_migrated: bool
    content_addressed: bool
    encrypt: bool = False
    keyring: Keyring | None = None
    signed_references: bool = False
    reference_ttl: timedelta | None = None

    @property
    def references_expire(self) -> bool:
        """Whether the class's references carry an expiry, which a reference must then have."""
        return self.reference_ttl is not None

    def __repr__(self) -> str:
        values = {field.name: getattr(self, field.name) for field in fields(self)}
        values["storage"] = mask_url(self.storage)
        return f"ModelSettings({', '.join(f'{name}={value!r}' for name, value in values.items())})"


def settings_of(cls: type) -> ModelSettings:
    """A model class's settings, where an operation starts: `ExternalBaseModel` itself has
    none, and says so with the library's error rather than Pydantic's AttributeError."""
    try:
        settings: ModelSettings = cls.__external_settings__  # type: ignore[attr-defined]
    except AttributeError:
        raise StorageValidationError(
            f"{cls.__name__} has no storage: call this on a subclass that sets "
            "model_config = ExternalConfigDict(storage=...)"
        ) from None
    return settings


_CONFIG_KEYS = ExternalConfigDict.__optional_keys__ | ExternalConfigDict.__required_keys__


def as_duration(value: object) -> object:
    """Seconds (an int or a float) as a timedelta; anything else, and a number no timedelta
    holds (inf, nan, 1e20), as it is, for the caller to refuse as no positive duration."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return timedelta(seconds=value)
        except (OverflowError, ValueError):
            return value
    return value


def settings_for(cls: type, config: Mapping[str, Any], bases: tuple[type, ...]) -> ModelSettings:
    """Check ``cls``'s configuration; ``bases`` are its stored ancestors (whose explicit
    ``class_name`` it inherits in the config, but not as its own name)."""
    owner = f"{cls.__module__}.{cls.__qualname__}"
    for key in config:
        if key not in _CONFIG_KEYS:
            close = difflib.get_close_matches(key, _CONFIG_KEYS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise StorageValidationError(
                f"{owner}: unknown ExternalConfigDict key {short(key)}{hint}"
            )
    storage = config.get("storage")
    if not storage:
        raise StorageValidationError(
            f"{owner} has no storage: set model_config = ExternalConfigDict("
            f"storage='scheme://...'); registered schemes: {', '.join(registered_schemes())}"
        )
    check_storage_url(storage, owner)
    assert isinstance(storage, str)  # check_storage_url proved it
    version = config.get("schema_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise StorageValidationError(
            f"{owner}: schema_version must be a positive int, not {version!r}"
        )
    try:
        # A stable name is the class's own: a subclass inherits the config, not the name.
        explicit = config.get("class_name")
        if any(base.model_config.get("class_name") == explicit for base in bases):  # type: ignore[attr-defined]
            explicit = None
        class_name = check_class_name(cls.__name__ if explicit is None else explicit)
    except StorageValidationError as exc:
        raise StorageValidationError(f"{owner}: {exc}") from exc
    ttl = as_duration(config.get("ttl"))
    if ttl is not None and (not isinstance(ttl, timedelta) or ttl <= timedelta(0)):
        raise StorageValidationError(
            f"{owner}: ttl must be a positive duration, not {config.get('ttl')!r}"
        )
    compress_above = config.get("compress_above")
    if compress_above is not None:
        if not isinstance(compress_above, int) or compress_above < 0:
            raise StorageValidationError(
                f"{owner}: compress_above must be a byte count, not {compress_above!r}"
            )
        try:
            require_zstd()
        except StorageValidationError as exc:
            raise StorageValidationError(f"{owner}: {exc}") from exc
    retries, backoff = config.get("retries", 2), config.get("retry_backoff", 0.05)
    if not isinstance(retries, int) or retries < 0 or not isinstance(backoff, int | float):
        raise StorageValidationError(
            f"{owner}: retries must be a count and retry_backoff seconds, "
            f"not {retries!r} and {backoff!r}"
        )
    encrypt, signed, keyring, reference_ttl = _security(config, owner)
    _claim_name(storage, class_name, owner, cls)
    return ModelSettings(
        storage=storage,
        class_name=class_name,
        schema_version=version,
        ttl=ttl,
        compress_above=compress_above,
        retry=RetryPolicy(retries, float(backoff)),
        save_migrated=bool(config.get("save_migrated")),
        content_addressed=bool(config.get("content_addressed")),
        encrypt=encrypt,
        keyring=keyring,
        signed_references=signed,
        reference_ttl=reference_ttl,
    )


def _security(
    config: Mapping[str, Any], owner: str
) -> tuple[bool, bool, Keyring | None, timedelta | None]:
    """The checked ``encrypt``, ``signed_references``, ``keyring`` and ``reference_ttl``."""
    encrypt, signed = config.get("encrypt", False), config.get("signed_references", False)
    if not isinstance(encrypt, bool) or not isinstance(signed, bool):
        raise StorageValidationError(f"{owner}: encrypt and signed_references are booleans")
    keyring = config.get("keyring")
    if keyring is not None and not isinstance(keyring, Keyring):
        raise StorageValidationError(
            f"{owner}: keyring must be a pydantic_toast.Keyring, not {type(keyring).__name__}"
        )
    if encrypt:
        try:
            require_cryptography()
        except StorageValidationError as exc:
            raise StorageValidationError(f"{owner}: {exc}") from exc
    if (encrypt or signed) and keyring is None and os.environ.get(KEYS_VARIABLE, "").strip():
        try:  # keys from the environment are checked now too, not at the first save
            keyring_from_text(os.environ[KEYS_VARIABLE])
        except StorageValidationError as exc:
            raise StorageValidationError(f"{owner}: {exc}") from None
    ttl = as_duration(config.get("reference_ttl"))
    if ttl is not None and (not isinstance(ttl, timedelta) or ttl <= timedelta(0)):
        raise StorageValidationError(
            f"{owner}: reference_ttl must be a positive duration, not "
            f"{config.get('reference_ttl')!r}"
        )
    if ttl is not None and not signed:
        raise StorageValidationError(
            f"{owner}: reference_ttl needs signed_references=True (an unsigned expiry could "
            "be edited by whoever holds the reference)"
        )
    return encrypt, signed, keyring, ttl


def _class_statement_level() -> int:
    """The ``stacklevel`` of `_claim_name`'s warning that points at the class statement: the
    first caller outside this library and Pydantic, whose frames in between vary."""
    frame, level = sys._getframe(2), 2
    while frame.f_back is not None and frame.f_globals.get("__name__", "").partition(".")[0] in (
        "pydantic_toast",
        "pydantic",
    ):
        frame, level = frame.f_back, level + 1
    return level


# Which class stores under which name in which storage: (storage, class name) -> its owner
# ("module.QualName") and the classes of that owner (one per definition: a cell run again
# defines it anew), held weakly: classes that were garbage collected hold no name, so a new
# class may take it.
_names: dict[tuple[str, str], tuple[str, weakref.WeakSet[type]]] = {}


def _claim_name(storage: str, class_name: str, owner: str, cls: type) -> None:
    """Refuse two different live classes storing under one name in one storage.

    Redefining the same class (a notebook cell run again, a reloaded module) is no collision;
    classes defined inside functions, as tests do, only get a warning.
    """
    key = (storage, class_name)
    claim = _names.get(key)
    holder = None if claim is None or not claim[1] else claim[0]
    if holder == owner:
        assert claim is not None
        claim[1].add(cls)  # an older definition may outlive this one: both hold the name
        return
    _names[key] = (owner, weakref.WeakSet([cls]))
    if holder is None:
        return
    message = (
        f"{owner} and {holder} both store records as {class_name!r} in "
        f"{mask_url(storage)}; give one a stable name: ExternalConfigDict(class_name=...)"
    )
    if "<locals>" in owner or "<locals>" in holder:
        warnings.warn(message, ExternalNameWarning, stacklevel=_class_statement_level())
        return
    assert claim is not None
    _names[key] = claim  # the live holder keeps the name
    raise StorageValidationError(message)
