"""PostgreSQL-specific behaviour, against the real server: the stored table as plain SQL sees
it, one statement per batch, concurrent table creation, URL options, and errors.

The shared behaviour (round trips, re-save, not-found, ...) is in test_contract.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import gc
import json
import socket
import subprocess
import sys
import textwrap
import time
import traceback
from collections.abc import AsyncIterator
from typing import Any
from uuid import UUID, uuid4

import asyncpg  # type: ignore[import-untyped]
import pytest

from pydantic_toast import (
    ExternalBaseModel,
    ExternalConfigDict,
    RecordNotFoundError,
    StorageConnectionError,
    StorageOperationError,
    StorageValidationError,
)
from pydantic_toast.backends.base import Record, RecordInfo
from pydantic_toast.backends.postgresql import PostgreSQLBackend

PASSWORD = "s3cretPW"


@pytest.fixture
async def sql(postgres_server: str) -> AsyncIterator[Any]:
    """A plain asyncpg connection, to see the table as any other SQL client would."""
    connection = await asyncpg.connect(postgres_server)
    yield connection
    await connection.close()


@pytest.fixture
async def backend(postgresql_url: str) -> AsyncIterator[PostgreSQLBackend]:
    """A connected backend on this test's table, with a single pooled connection."""
    backend = PostgreSQLBackend(postgresql_url, min_size=1, max_size=1)
    await backend.connect()
    yield backend
    await backend.disconnect()


def define_user(storage: str, schema_version: int = 1) -> Any:
    """A model class on ``storage`` (typed Any: its fields are unknown to a type checker)."""

    class User(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=storage, schema_version=schema_version)
        name: str
        email: str
        age: int = 0

    return User


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def record(class_name: str = "Batch", n: int = 0) -> Record:
    now = dt.datetime.now(dt.UTC)
    return Record(uuid4(), class_name, b'{"n":%d}' % n, 1, now, now)


# --- The table as SQL sees it -------------------------------------------------------------


async def test_table_has_the_designed_columns_key_and_index(
    backend: PostgreSQLBackend, sql: Any, namespace: str
) -> None:
    columns = await sql.fetch(
        "SELECT column_name, data_type, is_nullable FROM information_schema.columns"
        " WHERE table_name = $1 ORDER BY ordinal_position",
        namespace,
    )
    assert [tuple(column) for column in columns] == [
        ("id", "uuid", "NO"),
        ("class_name", "text", "NO"),
        ("data", "jsonb", "NO"),
        ("schema_version", "integer", "NO"),
        ("created_at", "timestamp with time zone", "NO"),
        ("updated_at", "timestamp with time zone", "NO"),
    ]
    indexes = {
        row["indexname"]: row["indexdef"]
        for row in await sql.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = $1", namespace
        )
    }
    assert indexes[f"{namespace}_pkey"].endswith("USING btree (id)")
    assert indexes[f"{namespace}_class_updated"].endswith("USING btree (class_name, updated_at)")
    primary = await sql.fetchval(
        "SELECT constraint_type FROM information_schema.table_constraints"
        " WHERE table_name = $1 AND constraint_name = $2",
        namespace,
        f"{namespace}_pkey",
    )
    assert primary == "PRIMARY KEY"


async def test_connect_is_idempotent_on_an_existing_table(
    backend: PostgreSQLBackend, postgresql_url: str
) -> None:
    await backend.write_record(saved := record())
    again = PostgreSQLBackend(postgresql_url)
    await again.connect()
    await again.connect()  # a second call on a connected backend does nothing
    try:
        assert (await again.read_record("Batch", saved.id)) is not None
    finally:
        await again.disconnect()
        await again.disconnect()


async def test_saved_fields_are_queryable_as_jsonb(
    postgresql_url: str, sql: Any, namespace: str
) -> None:
    User = define_user(postgresql_url)
    reference = await User(name="Ada", email="ada@example.com", age=36).save_external()
    await User(name="Bob", email="bob@example.com").save_external()

    row = await sql.fetchrow(
        f"SELECT data->>'name' AS name, (data->>'age')::int AS age, class_name"
        f' FROM "{namespace}" WHERE id = $1',
        UUID(reference["id"]),
    )
    assert dict(row) == {"name": "Ada", "age": 36, "class_name": "User"}
    found = await sql.fetchval(
        f"SELECT id FROM \"{namespace}\" WHERE data->>'email' = $1", "ada@example.com"
    )
    assert str(found) == reference["id"]
    assert await sql.fetchval(f'SELECT jsonb_typeof(data) FROM "{namespace}" LIMIT 1') == "object"


