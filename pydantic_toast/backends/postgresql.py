"""``postgresql://`` and ``postgres://``: records in one table, through an asyncpg pool.

The table is DESIGN.md's ``external_models`` (name configurable), with ``data`` as JSONB so
that ``data->>'email'`` works in plain SQL. Choices that keep the driver's cost the only cost:

- The model's JSON text goes straight into the ``jsonb`` parameter and comes back as text:
  asyncpg exchanges ``json``/``jsonb`` as ``str``, so no codec parses or re-encodes it. JSONB
  normalizes whitespace and key order; the model does not care.
- One pool per backend, created in `connect`. Its ``reset`` is a no-op: this pool's users never
  change session state (no ``SET``, ``LISTEN``, cursors or session locks), so the default reset
  query on every release would only cost a round trip.
- Batches are one statement each: an ``unnest`` upsert, ``WHERE id = ANY($1)``.
- Listing pages through the table by id (keyset pagination), one short statement per page, so
  no cursor or transaction stays open while the caller works (and deletes) between pages.
  `purge` deletes in batches of one statement each, found through the
  ``(class_name, updated_at)`` index.
- Statements are parameterised; the table name is checked as an identifier and always quoted.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Annotated, Any
from urllib.parse import quote
from uuid import UUID

import asyncpg  # type: ignore[import-untyped]
from pydantic import Field, model_validator

from pydantic_toast._errors import StorageOperationError, StorageValidationError
from pydantic_toast.backends.base import Capabilities, StorageBackend
from pydantic_toast.backends.options import BackendOptions, Count, Identifier, Seconds
from pydantic_toast.backends.records import Record, StoredInfo

__all__ = ["PostgreSQLBackend"]

_COLUMNS = "id, class_name, data, schema_version, created_at, updated_at"
# Rows per page of `scan`.
SCAN_PAGE = 500

# The query parameters asyncpg itself reads from a DSN; they go to it untouched.
_ASYNCPG_PARAMETERS = frozenset(
    {
        "application_name",
        "database",
        "dbname",
        "gsslib",
        "host",
        "krbsrvname",
        "passfile",
        "password",
        "port",
        "service",
        "ssl_max_protocol_version",
        "ssl_min_protocol_version",
        "sslcert",
        "sslcrl",
        "sslkey",
        "sslmode",
        "sslnegotiation",
        "sslpassword",
        "sslrootcert",
        "target_session_attrs",
        "user",
    }
)

# Failures that go away by themselves: the connection (class 08), a server shutting down or
# starting (57P0x), too many connections (53300), a transaction chosen as a serialization or
# deadlock victim (40001, 40P01), a server that became a read-only standby in a failover
# (25006), and the client's view of a lost connection.
_TRANSIENT = (
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
    asyncpg.ReadOnlySQLTransactionError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.InternalClientError,
)
# asyncpg's complaints about its own configuration (an unknown sslmode, a bad
# target_session_attrs, a feature the server lacks): retrying cannot help.
_MISCONFIGURED = (asyncpg.ClientConfigurationError, asyncpg.UnsupportedClientFeatureError)


class PostgreSQLOptions(BackendOptions):
    label = "PostgreSQL"

    table: Identifier = "external_models"
    min_size: Annotated[int, Field(ge=0, description="an integer >= 0")] = 1
    max_size: Count = 10
    #: Seconds to connect (and to wait for a free pooled connection).
    timeout: Seconds = 10.0
    #: Seconds per statement.
    command_timeout: Seconds = 30.0

    @model_validator(mode="after")
    def _sizes(self) -> PostgreSQLOptions:
        if self.min_size > self.max_size:
            raise ValueError(
                f"min_size ({self.min_size}) must not exceed max_size ({self.max_size})"
            )
        return self

    @classmethod
    def driver_option_names(cls) -> frozenset[str]:
        return _ASYNCPG_PARAMETERS


# Values asyncpg accepts for the DSN parameters that take a fixed set: checked when the model
# is defined, not at the first connection.
_DSN_CHOICES = {
    "sslmode": ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    "target_session_attrs": (
        "any",
        "primary",
        "standby",
        "prefer-standby",
        "read-write",
        "read-only",
    ),
}


async def _keep_session(connection: Any) -> None:
    """The pool's ``reset``: nothing to undo, since no user of the pool changes the session."""


