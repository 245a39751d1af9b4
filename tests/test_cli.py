"""`python -m pydantic_toast`, run as a subprocess against every backend that outlives a
process (the real SQLite file, directory, PostgreSQL, Redis and S3), and against a spy backend
that shows what the CLI asks of a backend.

Run as ``python -m tests.test_cli ARGUMENTS``, this module is the CLI with ``spy://`` storage.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import closing
from pathlib import Path
from uuid import UUID, uuid4

import pytest

from pydantic_toast import ExternalBaseModel, ExternalConfigDict, register_backend
from pydantic_toast._cli import main
from pydantic_toast._content import content_id
from pydantic_toast._errors import StorageValidationError, mask_url
from pydantic_toast._registry import get_backend
from pydantic_toast.backends.base import Record, RecordInfo
from pydantic_toast.backends.memory import MemoryBackend

PERSISTENT = ["sqlite", "file", "postgresql", "redis", "s3"]
ROOT = Path(__file__).resolve().parent.parent


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
        (["gc", "--grace", "5m"], "ambiguous duration '5m'"),
        (["gc", "--roots-from"], "expected at least one argument"),
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


GOOD = [UUID(int=1), UUID(int=2)]  # the spy's Invoice records
BAD = UUID(int=3)  # an Invoice record that cannot be decoded
NOT_JSON = UUID(int=4)  # a Note record whose data is not JSON
CORRUPT = f"stored Invoice record {BAD} is corrupt: not a pydantic-toast envelope"
JANUARY = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)


class SpyBackend(MemoryBackend):
    """A memory backend that says on stderr how the CLI set it up before connecting, holding
    two Invoice records, a corrupt one (`BAD`) and a Note record that does not hold JSON."""

    async def connect(self) -> None:
        print(
            f"spy: create_missing={self.create_missing} read_only={self.read_only}", file=sys.stderr
        )
        await super().connect()
        for day, (id, data) in enumerate(zip(GOOD, [b'{"n":1}', b'{"n":22}'], strict=True)):
            when = JANUARY + dt.timedelta(days=day)
            await self.write_record(Record(id, "Invoice", data, 1, when, when))
        when = JANUARY + dt.timedelta(days=2)
        await self.write_record(Record(NOT_JSON, "Note", b"not json", 1, when, when))

    async def scan_records(
        self,
        class_name: str | None = None,
        *,
        on_corrupt: Callable[[StorageValidationError], None] | None = None,
    ) -> AsyncIterator[RecordInfo]:
        if class_name in (None, "Invoice"):  # the corrupt record comes first, the scan goes on
            if on_corrupt is None:
                raise StorageValidationError(CORRUPT)
            on_corrupt(StorageValidationError(CORRUPT))
        async for info in super().scan_records(class_name):
            yield info

    async def read_record(self, class_name: str, id: UUID) -> Record | None:
        if id == BAD:
            raise StorageValidationError(CORRUPT)
        return await super().read_record(class_name, id)


def spy_cli(*arguments: str) -> subprocess.CompletedProcess[str]:
    """The CLI on ``spy://`` storage, in a process of its own (see the end of this module)."""
    return subprocess.run(
        [sys.executable, "-m", "tests.test_cli", "--storage", "spy://store", *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


ID = "550e8400-e29b-41d4-a716-446655440000"


# Every command works on records that exist: none may create a table or a directory. Those
# that only read say so (SQLite then opens its file read-only).
READING = [
    ["ping"],
    ["stats"],
    ["ls", "Invoice"],
    ["get", "Invoice", ID],
    ["purge", "Invoice", "--older-than", "1d", "--dry-run"],
]
COMMANDS = [*READING, ["rm", "Invoice", ID], ["purge", "Invoice", "--older-than", "1d"]]


@pytest.mark.parametrize("arguments", COMMANDS)
def test_no_command_may_create_tables(arguments: list[str]) -> None:
    result = spy_cli(*arguments)
    read_only = arguments in READING
    assert result.stderr.splitlines()[0] == f"spy: create_missing=False read_only={read_only}"
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("arguments", COMMANDS)
async def test_commands_create_no_sqlite_table(
    sqlite_url: str, tmp_path: Path, arguments: list[str]
) -> None:
    await populate(sqlite_url)  # a real table, next to which a typo must not make another
    for url in (f"{sqlite_url}?table=nope_typo", f"sqlite:///{tmp_path}/missing.db"):
        result = cli(url, *arguments)
        assert result.returncode in (0, 1) and "Traceback" not in result.stderr
    with closing(sqlite3.connect(tmp_path / "models.db")) as connection, connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
    assert "nope_typo" not in tables
    assert not (tmp_path / "missing.db").exists()


@pytest.mark.parametrize("arguments", COMMANDS)
def test_commands_create_no_directory(tmp_path: Path, arguments: list[str]) -> None:
    result = cli(f"file://{tmp_path}/missing", *arguments)
    assert result.returncode in (0, 1) and "Traceback" not in result.stderr
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("arguments", COMMANDS)
def test_commands_create_no_postgresql_table(
    postgresql_url: str, namespace: str, arguments: list[str]
) -> None:
    import asyncpg

    result = cli(postgresql_url, *arguments)
    assert result.returncode in (0, 1) and "Traceback" not in result.stderr

    async def exists() -> bool:
        connection = await asyncpg.connect(postgresql_url.partition("?")[0])
        try:
            return await connection.fetchval("SELECT to_regclass($1)", namespace) is not None
        finally:
            await connection.close()

    assert not asyncio.run(exists())


def test_a_corrupt_record_is_reported_and_the_others_listed() -> None:
    listed = spy_cli("ls", "Invoice")
    assert (listed.returncode, listed.stdout, listed.stderr) == (
        1,
        "ID                                    BYTES  UPDATED_AT\n"
        f"{GOOD[1]}  8      2020-01-02T00:00:00+00:00\n"
        f"{GOOD[0]}  7      2020-01-01T00:00:00+00:00\n",
        f"spy: create_missing=False read_only=True\nwarning: {CORRUPT}\n",
    )
    stats = spy_cli("stats", "--json")
    assert (stats.returncode, stats.stderr) == (
        1,
        f"spy: create_missing=False read_only=True\nwarning: {CORRUPT}\n",
    )
    assert json.loads(stats.stdout) == [
        {"class_name": "Invoice", "records": 2, "bytes": 15, "newest": "2020-01-02T00:00:00+00:00"},
        {"class_name": "Note", "records": 1, "bytes": 8, "newest": "2020-01-03T00:00:00+00:00"},
    ]
    dry = spy_cli("purge", "Invoice", "--older-than", "1d", "--dry-run", "--json")
    assert (dry.returncode, dry.stderr) == (
        1,
        f"spy: create_missing=False read_only=True\nwarning: {CORRUPT}\n",
    )
    assert json.loads(dry.stdout)["would delete"] == 2
    clean = spy_cli("ls", "Note")  # no corrupt record among the Notes: status 0
    assert (clean.returncode, clean.stderr) == (0, "spy: create_missing=False read_only=True\n")


def test_getting_a_corrupt_record_is_an_error() -> None:
    corrupt = spy_cli("get", "Invoice", str(BAD))
    assert (corrupt.returncode, corrupt.stdout, corrupt.stderr) == (
        1,
        "",
        f"spy: create_missing=False read_only=True\nerror: {CORRUPT}\n",
    )
    not_json = spy_cli("get", "Note", str(NOT_JSON))
    assert (not_json.returncode, not_json.stdout, not_json.stderr) == (
        1,
        "",
        "spy: create_missing=False read_only=True\nerror: stored Note record "
        f"{NOT_JSON} does not hold JSON: Expecting value: line 1 column 1 (char 0)\n",
    )
    good = spy_cli("get", "Invoice", str(GOOD[1]))
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["data"] == {"n": 22}


def corrupt_a_record(kind: str, url: str, namespace: str, tmp_path: Path) -> UUID:
    """Store an Invoice record that cannot be decoded, with the backend's own driver."""
    id = uuid4()
    if kind == "redis":
        import redis

        client = redis.Redis.from_url(url.partition("?")[0])
        try:
            client.set(f"{namespace}:Invoice:{id}", b"\x00garbage")
        finally:
            client.close()
    elif kind == "file":
        (tmp_path / "records" / "Invoice" / f"{id}.json").write_bytes(b"\x00garbage")
    else:
        now = dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")
        with closing(sqlite3.connect(tmp_path / "models.db")) as connection, connection:
            connection.execute(
                "INSERT INTO external_models VALUES (?, 'Invoice', '{}', 'x', ?, ?)",
                (str(id), now, now),
            )
    return id


@pytest.mark.parametrize("kind", ["redis", "file", "sqlite"])
async def test_a_corrupt_stored_record_is_reported_and_the_others_listed(
    request: pytest.FixtureRequest, kind: str, namespace: str, tmp_path: Path
) -> None:
    url: str = request.getfixturevalue(f"{kind}_url")
    invoices, _ = await populate(url)
    bad = corrupt_a_record(kind, url, namespace, tmp_path)

    def warned(result: subprocess.CompletedProcess[str]) -> bool:
        warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
        return len(warnings) == 1 and str(bad) in warnings[0] and "Traceback" not in result.stderr

    listed = cli(url, "--json", "ls", "Invoice")
    assert listed.returncode == 1 and warned(listed)
    assert {row["id"] for row in json.loads(listed.stdout)} == {r["id"] for r in invoices}
    stats = cli(url, "--json", "stats")
    assert stats.returncode == 1 and warned(stats)
    assert {row["class_name"]: row["records"] for row in json.loads(stats.stdout)} == {
        "Invoice": 5,
        "Receipt": 2,
    }
    dry = cli(url, "--json", "purge", "Invoice", "--older-than", "30d", "--dry-run")
    assert dry.returncode == 1 and warned(dry)
    assert json.loads(dry.stdout)["would delete"] == 2


@pytest.mark.parametrize(
    "kind",
    ["redis", "file", "sqlite"],
)
async def test_getting_a_corrupt_stored_record_is_an_error(
    request: pytest.FixtureRequest, kind: str, namespace: str, tmp_path: Path
) -> None:
    url: str = request.getfixturevalue(f"{kind}_url")
    await populate(url)
    bad = corrupt_a_record(kind, url, namespace, tmp_path)
    result = cli(url, "get", "Invoice", str(bad))
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.startswith("error: ") and str(bad) in result.stderr
    assert "Traceback" not in result.stderr


if __name__ == "__main__":
    register_backend("spy", SpyBackend)
    sys.exit(main())


# --- gc ---------------------------------------------------------------------------------


async def populate_content(url: str, *, roots: str | None = None) -> dict[str, list[str]]:
    """Old content-addressed lines, one order (in ``roots``, or here) referencing two."""
    backend = await get_backend(url)
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
    ids = []
    for n in range(4):
        data = json.dumps({"sku": f"SKU-{n}"}).encode()
        id = content_id("Line", data)
        await backend.write_record(Record(id, "Line", data, 1, old, old))
        ids.append(str(id))
    order = json.dumps({"lines": [{"class_name": "Line", "id": id} for id in ids[:2]]})
    holder = backend if roots is None else await get_backend(roots)
    await holder.write_record(Record(uuid4(), "Order", order.encode(), 1, old, old))
    return {"kept": ids[:2], "swept": ids[2:]}


async def test_gc_against_a_real_store(url: str) -> None:
    lines = await populate_content(url)
    backend = await get_backend(url)
    expected = {
        "storage": mask_url(url),
        "scanned": 5,
        "roots_scanned": 0,
        "roots": 1,
        "recent": 0,
        "reachable": 2,
        "deleted": 2,
        "refreshed": 0,
        "corrupt": 0,
    }

    dry = cli(url, "gc", "--dry-run", "--json")  # --json after the command
    assert dry.returncode == 0 and dry.stderr == "", dry.stderr  # no progress off a terminal
    report = json.loads(dry.stdout)
    assert report.pop("dry_run") is True and report.pop("cutoff")
    assert report == expected
    assert len([info async for info in backend.scan_records("Line")]) == 4

    people = cli(url, "gc", "--grace", "2d", "--dry-run")
    assert people.returncode == 0, people.stderr
    assert people.stdout.splitlines() == [
        f"scanned 5 records in {mask_url(url)}",
        "kept 1 not content-addressed, 0 written within 2d, 2 referenced",
        "would delete 2 content-addressed records that nothing references",
    ]

    kept = cli(url, "--json", "gc", "--grace", "4d")  # everything is newer than that
    assert json.loads(kept.stdout)["recent"] == 4 and json.loads(kept.stdout)["deleted"] == 0

    zero = cli(url, "--json", "gc", "--grace", "0s", "--dry-run")  # as the API allows
    assert zero.returncode == 0, zero.stderr
    assert json.loads(zero.stdout)["recent"] == 0

    done = cli(url, "gc")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == (
        "deleted 2 content-addressed records that nothing references"
    )
    left = {str(info.id) async for info in backend.scan_records("Line")}
    assert left == set(lines["kept"])


async def test_gc_takes_roots_from_other_storages(sqlite_url: str, file_url: str) -> None:
    lines = await populate_content(file_url, roots=sqlite_url)
    other = f"{sqlite_url[:-3]}-other.db"  # a second store of roots: --roots-from repeats
    backend = await get_backend(other)
    order = json.dumps({"line": {"class_name": "Line", "id": lines["swept"][0]}}).encode()
    now = dt.datetime.now(dt.UTC)
    await backend.write_record(Record(uuid4(), "Order", order, 1, now, now))
    missing = cli(file_url, "gc", "--roots-from", f"{sqlite_url[:-3]}-missing.db")
    assert missing.returncode == 1
    assert "-missing.db could not connect" in missing.stderr  # read only: never created
    assert not Path(f"{sqlite_url[:-3]}-missing.db".removeprefix("sqlite:///")).exists()

    result = cli(file_url, "--json", "gc", "--roots-from", sqlite_url, "--roots-from", other)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["scanned"], report["roots_scanned"], report["deleted"]) == (4, 2, 1)
    backend = await get_backend(file_url)
    left = {str(info.id) async for info in backend.scan_records("Line")}
    assert left == {*lines["kept"], lines["swept"][0]}


def test_gc_reports_corrupt_records_and_fails(tmp_path: Path) -> None:
    database = tmp_path / "gc.db"
    url = f"sqlite:///{database}"
    with closing(sqlite3.connect(database)) as connection, connection:
        connection.execute(
            "CREATE TABLE external_models (id TEXT PRIMARY KEY, class_name TEXT NOT NULL,"
            " data TEXT NOT NULL, schema_version INTEGER NOT NULL, created_at TEXT NOT NULL,"
            " updated_at TEXT NOT NULL)"
        )
        connection.execute(
            "INSERT INTO external_models VALUES (?, 'Line', '{}', 1, 'x', 'not a time')",
            [str(content_id("Line", b"{}"))],
        )
    result = cli(url, "gc", "--json")
    assert result.returncode == 1
    assert (
        "is corrupt: updated_at is not a timestamp" in result.stderr or "corrupt" in result.stderr
    )
    assert json.loads(result.stdout)["corrupt"] == 1


async def test_a_reader_that_leaves_early_gets_no_traceback(sqlite_url: str) -> None:
    await populate(sqlite_url)
    command = [sys.executable, "-m", "pydantic_toast", "--storage", sqlite_url, "ls", "Invoice"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # as `| head -0` does: nobody reads what the tool prints
    stderr = process.stderr.read().decode()
    process.stderr.close()
    assert process.wait(timeout=60) == 1
    assert stderr == ""