async def test_upsert_keeps_created_at_and_moves_updated_at(
    postgresql_url: str, sql: Any, namespace: str
) -> None:
    User = define_user(postgresql_url)
    user = User(name="Ada", email="ada@example.com")
    reference = await user.save_external()
    select = f"SELECT created_at, updated_at, data->>'name' FROM \"{namespace}\" WHERE id = $1"
    first = await sql.fetchrow(select, UUID(reference["id"]))
    assert first["created_at"] == first["updated_at"]
    await asyncio.sleep(0.002)

    user.name = "Augusta"
    assert await user.save_external() == reference
    second = await sql.fetchrow(select, UUID(reference["id"]))
    assert second["created_at"] == first["created_at"]
    assert second["updated_at"] > first["updated_at"]
    assert second[2] == "Augusta"
    assert await sql.fetchval(f'SELECT count(*) FROM "{namespace}"') == 1


async def test_upsert_keeps_the_stored_created_at_whatever_the_record_says(
    backend: PostgreSQLBackend, sql: Any, namespace: str
) -> None:
    original = record()
    await backend.write_record(original)
    later = original.created_at + dt.timedelta(hours=1)
    await backend.write_record(Record(original.id, "Batch", b'{"n":2}', 2, later, later))
    row = await sql.fetchrow(
        f'SELECT created_at, updated_at, schema_version FROM "{namespace}" WHERE id = $1',
        original.id,
    )
    assert tuple(row) == (original.created_at, later, 2)


async def test_schema_version_column(postgresql_url: str, sql: Any, namespace: str) -> None:
    User = define_user(postgresql_url, schema_version=7)
    reference = await User(name="Ada", email="a@b.c").save_external()
    version = await sql.fetchval(
        f'SELECT schema_version FROM "{namespace}" WHERE id = $1', UUID(reference["id"])
    )
    assert version == 7
    loaded = await User.load_external(reference)
    assert loaded.external_metadata is not None
    assert loaded.external_metadata.schema_version == 7


# --- Batches --------------------------------------------------------------------------------


async def test_batches_of_1000_are_one_statement_each(
    backend: PostgreSQLBackend, sql: Any, namespace: str
) -> None:
    # The backend's pool has one connection; a query logger on it (asyncpg's own hook, kept
    # across releases) sees every statement the backend sends.
    # A connection's first use of a statement also prepares it, and asyncpg introspects the
    # array types once per connection: warm up with a small batch first.
    warm = [record("Warm"), record("Warm")]
    await backend.write_records(warm)
    await backend.read_records("Warm", [r.id for r in warm])
    await backend.delete_records("Warm", [r.id for r in warm])
    statements: list[str] = []
    async with backend._pool.acquire() as connection:
        connection.add_query_logger(lambda query: statements.append(query.query))

    records = [record(n=i) for i in range(1000)]
    await backend.write_records(records)
    await asyncio.sleep(0)  # the logger is called soon after each statement
    assert len(statements) == 1
    assert statements[0].startswith(f'INSERT INTO "{namespace}"')
    # The server agrees: one transaction wrote every row (1,000 statements would give 1,000).
    assert await sql.fetchval(f'SELECT count(DISTINCT xmin::text) FROM "{namespace}"') == 1
    assert await sql.fetchval(f'SELECT count(*) FROM "{namespace}"') == 1000

    statements.clear()
    ids = [r.id for r in reversed(records)]
    found = await backend.read_records("Batch", ids)
    await asyncio.sleep(0)
    assert len(statements) == 1
    assert [r.id if r else None for r in found] == ids
    assert [r.data if r else None for r in found] == [b'{"n": %d}' % i for i in range(999, -1, -1)]

    statements.clear()
    assert await backend.delete_records("Batch", ids[:500]) == 500
    await asyncio.sleep(0)
    assert len(statements) == 1
    assert await sql.fetchval(f'SELECT count(*) FROM "{namespace}"') == 500


