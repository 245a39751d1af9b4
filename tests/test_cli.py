"""`python -m pydantic_toast`, run as a subprocess against every backend that outlives a
process (the real SQLite file, directory, PostgreSQL, Redis and S3)."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from uuid import UUID, uuid4

import pytest

from pydantic_toast import ExternalBaseModel, ExternalConfigDict
from pydantic_toast.backends.base import Record
from pydantic_toast.registry import get_backend

PERSISTENT = ["sqlite", "file", "postgresql", "redis", "s3"]


@pytest.fixture(params=PERSISTENT)
def url(request: pytest.FixtureRequest) -> str:
    value: str = request.getfixturevalue(f"{request.param}_url")
    return value


def cli(url: str, *arguments: str, use_env: bool = False) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if use_env:
        env["PYDANTIC_TOAST_STORAGE"] = url
        command = [sys.executable, "-m", "pydantic_toast", *arguments]
    else:
        command = [sys.executable, "-m", "pydantic_toast", "--storage", url, *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)


async def populate(url: str) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    class Invoice(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=url)
        number: int
        note: str

    class Receipt(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=url)
        total: float

    invoices = await Invoice.save_external_many([Invoice(number=i, note="n" * i) for i in range(5)])
    receipts = await Receipt.save_external_many([Receipt(total=1.5), Receipt(total=2.5)])
    backend = await get_backend(url)
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=45)
    for reference in invoices[:2]:  # make two invoices look old
        record = await backend.read_record("Invoice", UUID(reference["id"]))
        assert record is not None
        await backend.delete_records("Invoice", [record.id])
        await backend.write_record(Record(record.id, "Invoice", record.data, 1, old, old))
    return invoices, receipts


async def test_cli_against_a_real_store(url: str) -> None:
    invoices, receipts = await populate(url)

    ping = cli(url, "--json", "ping")
    assert ping.returncode == 0, ping.stderr
    assert json.loads(ping.stdout)["ok"] is True

    stats = json.loads(cli(url, "--json", "stats").stdout)
    by_class = {row["class_name"]: row for row in stats}
    assert by_class["Invoice"]["records"] == 5
    assert by_class["Receipt"]["records"] == 2
    expected_bytes = sum(len(f'{{"number":{i},"note":"{"n" * i}"}}') for i in range(5))
    if url.startswith("postgresql"):  # JSONB keeps its own rendering, with spaces
        assert by_class["Invoice"]["bytes"] >= expected_bytes
    else:
        assert by_class["Invoice"]["bytes"] == expected_bytes
    table = cli(url, "stats", use_env=True)
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split() == ["CLASS_NAME", "RECORDS", "BYTES", "NEWEST"]

    listed = json.loads(cli(url, "--json", "ls", "Invoice").stdout)
    assert {row["id"] for row in listed} == {r["id"] for r in invoices}
    updated = [row["updated_at"] for row in listed]
    assert updated == sorted(updated, reverse=True)  # newest first
    assert {row["id"] for row in listed[-2:]} == {r["id"] for r in invoices[:2]}  # the old ones
    assert len(json.loads(cli(url, "--json", "ls", "Invoice", "--limit", "2").stdout)) == 2

    got = cli(url, "get", "Invoice", invoices[3]["id"])
    assert got.returncode == 0, got.stderr
    record = json.loads(got.stdout)
    assert record["data"] == {"number": 3, "note": "nnn"}
    assert record["class_name"] == "Invoice" and record["schema_version"] == 1
    by_reference = json.loads(cli(url, "get", json.dumps(receipts[0])).stdout)
    assert by_reference["data"] == {"total": 1.5}
    missing = cli(url, "get", "Invoice", str(uuid4()))
    assert missing.returncode == 1 and "no Invoice record" in missing.stderr

    dry = cli(url, "--json", "purge", "Invoice", "--older-than", "30d", "--dry-run")
    assert json.loads(dry.stdout)["would delete"] == 2
    assert len(json.loads(cli(url, "--json", "ls", "Invoice").stdout)) == 5
    purged = cli(url, "purge", "Invoice", "--older-than", "30d")
    assert purged.returncode == 0, purged.stderr
    assert purged.stdout.startswith("deleted 2 Invoice records not updated since")
    assert len(json.loads(cli(url, "--json", "ls", "Invoice").stdout)) == 3

    removed = json.loads(
        cli(url, "--json", "rm", "Receipt", receipts[0]["id"], receipts[1]["id"]).stdout
    )
    assert removed == {"requested": 2, "deleted": 2}
    again = cli(url, "rm", "Receipt", receipts[0]["id"])
    assert again.returncode == 1 and "deleted 0 of 1" in again.stdout


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["get", "Invoice", "../../etc/passwd"], "not a UUID"),
        (["get", "../x", str(uuid4())], "invalid class name"),
        (["get", '{"class_name": "a", "id": "b", "x": 1}'], "a reference is"),
        (["ls", "bad name"], "invalid class name"),
        (["purge", "Invoice", "--older-than", "soon"], "not a duration"),
    ],
)
def test_cli_rejects_bad_input(sqlite_url: str, arguments: list[str], message: str) -> None:
    result = cli(sqlite_url, *arguments)
    assert result.returncode in (1, 2)
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_masks_passwords_and_reports_unreachable_storage() -> None:
    result = cli("postgresql://admin:Sup3rS3cretPW@127.0.0.1:9/db?timeout=2", "ping")
    assert result.returncode == 1
    assert "Sup3rS3cretPW" not in result.stdout + result.stderr
    assert "admin:***@127.0.0.1" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_needs_a_storage() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYDANTIC_TOAST_STORAGE"}
    result = subprocess.run(
        [sys.executable, "-m", "pydantic_toast", "stats"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 2
    assert "give --storage URL" in result.stderr
