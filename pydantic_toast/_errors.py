"""The library's exceptions, and the URL masking that keeps passwords out of them.

Every error a user can see passes through here, so this is the one place that decides how a
storage URL is shown: with its password replaced by ``***``.

The tree. Catch the four public bases; the leaves say more::

    ExternalStorageError                  anything pydantic-toast raises
    ├── StorageConnectionError            transient: unreachable, reset, timed out, failing
    │                                     over. The only kind that is retried.
    ├── StorageOperationError             permanent: the store answered and refused, or failed
    │   │                                 for good (permission denied, disk full, a closed
    │   │                                 backend, a bug in a custom backend). Never retried.
    │   └── UnsupportedOperationError     the backend cannot do this (also NotImplementedError)
    ├── RecordNotFoundError               no record for the reference (also LookupError)
    └── StorageValidationError            bad configuration, reference or data (also ValueError)
        └── CorruptRecordError            what the store holds is not a valid record

``StorageConnectionError`` and ``StorageOperationError`` carry ``url`` (password masked) and
``failed_ids``; the driver's exception is their ``__cause__``. Every exception here survives
`copy.copy` and `pickle` (Celery and multiprocessing send exceptions between processes).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    from pydantic import ValidationError
    from pydantic_core import ErrorDetails

__all__ = [
    "NESTING_ERRORS",
    "CorruptRecordError",
    "ExternalStorageError",
    "NestingError",
    "RecordNotFoundError",
    "StorageConnectionError",
    "StorageOperationError",
    "StorageValidationError",
    "UnsupportedOperationError",
    "error_details",
    "invalid_data",
    "mask_url",
    "nesting_in",
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
            # Drivers decode the name (``pass%77ord`` is ``password``), so it is judged decoded.
            secret = equals and _is_secret_option(unquote(key))
            pairs.append(f"{key}={_MASK}" if secret else pair)
        rest = f"{head}?{'&'.join(pairs)}{hashmark}{fragment}"
    return f"{scheme}://{rest}"


def scrub_password(text: str, url: str) -> str:
    """Remove ``url``'s password from ``text`` (a driver's message may quote the DSN).

    The URL itself, and its ``:password@`` wherever it appears, are masked whatever the
    password's length; the bare password is replaced elsewhere only when it is at least four
    characters long (a shorter one would mangle ordinary words).
    """
    if url in text:
        text = text.replace(url, mask_url(url))
    try:
        password = urlsplit(url).password
    except ValueError:
        return text
    if not password:
        return text
    for form in {password, unquote(password)}:
        text = text.replace(f":{form}@", f":{_MASK}@")
        if len(form) >= 4:
            text = text.replace(form, _MASK)
    return text


def _is_secret_option(key: str) -> bool:
    key = key.lower()
    return any(
        word in key
        for word in ("password", "passwd", "secret", "token", "access_key", "api_key", "private")
    )


# How much of a ValidationError `invalid_data` shows: the first errors, within a bound. Past
# `_LISTED` errors none is listed: Pydantic builds every error's details at once, and those
# of a record with a million bad items take hundreds of megabytes.
_LISTED = 1000
_SHOWN_ERRORS = 5
_SHOWN_PART = 40
_SHOWN_TEXT = 2000


def error_details(error: ValidationError) -> list[ErrorDetails]:
    """The errors of ``error``, without their inputs; none when there are too many to list."""
    if error.error_count() > _LISTED:
        return []
    return error.errors(include_url=False, include_input=False)


def invalid_data(
    error: ValidationError, details: list[ErrorDetails] | None = None, *, sealed: bool = False
) -> str:
    """What a ValidationError of stored (or received) data says without its input values:
    the first errors' locations and messages (``details``: `error_details`, if already
    taken). Pydantic's own text quotes every input, which would put a decrypted field into
    a log or an HTTP response, and formats a record of hundreds of megabytes whole. Of data
    that was ``sealed`` (decrypted for this), only the locations: a validator's message may
    quote the value it refused."""
    count = error.error_count()
    if details is None:
        details = error_details(error)
    shown = [
        ".".join(str(part)[:_SHOWN_PART] for part in detail["loc"]) or "(the value)"
        for detail in details[:_SHOWN_ERRORS]
    ]
    if not sealed:
        shown = [f"{where}: {detail['msg']}" for where, detail in zip(shown, details, strict=False)]
    elif shown:
        shown[-1] += " (messages not shown: the record is encrypted)"
    if not shown:
        return f"{count} validation errors (too many to list)"
    if count > len(shown):
        shown.append(f"and {count - len(shown)} more")
    text = f"{count} validation error{'' if count == 1 else 's'}: {'; '.join(shown)}"
    return text if len(text) <= _SHOWN_TEXT else text[: _SHOWN_TEXT - 3] + "..."


#: What is wrong with how references nest, by Pydantic error type: the message templates of
#: the errors `External` raises, and that `NestingError` carries up.
NESTING_ERRORS = {
    "external_cycle": "reference cycle: {class_name} {id} refers back to itself",
    "external_too_deep": (
        "references nest deeper than {max_depth} levels at {class_name} {id} "
        "(pydantic_toast.validate's max_depth sets the limit)"
    ),
}


class ExternalStorageError(Exception):
    """Base class of every error pydantic-toast raises."""

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt from its state, not through __init__ (whose arguments differ per class and
        # which would mask the URL and append it again): copies and pickles keep everything.
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(cls: type[ExternalStorageError], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    if "failed_ids" in state:
        error.__dict__["failed_ids"] = list(state["failed_ids"])  # a copy owns its list
    return error


class _StorageFailure(ExternalStorageError):
    """A failure while talking to a store: ``url`` masked, ``failed_ids`` of a write.

    ``failed_ids``, when the failure ended a write, lists the ids of the records that write
    may not have stored; every other record it was given is stored. A record listed may
    still have been stored (a connection lost after the server wrote it, before it replied):
    writes are upserts by id, so writing the listed records again is always safe.
    """

    def __init__(self, message: str, url: str = "", *, failed_ids: Iterable[str] = ()) -> None:
        self.url = mask_url(url) if url else ""
        self.failed_ids: list[str] = list(failed_ids)
        shown = scrub_password(message, url) if url else message
        super().__init__(f"{shown} ({self.url})" if self.url else shown)


class StorageConnectionError(_StorageFailure):
    """The storage could not be reached, or the connection failed: transient, so retried."""


class StorageOperationError(_StorageFailure):
    """The storage refused or failed for good: retrying cannot help, so nothing retries."""


class UnsupportedOperationError(StorageOperationError, NotImplementedError):
    """The backend does not implement this operation (a four-method custom backend cannot
    delete or list records)."""


class RecordNotFoundError(ExternalStorageError, LookupError):
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


class StorageValidationError(ExternalStorageError, ValueError):
    """Configuration, a reference or a stored record is not what it must be."""


class NestingError(StorageValidationError):
    """References that form a cycle or nest past the limit, met while a stored record was
    validated; passed up as itself through the levels above (``kind``: its Pydantic error
    type, ``context``: the values of its message)."""

    def __init__(self, kind: str, context: dict[str, Any]) -> None:
        self.kind, self.context = kind, context
        super().__init__(NESTING_ERRORS[kind].format(**context))


def nesting_in(details: list[ErrorDetails]) -> NestingError | None:
    """The nesting error among ``details`` (of `error_details`), if one is there."""
    for detail in details:
        if detail["type"] in NESTING_ERRORS:
            return NestingError(detail["type"], dict(detail.get("ctx") or {}))
    return None


class CorruptRecordError(StorageValidationError):
    """A stored record cannot be decoded: it names the class and id (``class_name``, ``id``),
    never the stored bytes."""

    def __init__(self, class_name: str, id: object, problem: str) -> None:
        self.class_name = class_name
        self.id = str(id)
        # A listing of every class may meet a record whose class cannot be read: "" then.
        named = f" {class_name}" if class_name else ""
        super().__init__(f"stored{named} record {id} is corrupt: {problem}")


# Tracebacks and reprs name the public errors where users import them from, not this private
# module (pickle finds them there too).
for _public in (
    CorruptRecordError,
    ExternalStorageError,
    RecordNotFoundError,
    StorageConnectionError,
    StorageOperationError,
    StorageValidationError,
    UnsupportedOperationError,
):
    _public.__module__ = "pydantic_toast"
del _public
