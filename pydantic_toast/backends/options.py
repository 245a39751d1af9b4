"""One parser for every storage URL and every backend's options.

A backend declares its options as a `BackendOptions` model (typed fields with defaults and
bounds) and never parses a URL itself: `StorageBackend.__init__` splits the URL once with
`parse_storage_url`, and `parse_options` reads the declared options from the query string and
the keyword arguments with one set of rules:

* an option given twice in the URL (``?table=a&table=b``) is an error; a keyword argument
  replaces the URL's value;
* an unknown option is an error naming the closest known one, unless the backend passes it on
  to its driver (`BackendOptions.driver_option_names`); the error lists the backend's own
  options first, then the driver's;
* a driver option the backend refuses (`BackendOptions.refused_driver_options`) is an error
  saying why, and one whose value is a Python object (`BackendOptions.driver_keyword_names`)
  is taken only as a keyword argument;
* numbers, durations and booleans are validated by the declared type: ``Seconds`` is a finite
  positive number, ``Count`` a positive integer; ``true``/``false``/``1``/``0`` are booleans.

What is left for the driver comes back separately, so the backend hands the driver a URL or
keywords without pydantic-toast's own options.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Annotated, Any, ClassVar, TypeVar, get_args
from urllib.parse import parse_qsl, unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo

from pydantic_toast._errors import StorageValidationError, mask_url

__all__ = [
    "BackendOptions",
    "Count",
    "Identifier",
    "Seconds",
    "StorageURL",
    "format_duration",
    "parse_duration",
    "parse_options",
    "parse_storage_url",
]

Options = TypeVar("Options", bound="BackendOptions")

#: A finite, positive number of seconds (``inf`` and ``nan`` are refused).
Seconds = Annotated[
    float, Field(gt=0, allow_inf_nan=False, description="a positive number of seconds")
]
#: A positive whole number.
Count = Annotated[int, Field(ge=1, description="an integer >= 1")]
#: A table name: letters, digits and "_", not starting with a digit (always quoted in SQL).
Identifier = Annotated[
    str,
    Field(
        pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$",
        description="a table name (letters, digits and '_', at most 63, not starting with a digit)",
    ),
]


class BackendOptions(BaseModel):
    """The options a backend takes, declared as typed fields.

    Subclass it, one field per option, and name it in the backend's ``options_model``. The
    base declares none; its ``driver_option_names`` returns ``None`` (every other query
    option is the backend's own business), which keeps a custom backend that reads its own
    URL working unchanged.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    #: The backend's name in error messages ("sqlite", "PostgreSQL").
    label: ClassVar[str] = "storage"

    @classmethod
    def driver_option_names(cls) -> frozenset[str] | None:
        """Query options passed on to the driver untouched; ``None`` passes any, an empty
        set none (every unknown option is then an error). A backend that declares options
        of its own refuses every other one unless it names them here; a backend that
        declares none (a first-round custom backend reading its own URL) passes them all."""
        return None if cls is BackendOptions else frozenset()

    @classmethod
    def driver_keyword_names(cls) -> frozenset[str]:
        """Driver options passed on only as keyword arguments: their values are Python objects
        (a retry policy, a credential provider), which the text of a URL cannot carry."""
        return frozenset()

    @classmethod
    def refused_driver_options(cls) -> Mapping[str, str]:
        """Driver options refused from the URL and as keywords, each with the reason the error
        gives: those that would break what the backend relies on (a driver decoding replies
        the backend reads as bytes), or that the URL itself gives."""
        return {}


@dataclass(frozen=True)
class StorageURL:
    """A storage URL split once, for every backend.

    ``password`` is kept out of ``repr``; ``hosts`` lists every ``host[:port]`` of a
    multi-host URL (``postgresql://a:5432,b:5433/db``), in order; ``path`` is as written
    (percent-escapes kept), ``query`` the pairs left for the driver.
    """

    raw: str = field(repr=False)
    scheme: str
    username: str | None
    password: str | None = field(repr=False)
    hosts: tuple[tuple[str, int | None], ...]
    netloc: str  # host part without the user information
    path: str
    query: tuple[tuple[str, str], ...]
    fragment: str

    def __repr__(self) -> str:
        return f"StorageURL({mask_url(self.raw)!r})"

    @property
    def host(self) -> str | None:
        return self.hosts[0][0] if self.hosts else None

    @property
    def port(self) -> int | None:
        return self.hosts[0][1] if self.hosts else None

    @property
    def unquoted_path(self) -> str:
        return unquote(self.path)


def parse_storage_url(url: str) -> StorageURL:
    """Split ``url``; a malformed one is a `StorageValidationError` showing it masked."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise StorageValidationError(f"malformed storage URL {mask_url(url)!r}: {exc}") from exc
    userinfo, at, netloc = parts.netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    hosts: list[tuple[str, int | None]] = []
    for item in filter(None, netloc.split(",")):
        host, port = _host_port(item, url)
        hosts.append((host, port))
    return StorageURL(
        raw=url,
        scheme=parts.scheme.lower(),
        username=username,
        password=password,
        hosts=tuple(hosts),
        netloc=netloc,
        path=parts.path,
        query=tuple(parse_qsl(parts.query, keep_blank_values=True)),
        fragment=parts.fragment,
    )


_BRACKETED = re.compile(r"\[([0-9A-Fa-f:.]+)\](?::(\d*))?")


def _host_port(item: str, url: str) -> tuple[str, int | None]:
    bracketed = _BRACKETED.fullmatch(item)
    if bracketed is not None:
        host, port_text = bracketed[1], bracketed[2] or ""
    else:
        host, _, port_text = item.partition(":")
    if not port_text:
        return unquote(host), None
    if not port_text.isdigit():
        # Most often a password holding a raw '/', '?' or '#': what looks like the port is
        # then the password's start, so it is not shown.
        raise StorageValidationError(
            f"malformed storage URL {mask_url(url)!r}: the port is not a number (a '/', '?' "
            "or '#' in a password must be percent-encoded)"
        )
    if not 0 < int(port_text) < 65536:
        raise StorageValidationError(
            f"malformed storage URL {mask_url(url)!r}: port {port_text[:20]} is not 1-65535"
        )
    return unquote(host), int(port_text)


def parse_options(
    model: type[Options], location: StorageURL, keywords: Mapping[str, Any]
) -> tuple[Options, dict[str, Any]]:
    """The declared options of ``model`` from the URL's query and ``keywords``, and what is
    left for the driver (query pairs and keywords, by name)."""
    label = model.label
    fields = model.model_fields
    passed_on = model.driver_option_names()
    keyword_only = model.driver_keyword_names()
    refused = model.refused_driver_options()
    ours: dict[str, Any] = {}
    driver: dict[str, Any] = {}
    seen: set[str] = set()
    given = [(name, value, "URL") for name, value in location.query]
    for name, _, _ in given:
        if name in seen:
            raise StorageValidationError(f"{label} option {name!r} is given twice in the URL")
        seen.add(name)
    # A keyword replaces the URL's value: the URL often comes from configuration, and the
    # code that builds a backend by hand has the last word.
    given = [(n, v, w) for n, v, w in given if n not in keywords]
    given += [(name, value, "keyword") for name, value in keywords.items()]
    for name, value, where in given:
        if name in fields:
            ours[name] = value
        elif name in refused:
            raise StorageValidationError(f"{label} option {name!r} is refused: {refused[name]}")
        elif name in keyword_only and where == "URL":
            raise StorageValidationError(
                f"{label} option {name!r} takes a Python object, which a URL cannot carry: "
                "pass it as a keyword argument to the backend"
            )
        elif passed_on is None or name in passed_on or name in keyword_only:
            driver[name] = value
        else:
            usable = passed_on if where == "URL" else passed_on | keyword_only
            raise StorageValidationError(_unknown(label, name, where, list(fields), sorted(usable)))
    try:
        options = model.model_validate(ours)
    except ValidationError as exc:
        raise StorageValidationError(_invalid(model, exc)) from None
    return options, driver


def _unknown(label: str, name: str, where: str, own: list[str], driver: list[str]) -> str:
    shown = name if len(name) <= 40 else name[:37] + "..."
    message = f"unknown {label} option {shown!r}"
    if where == "keyword":
        message += " (keyword argument)"
    close = difflib.get_close_matches(name, [*own, *driver], n=1)
    if close:
        return f"{message}: did you mean {close[0]!r}?"
    # Every name, the backend's own first in the order they are declared (and documented):
    # a list cut short hides exactly the option someone was looking for.
    message += f"; {label} options: {', '.join(own) or 'none'}"
    if driver:
        message += f"; passed to the driver: {', '.join(driver)}"
    return message


def _invalid(model: type[BackendOptions], exc: ValidationError) -> str:
    problems = []
    for error in exc.errors(include_url=False):
        name = str(error["loc"][0]) if error["loc"] else ""
        value = repr(error.get("input"))
        if len(value) > 60:
            value = value[:57] + "..."
        field = model.model_fields.get(name)
        what = None if field is None else field.description or _description(field.annotation)
        if what is not None:
            problems.append(f"{model.label} option {name} must be {what}, not {value}")
        else:
            problems.append(f"invalid {model.label} option {name or 'value'}: {error['msg']}")
    return "; ".join(problems)


def _description(annotation: object) -> str | None:
    """What an option must be, from the ``description`` of its (possibly optional) type."""
    for metadata in getattr(annotation, "__metadata__", ()):
        if isinstance(metadata, FieldInfo) and metadata.description:
            return metadata.description
    for argument in get_args(annotation):
        found = _description(argument)
        if found is not None:
            return found
    if annotation is bool:
        return "true or false"
    return None


_DURATION = re.compile(r"(-?\d+(?:\.\d+)?)([a-z]+)", re.IGNORECASE)
# No "m": minutes to some, months to others. A purge must not read one as the other.
_SECONDS_PER = {"s": 1, "min": 60, "h": 3600, "d": 86400, "w": 604800}
_LONGEST = timedelta(days=1000 * 365)  # far past any record, well inside the calendar


def parse_duration(text: str, *, allow_zero: bool = False) -> timedelta:
    """``30d``, ``12h``, ``90min``, ``45s``, ``2w``, decimals too (``1.5h``); at least a
    microsecond (or zero too with ``allow_zero``), at most 1000 years. Units are
    case-insensitive.

    ``m`` is refused as ambiguous (a minute or a month?): write ``min``, or days for months.
    Every problem is a `StorageValidationError` whose message names the text.
    """
    match = _DURATION.fullmatch(text.strip())
    unit = "" if match is None else match[2].lower()
    if match is None or unit not in (*_SECONDS_PER, "m"):
        raise StorageValidationError(f"not a duration: {text!r} (use 30d, 12h, 90min, 45s or 2w)")
    if unit == "m":
        raise StorageValidationError(
            f"ambiguous duration {text!r}: write {match[1]}min for minutes, "
            "or days for months (30d)"
        )
    seconds = float(match[1]) * _SECONDS_PER[unit]
    if seconds == 0 and allow_zero:
        return timedelta(0)
    if seconds <= 0:
        raise StorageValidationError(f"a duration must be more than zero: {text!r}")
    if seconds > _LONGEST.total_seconds():
        raise StorageValidationError(f"too long a duration: {text!r}")
    span = timedelta(seconds=seconds)
    if not span:  # rounded to whole microseconds: a zero no one wrote
        raise StorageValidationError(f"too short a duration: {text!r} (less than a microsecond)")
    return span


def format_duration(span: timedelta) -> str:
    """``span`` in the largest unit `parse_duration` reads that divides it (``2w``, ``90min``)."""
    micros = span // timedelta(microseconds=1)  # exact, where a float's digits may run out
    if micros < 0:
        return "-" + format_duration(-span)
    for unit in ("w", "d", "h", "min"):
        size = _SECONDS_PER[unit] * 1_000_000
        if micros >= size and micros % size == 0:
            return f"{micros // size}{unit}"
    whole, fraction = divmod(micros, 1_000_000)
    return f"{whole}.{fraction:06d}".rstrip("0").rstrip(".") + "s"