async def test_batch_with_duplicate_ids_keeps_the_last(
    backend: PostgreSQLBackend, sql: Any, namespace: str
) -> None:
    first, other = record(n=1), record(n=2)
    last = Record(first.id, "Batch", b'{"n":3}', 1, first.created_at, first.updated_at)
    await backend.write_records([first, other, last])
    found = await backend.read_records("Batch", [first.id, other.id, first.id, uuid4()])
    assert [r.data if r else None for r in found] == [b'{"n": 3}', b'{"n": 2}', b'{"n": 3}', None]
    assert await sql.fetchval(f'SELECT count(*) FROM "{namespace}"') == 2


async def test_batch_upsert_keeps_created_at(
    backend: PostgreSQLBackend, sql: Any, namespace: str
) -> None:
    records = [record(n=i) for i in range(10)]
    await backend.write_records(records)
    later = records[0].created_at + dt.timedelta(minutes=5)
    await backend.write_records(
        [Record(r.id, r.class_name, b'{"n":0}', 2, later, later) for r in records]
    )
    rows = await sql.fetch(
        f'SELECT created_at, updated_at, schema_version, data FROM "{namespace}"'
    )
    assert sorted(tuple(row) for row in rows) == [
        (r.created_at, later, 2, '{"n": 0}') for r in records
    ]


async def test_empty_and_single_batches(backend: PostgreSQLBackend) -> None:
    assert await backend.read_records("Batch", []) == []
    await backend.write_records([])
    assert await backend.delete_records("Batch", []) == 0
    one = record()
    await backend.write_records([one])
    [found] = await backend.read_records("Batch", [one.id])
    assert found is not None and found.data == b'{"n": 0}'


async def test_delete_is_scoped_to_the_class(backend: PostgreSQLBackend) -> None:
    mine, theirs = record("Mine"), record("Theirs")
    await backend.write_records([mine, theirs])
    assert await backend.delete_records("Mine", [mine.id, theirs.id, uuid4()]) == 1
    assert await backend.read_record("Mine", mine.id) is None
    assert await backend.read_record("Theirs", theirs.id) is not None
    assert await backend.delete(theirs.id, "Theirs") is True
    assert await backend.delete(theirs.id, "Theirs") is False


# --- Table creation -------------------------------------------------------------------------


async def test_concurrent_table_creation_in_one_process(
    postgresql_url: str, sql: Any, namespace: str
) -> None:
    assert await sql.fetchval("SELECT to_regclass($1)", f'"{namespace}"') is None
    backends = [PostgreSQLBackend(postgresql_url, min_size=1, max_size=1) for _ in range(8)]
    records = [record(n=i) for i in range(len(backends))]
    try:
        await asyncio.gather(*(b.connect() for b in backends))
        # All eight made (or found) one table with its index, and they share it.
        indexes = await sql.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = $1", namespace
        )
        assert {row["indexname"]: row["indexdef"].split(" USING ")[1] for row in indexes} == {
            f"{namespace}_pkey": "btree (id)",
            f"{namespace}_class_updated": "btree (class_name, updated_at)",
        }
        await asyncio.gather(*(b.write_record(r) for r, b in zip(records, backends, strict=True)))
        ids = [r.id for r in records]
        for b in backends:
            found = await b.read_records("Batch", ids)
            assert [json.loads(f.data) if f else None for f in found] == [
                {"n": i} for i in range(len(records))
            ]
    finally:
        await asyncio.gather(*(b.disconnect() for b in backends))
    rows = await sql.fetch(f'SELECT id, data FROM "{namespace}"')
    assert {row["id"]: json.loads(row["data"]) for row in rows} == {
        r.id: {"n": i} for i, r in enumerate(records)
    }


def test_concurrent_table_creation_across_processes(postgresql_url: str) -> None:
    # Each process waits for the same instant, then connects (which creates the table).
    script = textwrap.dedent(
        """
        import asyncio, sys, time
        from pydantic_toast.backends.postgresql import PostgreSQLBackend

        async def main():
            time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
            backend = PostgreSQLBackend(sys.argv[1], min_size=1, max_size=1)
            await backend.connect()
            await backend.disconnect()

        asyncio.run(main())
        """
    )
    start = str(time.time() + 1.5)
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script, postgresql_url, start], stderr=subprocess.PIPE
        )
        for _ in range(6)
    ]
    errors = [process.communicate(timeout=60)[1].decode() for process in processes]
    assert [process.returncode for process in processes] == [0] * 6, errors


# --- Options ---------------------------------------------------------------------------------


