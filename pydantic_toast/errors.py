"""The library's exceptions, and the URL masking that keeps passwords out of them.

Every error a user can see passes through here, so this is the one place that decides how a
storage URL is shown: with its password replaced by ``***``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote, urlsplit

__all__ = [
    "ExternalStorageError",
    "RecordNotFoundError",
    "StorageConnectionError",
    "StorageValidationError",
    "mask_url",
    "scrub_password",
]

_MASK = "***"


def mask_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***``.

    Query options that carry secrets (``password``, ``secret``, ``token`` ...) are masked too.
    Everything else is left as written. The URL is cut by position, not parsed: a password
    may hold an unencoded ``/``, ``#`` or ``?``, so everything between ``://`` and the last
    ``@`` counts as user information. That can hide more than the password in an odd URL,
    never less.
    """
    scheme, separator, rest = url.partition("://")
    if not separator:
        return _MASK if "@" in url else url
    at = rest.rfind("@")
    if at >= 0:
        user, colon, _password = rest[:at].partition(":")
        rest = f"{user}{':' + _MASK if colon else ''}@{rest[at + 1 :]}"
    head, question, query = rest.partition("?")
    if question:
        query, hashmark, fragment = query.partition("#")
        pairs = []
        for pair in query.split("&"):
            key, equals, _value = pair.partition("=")
            pairs.append(f"{key}={_MASK}" if equals and _is_secret_option(key) else pair)
        rest = f"{head}?{'&'.join(pairs)}{hashmark}{fragment}"
    return f"{scheme}://{rest}"


def scrub_password(text: str, url: str) -> str:
    """Remove ``url``'s password from ``text`` (a driver's message may quote the DSN)."""
    try:
        password = urlsplit(url).password
    except ValueError:
        return text
    if not password or len(password) < 4:
        return text
    for form in {password, unquote(password)}:
        text = text.replace(form, _MASK)
    return text


def _is_secret_option(key: str) -> bool:
    key = key.lower()
    return any(
        word in key
        for word in ("password", "passwd", "secret", "token", "access_key", "api_key", "private")
    )


class ExternalStorageError(Exception):
    """Base class of every error pydantic-toast raises."""


class StorageConnectionError(ExternalStorageError):
    """The storage could not be reached, or it failed while talking to it.

    ``url`` is the storage URL with its password masked; the driver's own exception is
    chained as ``__cause__``.

    ``failed_ids``, when the failure ended a write, lists the ids of the records that write
    may not have stored; every other record it was given is stored. A record listed may
    still have been stored (a connection lost after the server wrote it, before it replied):
    writes are upserts by id, so writing the listed records again is always safe.
    """

    def __init__(self, message: str, url: str, *, failed_ids: Iterable[str] = ()) -> None:
        self.url = mask_url(url)
        self.failed_ids: list[str] = list(failed_ids)
        super().__init__(f"{scrub_password(message, url)} ({self.url})")

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt from its state, not through __init__ (which would mask the URL and append
        # it again): copies and pickles work.
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(
    cls: type[StorageConnectionError], args: tuple[Any, ...], state: dict[str, Any]
) -> Any:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state, failed_ids=list(state.get("failed_ids", ())))
    return error


class RecordNotFoundError(ExternalStorageError):
    """No record exists for the reference.

    ``id`` is the first missing id; ``ids`` lists every missing id of a batch.
    """

    def __init__(self, class_name: str, ids: list[str], url: str = "") -> None:
        self.class_name = class_name
        self.ids = ids
        self.id = ids[0] if ids else ""
        self.url = mask_url(url) if url else ""
        where = f" in {self.url}" if self.url else ""
        if len(ids) == 1:
            message = f"no {class_name} record with id {ids[0]}{where}"
        else:
            message = f"no {class_name} records with ids {', '.join(ids)}{where}"
        super().__init__(message)


class StorageValidationError(ExternalStorageError):
    """Configuration, a reference or a stored record is not what it must be."""