class PostgreSQLBackend(StorageBackend):
    """Records in a PostgreSQL table, through one asyncpg pool.

    Options, from the URL's query string or as keyword arguments: ``table`` (default
    ``external_models``), ``min_size`` and ``max_size`` of the pool (default 1 and 10),
    ``timeout`` to connect in seconds (default 10) and ``command_timeout`` per statement
    (default 30). They are removed from the URL before asyncpg sees it; asyncpg's own DSN
    parameters (``sslmode``, ``sslrootcert``, ``target_session_attrs``, ...) pass through, and
    anything else is refused when the model is defined.
    """

    options_model = PostgreSQLOptions
    options: PostgreSQLOptions
    capabilities = Capabilities(
        delete=True,
        conditional_delete=True,
        conditional_write=True,
        scan=True,
        purge=True,
        keeps_created_at=True,
        batch_size=10_000,
        concurrency=1,
    )

    def __init__(self, url: str, **options: object) -> None:
        super().__init__(url, **options)
        location = self.location
        # The password travels to asyncpg as an argument, not inside the DSN, so that no
        # driver message that quotes the DSN can ever show it.
        self._password = location.password
        for name, choices in _DSN_CHOICES.items():
            value = self.driver_options.get(name)
            if value is not None and value not in choices:
                raise StorageValidationError(
                    f"PostgreSQL option {name} must be one of {', '.join(choices)}, "
                    f"not {str(value)[:40]!r}"
                )
        user = f"{location.username}@" if location.username else ""
        query = "&".join(f"{name}={value}" for name, value in _quoted(self.driver_options))
        # Rebuilt by hand: urlunsplit would turn "postgresql:///db" into "postgresql:/db".
        self._dsn = f"{location.scheme}://{user}{location.netloc}{location.path}"
        self._dsn += f"?{query}" if query else ""
        self._where = f"{location.netloc or 'localhost'}{location.path}"

        self.table = self.options.table
        self.min_size = self.options.min_size
        self.max_size = self.options.max_size
        self.timeout = self.options.timeout
        self.command_timeout = self.options.command_timeout

        self._pool: Any = None
        self._releases: set[asyncio.Task[None]] = set()  # hand-backs finishing after a cancel
        self._taken = 0  # connections `_run` holds or waits for (only it takes them)
        quoted = f'"{self.table}"'
        self._index = _index_name(self.table)
        update = (
            " ON CONFLICT (id) DO UPDATE SET class_name = EXCLUDED.class_name,"
            " data = EXCLUDED.data, schema_version = EXCLUDED.schema_version,"
            " updated_at = EXCLUDED.updated_at"
        )
        self._upsert = f"INSERT INTO {quoted} ({_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6){update}"
        self._upsert_many = (
            f"INSERT INTO {quoted} ({_COLUMNS}) SELECT * FROM unnest($1::uuid[], $2::text[],"
            f" $3::jsonb[], $4::integer[], $5::timestamptz[], $6::timestamptz[]){update}"
        )
        self._upsert_returning = self._upsert + " RETURNING created_at"
        self._upsert_many_returning = self._upsert_many + " RETURNING id, created_at"
        self._select = (
            "SELECT class_name, data, schema_version, created_at, updated_at"
            f" FROM {quoted} WHERE id = $1"
        )
        # The row's first five columns are what `decode_stored` reads; the id comes last.
        self._select_many = (
            "SELECT class_name, data, schema_version, created_at, updated_at, id"
            f" FROM {quoted} WHERE id = ANY($1::uuid[])"
        )
        # A compare-and-set per row: an UPDATE re-checks its WHERE on a row another
        # transaction changed meanwhile, so a row saved since it was read is passed over.
        self._replace_many = (
            f"UPDATE {quoted} AS t SET data = u.data, schema_version = u.schema_version,"
            " created_at = u.created_at, updated_at = u.updated_at"
            " FROM unnest($1::uuid[], $2::text[], $3::jsonb[], $4::integer[],"
            " $5::timestamptz[], $6::timestamptz[], $7::timestamptz[])"
            " AS u(id, class_name, data, schema_version, created_at, updated_at, expected)"
            " WHERE t.id = u.id AND t.class_name = u.class_name AND t.updated_at = u.expected"
            " RETURNING t.id"
        )
        self._delete_many = f"DELETE FROM {quoted} WHERE id = ANY($1::uuid[]) AND class_name = $2"
        # As the purge below: `FOR UPDATE` re-checks `updated_at` on a row updated since the
        # statement's snapshot, so a record refreshed meanwhile survives, and `SKIP LOCKED`
        # passes a row a writer holds (it is being refreshed) instead of waiting on it, which
        # would deadlock with a writer's upsert locking the same rows in another order.
        self._delete_stale = (
            f"DELETE FROM {quoted} WHERE id = ANY(ARRAY(SELECT id FROM {quoted}"
            " WHERE id = ANY($1::uuid[]) AND class_name = $2 AND updated_at < $3"
            " FOR UPDATE SKIP LOCKED))"
        )
        # Listing: the size is that of the JSON text a read returns. The first page has no
        # lower bound (any UUID, even the nil one, may be an id); later ones start after the
        # last id seen.
        scan = (
            "SELECT id, class_name, octet_length(data::text), updated_at, schema_version"
            f" FROM {quoted}"
            " WHERE ($1::text IS NULL OR class_name = $1){after} ORDER BY id LIMIT {limit}"
        )
        self._scan_first = scan.format(after="", limit=SCAN_PAGE)
        self._scan_next = scan.format(after=" AND id > $2::uuid", limit=SCAN_PAGE)
        # Purging, one batch per statement: the ids come from the (class_name, updated_at)
        # index, and `= ANY(ARRAY(...))` deletes them through the primary key (with `IN`, the
        # planner may hash-join the whole table instead). `FOR UPDATE` re-checks `updated_at`
        # on a row updated since the statement's snapshot, so a record re-saved meanwhile
        # survives; `SKIP LOCKED` lets a purge pass rows a writer holds, and lets concurrent
        # purges share the work, instead of waiting on each other's row locks.
        self._purge = (
            f"DELETE FROM {quoted} WHERE id = ANY(ARRAY(SELECT id FROM {quoted}"
            " WHERE class_name = $1 AND updated_at < $2 LIMIT $3 FOR UPDATE SKIP LOCKED))"
        )

    @property
    def where(self) -> str:
        return f"PostgreSQL at {self._where}"

    async def connect(self) -> None:
        """Open the pool and make sure the table and its index exist."""
        if self._pool is not None:
            return
        pool = None
        try:
            pool = await asyncpg.create_pool(
                self._dsn,
                password=self._password,
                min_size=self.min_size,
                max_size=self.max_size,
                timeout=self.timeout,
                command_timeout=self.command_timeout,
                reset=_keep_session,
            )
            await self._create_table(pool)
        except BaseException:
            if pool is not None:
                pool.terminate()
            raise
        self._pool = pool

    async def _create_table(self, pool: Any) -> None:
        """Create the table and index unless both exist.

        Processes starting together would race in ``CREATE TABLE IF NOT EXISTS`` (it can fail
        with a unique violation on ``pg_type``), so creation holds a transaction-level advisory
        lock keyed by the table name. When both exist nothing is created, so a role without
        the CREATE privilege can still use a table made for it; the command-line tool
        (``create_missing`` false) creates nothing and says what is missing.
        """
        quoted = f'"{self.table}"'
        async with pool.acquire() as connection, connection.transaction():
            exists = "SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL"
            if await connection.fetchval(exists, quoted, f'"{self._index}"'):
                return
            if not self.create_missing:
                if await connection.fetchval("SELECT to_regclass($1) IS NOT NULL", quoted):
                    return
                raise StorageOperationError(f"{self.where} has no table {self.table!r}", self.url)
            await connection.execute(
                "SELECT pg_advisory_xact_lock(hashtext($1))", f"pydantic_toast:{self.table}"
            )
            await connection.execute(
                f"CREATE TABLE IF NOT EXISTS {quoted} ("
                " id UUID PRIMARY KEY, class_name TEXT NOT NULL, data JSONB NOT NULL,"
                " schema_version INTEGER NOT NULL, created_at TIMESTAMPTZ NOT NULL,"
                " updated_at TIMESTAMPTZ NOT NULL);"
                f' CREATE INDEX IF NOT EXISTS "{self._index}"'
                f" ON {quoted} (class_name, updated_at)"
            )

    async def disconnect(self) -> None:
        """Close the pool, waiting at most ``timeout`` for busy connections, then cut them."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), self.timeout)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            pool.terminate()

    async def put_many(self, records: Sequence[Record]) -> list[datetime]:
        """One upsert statement; the table keeps a stored ``created_at``. Only a first save
        (``created_at == updated_at``) can meet a record it does not know of, so only then
        is the kept ``created_at`` read back (``RETURNING``); a re-save carries its own."""
        first_save = any(record.created_at == record.updated_at for record in records)
        if len(records) == 1:
            record = records[0]
            arguments = (
                record.id,
                record.class_name,
                record.data.decode(),
                record.schema_version,
                record.created_at,
                record.updated_at,
            )
            if first_save:
                return [await self._run("fetchval", self._upsert_returning, *arguments)]
            await self._run("execute", self._upsert, *arguments)
            return [record.created_at]
        columns = _columns(records)
        if not first_save:
            await self._run("execute", self._upsert_many, *columns)
            return [record.created_at for record in records]
        rows = await self._run("fetch", self._upsert_many_returning, *columns)
        kept = {row[0]: row[1] for row in rows}
        return [kept[record.id] for record in records]

    async def put_unchanged(
        self, records: Sequence[Record], expected: Sequence[datetime]
    ) -> list[bool]:
        """One statement; ``timestamptz`` holds microseconds, as `datetime` does, so the
        comparison is exact."""
        rows = await self._run("fetch", self._replace_many, *_columns(records), list(expected))
        written = {row[0] for row in rows}
        return [record.id in written for record in records]

    async def get_many(self, class_name: str, ids: Sequence[UUID]) -> list[Any]:
        """The rows (``StoredRow``'s columns first), as asyncpg returned them."""
        if len(ids) == 1:
            return [await self._run("fetchrow", self._select, ids[0])]
        # By the ids' integers: a UUID's hash runs Python code, an int's does not.
        found = {row[5].int: row for row in await self._run("fetch", self._select_many, ids)}
        return [found.get(id.int) for id in ids]

    async def delete_many(self, class_name: str, ids: Sequence[UUID]) -> int:
        status = await self._run("execute", self._delete_many, ids, class_name)
        return int(status.rpartition(" ")[2])

    async def delete_stale(self, class_name: str, ids: Sequence[UUID], before: datetime) -> int:
        status = await self._run("execute", self._delete_stale, ids, class_name, before)
        return int(status.rpartition(" ")[2])

    async def scan(self, class_name: str | None) -> AsyncIterator[StoredInfo]:
        self._open()  # fail now, not at the first page, when not connected
        last: UUID | None = None
        while True:
            if last is None:
                rows = await self._run("fetch", self._scan_first, class_name)
            else:
                rows = await self._run("fetch", self._scan_next, class_name, last)
            for id, name, size, updated_at, version in rows:
                yield StoredInfo(id, name, size, updated_at, schema_version=version)
            if len(rows) < SCAN_PAGE:
                return
            last = rows[-1][0]

    async def purge_before(self, class_name: str, before: datetime, batch_size: int) -> int:
        self._open()
        deleted = 0
        while True:
            status = await self._run("execute", self._purge, class_name, before, batch_size)
            count = int(status.rpartition(" ")[2])
            deleted += count
            if count < batch_size:
                return deleted

    async def _run(self, method: str, *args: Any) -> Any:
        """``connection.<method>(*args)`` on a pooled connection.

        Waiting for a free connection is bounded by `timeout`, as a statement is by
        `command_timeout` (asyncpg's pool would wait without end: a burst against a stalled
        server queued behind every earlier caller's timeout). While fewer than ``max_size``
        connections are taken, one is free and there is no wait, so the bound is left out:
        asyncpg would spend a task on it.
        """
        pool = self._open()
        wait = None if self._taken < self.max_size else self.timeout
        self._taken += 1
        try:
            connection = await pool.acquire(timeout=wait)
        except BaseException as exc:
            self._taken -= 1
            if wait is None or not isinstance(exc, TimeoutError):
                raise
            raise TimeoutError(
                f"no pooled connection (max_size={self.max_size}) free or opened within {wait:g}s"
            ) from None
        try:
            return await getattr(connection, method)(*args)
        finally:
            try:
                await pool.release(connection)
            except asyncio.CancelledError:
                # The loop is shutting down (or the caller was cancelled) while asyncpg hands
                # the connection back. Finish the hand-back in a task of our own, created after
                # shutdown chose what to cancel, or closing the pool waits `timeout` for a
                # connection it still believes in use; the connection counts as taken until
                # it is back.
                task = asyncio.get_running_loop().create_task(pool.release(connection))
                self._releases.add(task)
                task.add_done_callback(self._released)
                raise
            except BaseException:
                self._taken -= 1
                raise
            self._taken -= 1

    def _released(self, task: asyncio.Task[None]) -> None:
        """A hand-back after a cancel has ended. When only the caller was cancelled, asyncpg's
        own shielded hand-back went on too: if it was still waiting for the server to cancel
        the statement, this second one ran beside it and fails at the end ("inactivity timer
        already exists") with the connection back in the pool all the same. Its outcome is
        taken here, so that no error is left for asyncio to report."""
        self._releases.discard(task)
        self._taken -= 1
        if not task.cancelled():
            task.exception()

    def _open(self) -> Any:
        if self._pool is None:
            raise self.closed()
        return self._pool

    def is_transient(self, exc: BaseException) -> bool:
        if isinstance(exc, _MISCONFIGURED):
            return False
        if isinstance(exc, asyncpg.InterfaceError):  # the client's view of a lost connection
            return "connection" in str(exc) or "closed" in str(exc)
        return isinstance(exc, _TRANSIENT) or super().is_transient(exc)

    def refusal(self, record: Record) -> str | None:
        if _holds_nul(record.data):
            return "JSONB cannot hold the character U+0000 (a NUL in a string)"
        return None

    def invalid(self, exc: BaseException) -> bool:
        # Class 22: the server refused the data itself (a NUL in JSON text, a value out of
        # range), so the data is at fault and no retry can help; or asyncpg refused its own
        # configuration.
        return isinstance(exc, (asyncpg.DataError, *_MISCONFIGURED))


def _holds_nul(data: bytes) -> bool:
    """Whether JSON text holds the escape ``\\u0000``, which JSONB refuses: one not escaped
    itself, so preceded by an even number of backslashes."""
    start = data.find(b"\\u0000")
    while start >= 0:
        before = start
        while before > 0 and data[before - 1] == 0x5C:  # a backslash
            before -= 1
        if (start - before) % 2 == 0:
            return True
        start = data.find(b"\\u0000", start + 1)
    return False


def _quoted(options: dict[str, Any]) -> list[tuple[str, str]]:
    return [(quote(name, safe=""), quote(str(value), safe="")) for name, value in options.items()]


def _index_name(table: str) -> str:
    """``{table}_class_updated``, shortened with a checksum where it would pass 63 characters
    (PostgreSQL would truncate it, and two long table names could then share one index name)."""
    name = f"{table}_class_updated"
    if len(name) <= 63:
        return name
    return f"{table[:48]}_{zlib.crc32(table.encode()):08x}_cu"


def _columns(records: Sequence[Record]) -> tuple[list[Any], ...]:
    """The records as the arrays an ``unnest`` statement takes, one per column."""
    return (
        [record.id for record in records],
        [record.class_name for record in records],
        [record.data.decode() for record in records],
        [record.schema_version for record in records],
        [record.created_at for record in records],
        [record.updated_at for record in records],
    )