async def test_table_option_by_keyword_and_by_url(
    postgres_server: str, postgresql_url: str, namespace: str, sql: Any
) -> None:
    assert PostgreSQLBackend(postgresql_url).table == namespace
    assert PostgreSQLBackend(postgres_server).table == "external_models"
    by_keyword = PostgreSQLBackend(postgres_server, table=namespace, max_size=1)
    assert PostgreSQLBackend(f"{postgres_server}?table=other", table=namespace).table == namespace
    with pytest.raises(StorageValidationError, match="option 'table' is given twice in the URL"):
        PostgreSQLBackend(f"{postgres_server}?table=other&table={namespace}")
    await by_keyword.connect()
    try:
        await by_keyword.write_record(saved := record())
    finally:
        await by_keyword.disconnect()
    assert await sql.fetchval(f'SELECT count(*) FROM "{namespace}" WHERE id = $1', saved.id) == 1


@pytest.mark.parametrize(
    "table", ["x; DROP TABLE y", "x%3B%20DROP%20TABLE%20y", "1abc", "a" * 64, "a-b", 'a"b', ""]
)
def test_invalid_table_name_fails_at_class_definition(postgres_server: str, table: str) -> None:
    with pytest.raises(StorageValidationError, match=r"Bad.*option table must be a table name"):

        class Bad(ExternalBaseModel):
            model_config = ExternalConfigDict(storage=f"{postgres_server}?table={table}")
            value: int


def test_invalid_table_name_by_keyword() -> None:
    with pytest.raises(StorageValidationError, match="option table must be a table name"):
        PostgreSQLBackend("postgresql://localhost/db", table="x; DROP TABLE y")


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("min_size=-1", "min_size must be an integer >= 0"),
        ("max_size=0", "max_size must be an integer >= 1"),
        ("max_size=many", "max_size must be an integer"),
        ("min_size=5&max_size=2", "min_size .5. must not exceed max_size .2."),
        ("timeout=0", "timeout must be a positive number of seconds"),
        ("timeout=abc", "timeout must be"),
        ("command_timeout=nan", "command_timeout must be"),
    ],
)
def test_invalid_options_fail_at_class_definition(query: str, message: str) -> None:
    with pytest.raises(StorageValidationError, match=message):

        class Bad(ExternalBaseModel):
            model_config = ExternalConfigDict(storage=f"postgresql://h:1/db?{query}")
            value: int


def test_invalid_port_fails_at_class_definition() -> None:
    with pytest.raises(StorageValidationError, match="Bad"):

        class Bad(ExternalBaseModel):
            model_config = ExternalConfigDict(storage="postgresql://h:port/db")
            value: int


def test_library_options_are_stripped_before_asyncpg() -> None:
    backend = PostgreSQLBackend(
        "postgres://user:pa%40ss@db.example:6543/app?table=models&sslmode=require"
        "&min_size=2&max_size=3&timeout=4.5&command_timeout=6&application_name=svc"
    )
    assert (
        backend._dsn == "postgres://user@db.example:6543/app?sslmode=require&application_name=svc"
    )
    assert backend._password == "pa@ss"  # handed to asyncpg as an argument, never in the DSN
    assert (backend.table, backend.min_size, backend.max_size) == ("models", 2, 3)
    assert (backend.timeout, backend.command_timeout) == (4.5, 6.0)
    assert "pa@ss" not in repr(backend) and "pa%40ss" not in repr(backend)
    defaults = PostgreSQLBackend("postgresql:///app")
    assert defaults._dsn == "postgresql:///app"
    assert (defaults.table, defaults.min_size, defaults.max_size) == ("external_models", 1, 10)
    assert (defaults.timeout, defaults.command_timeout) == (10.0, 30.0)


async def test_connects_with_every_option_in_the_url(postgresql_url: str, namespace: str) -> None:
    # asyncpg would send an unknown query parameter to the server as a setting, and the server
    # would refuse `table`: connecting proves ours were removed and the others were kept.
    url = (
        postgresql_url.replace("postgresql://", "postgres://")
        + "&min_size=1&max_size=2&timeout=5&command_timeout=5"
        + "&sslmode=disable&application_name=toast_options_test"
    )
    backend = PostgreSQLBackend(url)
    await backend.connect()
    try:
        assert backend.table == namespace
        name = await backend._pool.fetchval("SELECT current_setting('application_name')")
        assert name == "toast_options_test"
    finally:
        await backend.disconnect()


# --- Errors ----------------------------------------------------------------------------------


