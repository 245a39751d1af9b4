"""`python -m pydantic_toast`'s command line, run as a subprocess: what it accepts, what it
refuses, and that nothing it prints shows a storage password."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pydantic_toast import ExternalBaseModel, ExternalConfigDict

SECRET = "s3cr3tpassw0rd"
URL = f"postgresql://user:{SECRET}@127.0.0.1:1/db"  # port 1: nothing answers
MASKED = "postgresql://user:***@127.0.0.1:1/db"
# A URL whose user information runs past the first 80 characters: a message that cuts a long
# value short shows the whole password but not the "@" that marks where it ends.
LONG_URL = f"postgresql://user:{SECRET}{'x' * 60}@127.0.0.1:1/db"


def run(*arguments: str, storage: str | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI with exactly these arguments; ``storage`` goes in $PYDANTIC_TOAST_STORAGE."""
    env = {k: v for k, v in os.environ.items() if k != "PYDANTIC_TOAST_STORAGE"}
    if storage is not None:
        env["PYDANTIC_TOAST_STORAGE"] = storage
    return subprocess.run(
        [sys.executable, "-m", "pydantic_toast", *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def last_line(text: str) -> str:
    return text.rstrip("\n").rpartition("\n")[2]


@pytest.mark.parametrize(
    "arguments",
    [
        [URL, "ping"],  # the URL taken for the command
        ["--json", URL],
        ["--storage", URL, "ping", URL],  # unrecognized arguments
        [f"--json={URL}", "ping"],  # the tail after "=" is echoed
        ["--storage", URL, "purge", "Invoice", "--older-than", URL],  # not a duration
        ["--storage", URL, "ls"],  # a usage line
        ["ls", "--storage", URL],
        ["stats", "--limit", URL, "--storage", URL],
        ["ls", "Invoice", "--limit", URL, "--storage", URL],  # not a whole number
        ["--storage", URL, "frobnicate", URL],
        ["--storage", URL, "get", "Invoice", "--id", URL],
        [f"user:{SECRET}@127.0.0.1:1/db", "ping"],  # no scheme, still a password
        [f"{URL}?table=x&password={SECRET}x", "stats"],
    ],
)
def test_usage_errors_never_show_the_password(arguments: list[str]) -> None:
    result = run(*arguments)
    assert result.returncode == 2, result.stderr
    assert SECRET not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert last_line(result.stderr).startswith("python -m pydantic_toast")


def test_help_with_a_url_glued_on_never_shows_the_password() -> None:
    result = run(f"-h{URL}")
    assert SECRET not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    if sys.version_info >= (3, 13):  # argparse prints the help and ignores the tail
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("usage: python -m pydantic_toast ")
    else:  # the tail after "-h" is echoed, masked
        assert result.returncode == 2, result.stderr
        assert last_line(result.stderr).startswith("python -m pydantic_toast")


def test_a_masked_url_is_still_recognisable() -> None:
    result = run(URL, "ping")
    assert result.returncode == 2
    assert result.stderr.startswith("usage: python -m pydantic_toast ")
    assert last_line(result.stderr).startswith(
        f"python -m pydantic_toast: error: argument command: invalid choice: '{MASKED}'"
    )
    # A password with a quote and a backslash: repr() escapes the backslash and chooses
    # the other quote, so the message holds the URL in a form that differs from the word.
    odd = f"postgresql://user:{SECRET}\\'x@127.0.0.1:1/db"
    quoted = run(odd, "ping")
    assert quoted.returncode == 2
    assert SECRET not in quoted.stderr
    assert last_line(quoted.stderr).startswith(
        f'python -m pydantic_toast: error: argument command: invalid choice: "{MASKED}"'
    )


@pytest.mark.parametrize(
    "arguments",
    [
        ["ls", LONG_URL],  # the class name is cut to 80 characters
        ["get", LONG_URL, "550e8400-e29b-41d4-a716-446655440000"],
        ["rm", "Invoice", LONG_URL],  # the id is cut to 80 characters
        ["get", '{"class_name": "Invoice", "id": "' + LONG_URL + '"}'],
        ["rekey", f"redis://app:{SECRET}@cache.internal:6379/0"],  # a URL for MODULE:CLASS
    ],
)
def test_argument_errors_never_show_the_password(arguments: list[str], tmp_path: Path) -> None:
    result = run(*arguments, storage=f"sqlite:///{tmp_path}/models.db")
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("error: ")
    assert SECRET not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_storage_errors_never_show_the_password() -> None:
    for storage in (URL, LONG_URL):
        result = run("ls", "Invoice", storage=storage)
        assert result.returncode == 1
        assert result.stderr.startswith("error: ")
        assert SECRET not in result.stdout + result.stderr


@pytest.fixture
async def store(sqlite_url: str) -> str:
    """An SQLite store holding two Invoice records."""

    class Invoice(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=sqlite_url)
        number: int

    await Invoice.save_external_many([Invoice(number=1), Invoice(number=2)])
    return sqlite_url


@pytest.mark.parametrize(
    "arguments",
    [
        ["--storage", "{store}", "--json", "stats"],
        ["--json", "stats", "--storage", "{store}"],
        ["stats", "--json", "--storage", "{store}"],
        ["stats", "--storage", "{store}", "--json"],
        ["--storage", "{store}", "stats", "--json"],
        [f"--storage={URL}", "stats", "--storage={store}", "--json"],  # the last one counts
    ],
)
def test_storage_and_json_go_before_or_after_the_command(store: str, arguments: list[str]) -> None:
    result = run(*(word.format(store=store) for word in arguments))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    [row] = json.loads(result.stdout)
    assert (row["class_name"], row["records"]) == ("Invoice", 2)


def test_storage_and_json_after_each_command(store: str) -> None:
    ping = run("ping", "--storage", store)
    assert ping.returncode == 0, ping.stderr
    assert ping.stdout.startswith(f"ok: {store} answered in ")
    listed = run("ls", "Invoice", "--json", "--storage", store)
    assert listed.returncode == 0, listed.stderr
    assert len(json.loads(listed.stdout)) == 2
    first = json.loads(listed.stdout)[0]["id"]
    got = run("get", "Invoice", first, "--storage", store)
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["id"] == first
    dry = run("purge", "Invoice", "--older-than", "1d", "--dry-run", "--json", "--storage", store)
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["would delete"] == 0
    removed = run("rm", "Invoice", first, "--storage", store, "--json")
    assert removed.returncode == 0, removed.stderr
    assert json.loads(removed.stdout) == {"requested": 1, "deleted": 1}


def test_storage_given_anywhere_wins_over_the_environment(store: str) -> None:
    result = run("ls", "Invoice", "--storage", store, storage=URL)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 3  # a header and two records
    from_env = run("ls", "Invoice", "--json", storage=store)
    assert from_env.returncode == 0, from_env.stderr
    assert len(json.loads(from_env.stdout)) == 2


@pytest.mark.parametrize(
    ("duration", "seconds"),
    [
        ("30d", 30 * 86400),
        ("12h", 12 * 3600),
        ("90min", 90 * 60),
        ("45s", 45),
        ("2w", 14 * 86400),
        ("1.5h", 5400),
        ("0.5d", 43200),
    ],
)
def test_purge_takes_durations_in_s_min_h_d_w(store: str, duration: str, seconds: int) -> None:
    started = dt.datetime.now(dt.UTC)
    result = run(
        "purge", "Invoice", "--older-than", duration, "--dry-run", "--json", "--storage", store
    )
    finished = dt.datetime.now(dt.UTC)
    assert result.returncode == 0, result.stderr
    before = dt.datetime.fromisoformat(json.loads(result.stdout)["before"])
    age = dt.timedelta(seconds=seconds)
    assert started - age <= before <= finished - age


@pytest.mark.parametrize(
    ("duration", "message"),
    [
        ("1m", "ambiguous duration '1m': write 1min for minutes, or days for months (30d)"),
        ("2M", "ambiguous duration '2M': write 2min for minutes, or days for months (30d)"),
        ("0d", "a duration must be more than zero: '0d'"),
        ("0.0h", "a duration must be more than zero: '0.0h'"),
        ("-1d", "a duration must be more than zero: '-1d'"),
        ("soon", "not a duration: 'soon' (use 30d, 12h, 90min, 45s or 2w)"),
        ("1y", "not a duration: '1y' (use 30d, 12h, 90min, 45s or 2w)"),
        ("30", "not a duration: '30' (use 30d, 12h, 90min, 45s or 2w)"),
        ("1e9w", "not a duration: '1e9w' (use 30d, 12h, 90min, 45s or 2w)"),
        ("99999999999w", "too long a duration: '99999999999w'"),
    ],
)
def test_purge_refuses_ambiguous_or_empty_durations(
    store: str, duration: str, message: str
) -> None:
    result = run("purge", "Invoice", f"--older-than={duration}", "--storage", store)
    assert result.returncode == 2
    assert result.stdout == ""
    assert last_line(result.stderr) == (
        f"python -m pydantic_toast purge: error: argument --older-than: {message}"
    )
    assert run("ls", "Invoice", "--json", "--storage", store).stdout.count('"id"') == 2


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["ls", "Invoice", "--limit", "-1"], "argument --limit: must be 0 or more, not -1"),
        (["ls", "Invoice", "--limit", "1.5"], "argument --limit: not a whole number: '1.5'"),
        (
            ["rekey", "app.models:User", "--batch-size", "0"],
            "argument --batch-size: must be 1 or more, not 0",
        ),
        (
            ["rekey", "app.models:User", "--batch-size", "-5"],
            "argument --batch-size: must be 1 or more, not -5",
        ),
        (
            ["rekey", "app.models:User", "--batch-size", "many"],
            "argument --batch-size: not a whole number: 'many'",
        ),
    ],
)
def test_numbers_out_of_range_are_usage_errors(arguments: list[str], message: str) -> None:
    result = run(*arguments, "--storage", URL)  # refused before connecting: nothing answers
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(f"usage: python -m pydantic_toast {arguments[0]} ")
    assert last_line(result.stderr) == f"python -m pydantic_toast {arguments[0]}: error: {message}"


