"""The one duration parser (`pydantic_toast.backends.options.parse_duration`), which the CLI's
``--older-than`` and ``--grace`` use; tests/test_cli_args.py checks it through the CLI."""

from __future__ import annotations

from datetime import timedelta

import pytest

from pydantic_toast import StorageValidationError
from pydantic_toast.backends.options import format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "span"),
    [
        ("30d", timedelta(days=30)),
        ("12h", timedelta(hours=12)),
        ("12H", timedelta(hours=12)),
        ("90min", timedelta(minutes=90)),
        (" 45s ", timedelta(seconds=45)),
        ("2w", timedelta(weeks=2)),
        ("1.5h", timedelta(minutes=90)),
    ],
)
def test_parse_duration_reads_s_min_h_d_w(text: str, span: timedelta) -> None:
    assert parse_duration(text) == span


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1m", "ambiguous duration '1m': write 1min for minutes, or days for months (30d)"),
        ("0s", "a duration must be more than zero: '0s'"),
        ("-1d", "a duration must be more than zero: '-1d'"),
        ("10sec", "not a duration: '10sec' (use 30d, 12h, 90min, 45s or 2w)"),
        ("1 h", "not a duration: '1 h' (use 30d, 12h, 90min, 45s or 2w)"),
        ("99999999999w", "too long a duration: '99999999999w'"),
        # Under a microsecond, a timedelta is zero: `purge --older-than` would delete all.
        ("0.0000001s", "too short a duration: '0.0000001s' (less than a microsecond)"),
        ("0.0000000001h", "too short a duration: '0.0000000001h' (less than a microsecond)"),
    ],
)
def test_parse_duration_refuses_with_a_storage_validation_error(text: str, message: str) -> None:
    with pytest.raises(StorageValidationError) as caught:
        parse_duration(text)
    assert str(caught.value) == message


def test_parse_duration_takes_zero_only_when_allowed() -> None:
    assert parse_duration("0s", allow_zero=True) == timedelta(0)
    assert parse_duration("0.0h", allow_zero=True) == timedelta(0)
    with pytest.raises(StorageValidationError) as caught:
        parse_duration("-1s", allow_zero=True)
    assert str(caught.value) == "a duration must be more than zero: '-1s'"
    with pytest.raises(StorageValidationError) as caught:
        parse_duration("0.0000001s", allow_zero=True)  # not zero: too short to hold
    assert str(caught.value) == "too short a duration: '0.0000001s' (less than a microsecond)"
    assert parse_duration("0.000001s") == timedelta(microseconds=1)


@pytest.mark.parametrize(
    "text",
    ["2w", "3d", "5h", "90min", "45s", "1.5s", "1234567s", "1234567.5s", "0.000001s", "1000000h"],
)
def test_format_duration_writes_what_parse_duration_reads(text: str) -> None:
    assert format_duration(parse_duration(text)) == text