def assert_password_hidden(exc: BaseException) -> None:
    for shown in (str(exc), repr(exc), "".join(traceback.format_exception(exc))):
        assert PASSWORD not in shown


async def test_refused_connection_is_a_quick_connection_error(namespace: str) -> None:
    port = closed_port()
    User = define_user(f"postgresql://user:{PASSWORD}@127.0.0.1:{port}/db?table={namespace}")
    started = time.monotonic()
    with pytest.raises(StorageConnectionError) as caught:
        await User(name="Ada", email="a@b.c").save_external()
    assert time.monotonic() - started < 5
    exc = caught.value
    assert f"127.0.0.1:{port}" in str(exc)
    assert exc.url == f"postgresql://user:***@127.0.0.1:{port}/db?table={namespace}"
    assert exc.__cause__ is not None
    assert_password_hidden(exc)


async def test_connect_timeout_is_bounded() -> None:
    # A server that accepts TCP connections and never answers.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        backend = PostgreSQLBackend(f"postgresql://user:{PASSWORD}@127.0.0.1:{port}/db?timeout=0.5")
        started = time.monotonic()
        with pytest.raises(StorageConnectionError) as caught:
            await backend.open()
        assert time.monotonic() - started < 3
    assert isinstance(caught.value.__cause__, TimeoutError)
    assert f"127.0.0.1:{port}" in str(caught.value)
    assert_password_hidden(caught.value)


@pytest.mark.parametrize(
    "target",
    [
        # The local server trusts every login, so an unknown role stands in for a bad password.
        f"no_such_role_toast:{PASSWORD}@127.0.0.1:5432/postgres",
        f"postgres:{PASSWORD}@127.0.0.1:5432/no_such_database_toast",
    ],
)
async def test_rejected_login_is_a_permanent_error(postgres_server: str, target: str) -> None:
    # A refused login or a missing database does not go away by retrying: raised at once.
    backend = PostgreSQLBackend(f"postgresql://{target}")
    with pytest.raises(StorageOperationError) as caught:
        await backend.open()
    assert isinstance(caught.value.__cause__, asyncpg.PostgresError)
    assert "127.0.0.1:5432" in str(caught.value)
    assert "does not exist" in str(caught.value)
    assert_password_hidden(caught.value)


async def test_stored_data_that_does_not_validate_names_class_and_id(
    postgresql_url: str, sql: Any, namespace: str
) -> None:
    User = define_user(postgresql_url)
    reference = await User(name="Ada", email="a@b.c").save_external()
    await sql.execute(f'UPDATE "{namespace}" SET data = \'{{"x": 1}}\'')
    with pytest.raises(StorageValidationError) as caught:
        await User.load_external(reference)
    assert f"stored User record {reference['id']} no longer validates" in str(caught.value)


async def test_row_of_another_class_is_not_found(
    postgresql_url: str, sql: Any, namespace: str
) -> None:
    User = define_user(postgresql_url)
    reference = await User(name="Ada", email="a@b.c").save_external()
    await sql.execute(f"UPDATE \"{namespace}\" SET class_name = 'Admin'")
    # Indistinguishable from an unknown id: the message names neither the other class...
    with pytest.raises(RecordNotFoundError, match=f"^no User record with id {reference['id']}"):
        await User.load_external(reference)
    # ...and nothing of another class can be deleted through this class.
    assert await User.delete_external(reference) is False
    assert await sql.fetchval(f'SELECT count(*) FROM "{namespace}"') == 1


async def test_data_jsonb_cannot_hold_is_a_validation_error(postgresql_url: str) -> None:
    User = define_user(postgresql_url)
    user = User(name="nul \x00 byte", email="a@b.c")
    with pytest.raises(
        StorageValidationError, match=r"PostgreSQL at .* could not save User record"
    ) as caught:
        await user.save_external()
    assert isinstance(caught.value.__cause__, asyncpg.DataError)