def test_ls_says_on_stderr_when_it_stops_at_the_limit(store: str) -> None:
    cut = run("ls", "Invoice", "--limit", "1", "--storage", store)
    assert cut.returncode == 0, cut.stderr
    assert len(cut.stdout.splitlines()) == 2  # a header and one record
    assert cut.stderr == (
        "showing the newest 1 of 2 Invoice records; --limit N shows more, --limit 0 all\n"
    )
    for limit in ("2", "0"):  # every record shown: nothing to say
        whole = run("ls", "Invoice", "--limit", limit, "--storage", store)
        assert (whole.returncode, len(whole.stdout.splitlines()), whole.stderr) == (0, 3, "")
    as_json = run("ls", "Invoice", "--limit", "1", "--json", "--storage", store)
    assert as_json.returncode == 0, as_json.stderr
    assert as_json.stderr == ""
    assert [set(row) for row in json.loads(as_json.stdout)] == [{"id", "bytes", "updated_at"}]


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        ("ls", "--limit LIMIT at most this many (default 50; 0: all)"),
        ("rekey", "--batch-size BATCH_SIZE records per read and write (default 200)"),
        ("gc", "keep values written within this long (default 1d)"),
    ],
)
def test_help_shows_the_defaults(command: str, shown: str) -> None:
    result = run(command, "--help")
    assert result.returncode == 0, result.stderr
    assert shown in " ".join(result.stdout.split())  # however argparse wraps the lines