async def test_a_batch_of_several_statements_with_a_refused_record_writes_none(
    postgresql_url: str, sql: Any, namespace: str
) -> None:
    backend = PostgreSQLBackend(postgresql_url)
    backend.capabilities = dataclasses.replace(backend.capabilities, batch_size=3)
    await backend.connect()
    try:
        records = [record(n=n) for n in range(7)]
        bad = records[5]
        bad.data = b'{"name":"nul \\u0000 byte"}'
        records[2].data = b'{"name":"a backslash and u0000: \\\\u0000"}'  # no NUL: stored
        with pytest.raises(StorageValidationError) as caught:
            await backend.write_records(records)
        assert str(caught.value) == (
            f"{backend.where} cannot store Batch record {bad.id}: JSONB cannot hold the "
            "character U+0000 (a NUL in a string); no record of the batch of 7 was written"
        )
        assert await sql.fetchval(f'SELECT count(*) FROM "{namespace}"') == 0
        del records[5]
        await backend.write_records(records)
        assert await sql.fetchval(f'SELECT count(*) FROM "{namespace}"') == 6
    finally:
        await backend.disconnect()


async def test_operations_need_a_connected_backend(postgresql_url: str) -> None:
    backend = PostgreSQLBackend(postgresql_url)
    with pytest.raises(StorageOperationError, match="not connected"):
        await backend.read_record("Batch", uuid4())
    await backend.connect()
    await backend.disconnect()
    with pytest.raises(StorageOperationError, match="not connected"):
        await backend.write_record(record())


async def test_a_dropped_connection_is_a_connection_error_then_recovers(
    backend: PostgreSQLBackend, sql: Any
) -> None:
    saved = record()
    await backend.write_record(saved)
    pid = await backend._pool.fetchval("SELECT pg_backend_pid()")
    assert await sql.fetchval("SELECT pg_terminate_backend($1)", pid)
    # The pool may notice the closed connection before the next call (and reconnect) or
    # during it (a connection error); either way the backend recovers.
    outcomes: list[Record | StorageConnectionError | None] = []
    for _ in range(3):
        try:
            outcomes.append(await backend.read_record("Batch", saved.id))
        except StorageConnectionError as exc:
            outcomes.append(exc)
    for outcome in outcomes:
        if isinstance(outcome, StorageConnectionError):
            assert isinstance(
                outcome.__cause__,
                asyncpg.PostgresError | asyncpg.InterfaceError | asyncpg.InternalClientError,
            )
    assert isinstance(outcomes[-1], Record) and outcomes[-1].data == b'{"n": 0}'


def test_postgres_scheme_and_sync_api(postgresql_url: str) -> None:
    User = define_user(postgresql_url.replace("postgresql://", "postgres://", 1))
    reference = User(name="Ada", email="a@b.c").save_external_sync()
    assert User.load_external_sync(reference).name == "Ada"


# --- Listing and purging ----------------------------------------------------------------------


def aged(class_name: str, n: int, days: float, id: UUID | None = None) -> Record:
    """A record last updated ``days`` ago (a little more for higher ``n``: distinct times),
    with data of varying length and some multi-byte characters."""
    then = dt.datetime.now(dt.UTC) - dt.timedelta(days=days, microseconds=n)
    pad = "é" * (n % 7) + "x" * (n % 300)
    data = f'{{"n":{n},"pad":"{pad}"}}'
    return Record(id or uuid4(), class_name, data.encode(), 1, then, then)


async def raw_infos(sql: Any, namespace: str, class_name: str | None = None) -> set[RecordInfo]:
    """What plain SQL sees, as listing entries: the size is that of the JSON text the driver
    returns for ``data`` (what a load returns), in UTF-8 bytes."""
    rows = await sql.fetch(
        f'SELECT id, class_name, data, updated_at FROM "{namespace}"'
        " WHERE $1::text IS NULL OR class_name = $1",
        class_name,
    )
    return {
        RecordInfo(row["class_name"], row["id"], len(row["data"].encode()), row["updated_at"])
        for row in rows
    }


async def test_scan_lists_every_record_without_data(
    backend: PostgreSQLBackend, sql: Any, namespace: str
) -> None:
    # 700 + 500 records: whole pages of 500, a partial one, and a class that ends exactly on a
    # page boundary; the smallest and largest UUIDs are ids too.
    alpha = [aged("Alpha", i, i / 1000) for i in range(698)]
    alpha += [aged("Alpha", 698, 1, UUID(int=0)), aged("Alpha", 699, 1, UUID(int=2**128 - 1))]
    beta = [aged("Beta", i, i / 1000) for i in range(500)]
    await backend.write_records(alpha + beta)
    await backend.write_record(aged("Alpha", 5, 0, alpha[5].id))  # an update moves updated_at

    for class_name, expected in (("Alpha", 700), ("Beta", 500), (None, 1200)):
        listed = [info async for info in backend.scan_records(class_name)]
        assert len(listed) == expected
        assert len({info.id for info in listed}) == expected  # no record twice
        assert set(listed) == await raw_infos(sql, namespace, class_name)
    assert [info async for info in backend.scan_records("Gamma")] == []

    # The size is that of the data a load returns; the time is the stored updated_at.
    by_id = {info.id: info for info in [i async for i in backend.scan_records("Alpha")]}
    for loaded in await backend.read_records("Alpha", [r.id for r in alpha[:50]]):
        assert loaded is not None
        assert by_id[loaded.id].size == len(loaded.data)
        assert by_id[loaded.id].updated_at == loaded.updated_at
    assert by_id[UUID(int=0)].size == len(
        b'{"n": 698, "pad": "' + "é".encode() * 5 + b"x" * 98 + b'"}'
    )
    assert by_id[alpha[5].id].updated_at > alpha[5].updated_at


async def test_scan_holds_no_connection_between_pages(
    backend: PostgreSQLBackend, sql: Any, namespace: str
) -> None:
    # The backend's pool has one connection: were a cursor kept open across a yield, the
    # deletes below would wait for it forever.
    records = [aged("Scan", i, 0) for i in range(1200)]
    await backend.write_records(records)
    ordered = sorted(record.id for record in records)
    ahead = set(ordered[-200:])  # in the last page: deleted before the scan reaches it
    seen: list[UUID] = []

    async def scan_and_delete() -> None:
        async for info in backend.scan_records("Scan"):
            if not seen:
                assert await backend.delete_records("Scan", list(ahead)) == 200
            seen.append(info.id)
            assert await backend.delete(info.id, "Scan") is True

    await asyncio.wait_for(scan_and_delete(), timeout=60)
    assert seen == [id for id in ordered if id not in ahead]
    assert await sql.fetchval(f'SELECT count(*) FROM "{namespace}"') == 0


async def test_purge_deletes_old_records_in_batches(
    backend: PostgreSQLBackend, sql: Any, namespace: str
) -> None:
    old = [aged("Event", i, 40) for i in range(1100)]
    new = [aged("Event", i, 1) for i in range(150)]
    other = [aged("Other", i, 40) for i in range(200)]
    await backend.write_records(old + new + other)
    await backend.purge("Warm", dt.datetime.now(dt.UTC))  # prepare the statement first
    statements: list[str] = []
    async with backend._pool.acquire() as connection:
        connection.add_query_logger(lambda query: statements.append(query.query))

    cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    assert await backend.purge("Event", cutoff, batch_size=500) == 1100
    await asyncio.sleep(0)
    assert len(statements) == 3  # 500, 500, then 100 (fewer than a batch: done)
    assert all(statement.startswith(f'DELETE FROM "{namespace}"') for statement in statements)

    remaining = await sql.fetch(f'SELECT id, class_name FROM "{namespace}"')
    assert {row["id"] for row in remaining if row["class_name"] == "Event"} == {r.id for r in new}
    assert {row["id"] for row in remaining if row["class_name"] == "Other"} == {r.id for r in other}
    count_old = f'SELECT count(*) FROM "{namespace}" WHERE class_name = $1 AND updated_at < $2'
    assert await sql.fetchval(count_old, "Event", cutoff) == 0
    assert await sql.fetchval(count_old, "Other", cutoff) == 200


async def test_purge_with_nothing_to_delete_returns_0(
    backend: PostgreSQLBackend, sql: Any, namespace: str
) -> None:
    cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    assert await backend.purge("Event", cutoff) == 0  # an empty table
    await backend.write_records([aged("Event", i, 1) for i in range(10)])
    await backend.write_records([aged("Other", i, 40) for i in range(10)])
    assert await backend.purge("Event", cutoff) == 0
    assert await backend.purge("Missing", cutoff) == 0
    # Exactly one batch of old records: a second statement finds none and ends the purge.
    await backend.write_records([aged("Event", i, 40) for i in range(5)])
    assert await backend.purge("Event", cutoff, batch_size=5) == 5
    assert await backend.purge("Event", cutoff, batch_size=5) == 0
    assert await sql.fetchval(f'SELECT count(*) FROM "{namespace}"') == 20