ID = "550e8400-e29b-41d4-a716-446655440000"
NAME_RULE = (
    "use letters, digits, '_', '.' and '-' (at most 200 characters, starting with a letter or '_')"
)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["rm", "Invoice", ID, "nope"], "not a UUID: 'nope'"),
        (["rm", "../x", ID], f"invalid class name '../x': {NAME_RULE}"),
        (["ls", "bad name"], f"invalid class name 'bad name': {NAME_RULE}"),
        (["purge", "a/b", "--older-than", "1d"], f"invalid class name 'a/b': {NAME_RULE}"),
        (["get", "Invoice", "nope"], "not a UUID: 'nope'"),
        (["get", "Invoice"], "give CLASS ID, or a reference as JSON"),
        (["get", "Invoice", ID, ID], "give CLASS ID, or a reference as JSON"),
        (["get", '{"class_name": "Invoice"}'], 'a reference is {"class_name": ..., "id": ...}'),
        (["get", '{"class_name": 5, "id": "x"}'], f"invalid class name 5: {NAME_RULE}"),
        (["get", '{"class_name": "Invoice", "id": 7}'], "not a UUID: '7'"),
        (
            ["rekey", "../models:User"],
            "cannot import '../models:User': give the module's absolute name, not '../models'",
        ),
        (
            ["rekey", "pydantic_toast:ExternalBaseModel.nope"],
            "cannot import 'pydantic_toast:ExternalBaseModel.nope': "
            "pydantic_toast:ExternalBaseModel has no attribute 'nope'",
        ),
        (
            ["rekey", "pydantic_toast:nope"],
            "cannot import 'pydantic_toast:nope': pydantic_toast has no attribute 'nope'",
        ),
        (
            ["rekey", f"redis://app:{SECRET}@cache.internal:6379/0"],
            "rekey takes the model as module:Class, not a storage URL: "
            "'redis://app:***@cache.internal:6379/0' (give the storage with --storage)",
        ),
    ],
)
@pytest.mark.parametrize("storage", ["file", "unreachable"])
def test_bad_arguments_are_refused_before_connecting(
    arguments: list[str], message: str, storage: str, tmp_path: Path
) -> None:
    directory = tmp_path / "records"
    url = f"file://{directory}" if storage == "file" else URL
    result = run(*arguments, "--storage", url)
    assert (result.returncode, result.stdout, result.stderr) == (1, "", f"error: {message}\n")
    assert not directory.exists()  # the file backend creates its directory when it connects