async def test_purge_leaves_a_record_being_saved(
    backend: PostgreSQLBackend, postgres_server: str, namespace: str
) -> None:
    # Another session re-saves an old record and has not committed yet: the purge neither
    # waits for it nor deletes it, and the record, now new, stays.
    old = [aged("Event", i, 40) for i in range(3)]
    await backend.write_records(old)
    writer = await asyncpg.connect(postgres_server)
    try:
        transaction = writer.transaction()
        await transaction.start()
        await writer.execute(
            f'UPDATE "{namespace}" SET updated_at = now() WHERE id = $1', old[0].id
        )
        cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
        assert await asyncio.wait_for(backend.purge("Event", cutoff), timeout=10) == 2
        await transaction.commit()
    finally:
        await writer.close()
    assert await backend.read_record("Event", old[0].id) is not None
    assert await backend.purge("Event", dt.datetime.now(dt.UTC) - dt.timedelta(days=30)) == 0


async def test_scan_and_purge_check_their_arguments(postgresql_url: str) -> None:
    backend = PostgreSQLBackend(postgresql_url)
    cutoff = dt.datetime.now(dt.UTC)
    with pytest.raises(StorageValidationError, match="invalid class name"):
        [info async for info in backend.scan_records("a'; DROP TABLE x; --")]
    with pytest.raises(StorageValidationError, match="invalid class name"):
        await backend.purge("a/b", cutoff)
    with pytest.raises(StorageOperationError, match="not connected"):
        [info async for info in backend.scan_records()]
    with pytest.raises(StorageOperationError, match="not connected"):
        await backend.purge("Event", cutoff)
    await backend.connect()
    try:
        for bad in (0, -1):
            with pytest.raises(
                StorageValidationError, match="batch_size must be a positive integer"
            ):
                await backend.purge("Event", cutoff, batch_size=bad)
    finally:
        await backend.disconnect()


async def test_concurrent_purges_share_the_work(
    backend: PostgreSQLBackend, postgresql_url: str, sql: Any, namespace: str
) -> None:
    await backend.write_records([aged("Event", i, 40) for i in range(1100)])
    others = [PostgreSQLBackend(postgresql_url, min_size=1, max_size=1) for _ in range(2)]
    await asyncio.gather(*(other.connect() for other in others))
    try:
        cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
        counts = await asyncio.gather(
            backend.purge("Event", cutoff, batch_size=100),
            *(other.purge("Event", cutoff, batch_size=100) for other in others),
        )
    finally:
        await asyncio.gather(*(other.disconnect() for other in others))
    assert sum(counts) == 1100  # each record counted by the purge that deleted it
    assert await sql.fetchval(f'SELECT count(*) FROM "{namespace}"') == 0


async def test_a_busy_pool_bounds_the_wait_and_counts_its_connections_back(
    postgresql_url: str,
) -> None:
    backend = PostgreSQLBackend(postgresql_url, min_size=1, max_size=1, timeout=0.3)
    await backend.connect()
    try:
        slow = asyncio.create_task(backend._run("execute", "SELECT pg_sleep(1)"))
        await asyncio.sleep(0.1)  # the one connection is taken
        started = time.monotonic()
        with pytest.raises(
            StorageConnectionError,
            match=r"no pooled connection \(max_size=1\) free or opened within 0.3s",
        ):
            await backend.read_record("Busy", uuid4())
        assert time.monotonic() - started < 0.9
        await slow
        slow = asyncio.create_task(backend._run("execute", "SELECT pg_sleep(10)"))
        await asyncio.sleep(0.1)
        slow.cancel()  # a statement cancelled gives its connection back too
        with pytest.raises(asyncio.CancelledError):
            await slow
        # Cancelled again while asyncpg hands the connection back (it waits for the server to
        # cancel the statement): the hand-back is finished once, and nothing is left to log.
        reported: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(
            lambda _, context: reported.append(context)
        )
        slow = asyncio.create_task(backend._run("execute", "SELECT pg_sleep(10)"))
        await asyncio.sleep(0.1)
        slow.cancel()
        await asyncio.sleep(0)
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        for _ in range(100):
            if backend._taken == 0:
                break
            await asyncio.sleep(0.02)
        gc.collect()
        assert reported == []
        # Every connection is back: loads go out at once, one after another, without a bound.
        for _ in range(3):
            assert await backend.read_record("Busy", uuid4()) is None
        assert backend._taken == 0
    finally:
        asyncio.get_running_loop().set_exception_handler(None)
        await backend.disconnect()
