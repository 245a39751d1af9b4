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
import math
import re
import zlib
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import unquote, unquote_plus, urlsplit
from uuid import UUID

import asyncpg  # type: ignore[import-untyped]

from pydantic_toast.backends.base import Record, RecordInfo, StorageBackend, check_class_name
from pydantic_toast.errors import (
    ExternalStorageError,
    StorageConnectionError,
    StorageValidationError,
)

__all__ = ["PostgreSQLBackend"]

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_OPTIONS = ("table", "min_size", "max_size", "timeout", "command_timeout")
_COLUMNS = "id, class_name, data, schema_version, created_at, updated_at"
# Rows per page of `scan_records`.
SCAN_PAGE = 500

# What the driver raises when the server is unreachable, the connection drops, a timeout
# expires or the server refuses a statement. (`TimeoutError` is an `OSError`.)
_DRIVER_ERRORS = (
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


async def _keep_session(connection: Any) -> None:
    """The pool's ``reset``: nothing to undo, since no user of the pool changes the session."""


class PostgreSQLBackend(StorageBackend):
    """Records in a PostgreSQL table, through one asyncpg pool.

    Options, from the URL's query string or as keyword arguments (keywords win):
    ``table`` (default ``external_models``), ``min_size`` and ``max_size`` of the pool
    (default 1 and 10), ``timeout`` to connect in seconds (default 10) and ``command_timeout``
    per statement (default 30). They are removed from the URL before asyncpg sees it; every
    other query parameter (``sslmode``, ``sslrootcert``, ...) is asyncpg's.
    """

    def __init__(
        self,
        url: str,
        *,
        table: str | None = None,
        min_size: int | None = None,
        max_size: int | None = None,
        timeout: float | None = None,
        command_timeout: float | None = None,
    ) -> None:
        super().__init__(url)
        parts = urlsplit(url)
        if parts.scheme not in ("postgresql", "postgres"):
            raise StorageValidationError(
                f"not a PostgreSQL URL: scheme {parts.scheme!r}, expected 'postgresql'"
            )
        options: dict[str, str] = {}
        kept: list[str] = []
        for pair in filter(None, parts.query.split("&")):
            key, _, value = pair.partition("=")
            if unquote_plus(key) in _OPTIONS:
                options[unquote_plus(key)] = unquote_plus(value)
            else:
                kept.append(pair)

        # The password travels to asyncpg as an argument, not inside the DSN, so that no
        # driver message that quotes the DSN can ever show it.
        netloc, self._password = parts.netloc, None
        userinfo, at, hostinfo = netloc.rpartition("@")
        if at:
            user, colon, secret = userinfo.partition(":")
            if colon:
                netloc, self._password = f"{user}@{hostinfo}", unquote(secret)
        if hostinfo and "," not in hostinfo:
            try:
                parts.port  # noqa: B018 - parsing is the check
            except ValueError as exc:
                raise StorageValidationError(f"invalid PostgreSQL URL: {exc}") from exc
        # Rebuilt by hand: urlunsplit would turn "postgresql:///db" into "postgresql:/db".
        self._dsn = (
            f"{parts.scheme}://{netloc}{parts.path}" + ("?" if kept else "") + "&".join(kept)
        )
        self._where = f"{hostinfo or 'localhost'}{parts.path}"

        self.table = table if table is not None else options.get("table", "external_models")
        if not isinstance(self.table, str) or _IDENTIFIER.fullmatch(self.table) is None:
            raise StorageValidationError(
                f"invalid table name {self.table!r}: use letters, digits and '_' "
                "(at most 63 characters, not starting with a digit)"
            )
        self.min_size = int(_option("min_size", min_size, options, 1, int, 0))
        self.max_size = int(_option("max_size", max_size, options, 10, int, 1))
        if self.min_size > self.max_size:
            raise StorageValidationError(
                f"min_size ({self.min_size}) must not exceed max_size ({self.max_size})"
            )
        self.timeout = _option("timeout", timeout, options, 10.0, float, 0.0)
        self.command_timeout = _option(
            "command_timeout", command_timeout, options, 30.0, float, 0.0
        )

        self._pool: Any = None
        self._releases: set[asyncio.Task[None]] = set()  # hand-backs finishing after a cancel
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
        self._select = (
            "SELECT class_name, data, schema_version, created_at, updated_at"
            f" FROM {quoted} WHERE id = $1"
        )
        self._select_many = f"SELECT {_COLUMNS} FROM {quoted} WHERE id = ANY($1::uuid[])"
        self._delete_many = f"DELETE FROM {quoted} WHERE id = ANY($1::uuid[]) AND class_name = $2"
        # Listing: the size is that of the JSON text `read_record` returns. The first page has
        # no lower bound (any UUID, even the nil one, may be an id); later ones start after the
        # last id seen.
        scan = (
            f"SELECT id, class_name, octet_length(data::text), updated_at FROM {quoted}"
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
        except BaseException as exc:
            if pool is not None:
                pool.terminate()
            if isinstance(exc, _DRIVER_ERRORS):
                raise self._error(exc, "connect") from exc
            raise
        self._pool = pool

    async def _create_table(self, pool: Any) -> None:
        """Create the table and index unless both exist.

        Processes starting together would race in ``CREATE TABLE IF NOT EXISTS`` (it can fail
        with a unique violation on ``pg_type``), so creation holds a transaction-level advisory
        lock keyed by the table name. When both exist nothing is created, so a role without
        the CREATE privilege can still use a table made for it.
        """
        quoted = f'"{self.table}"'
        async with pool.acquire() as connection, connection.transaction():
            exists = "SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL"
            if await connection.fetchval(exists, quoted, f'"{self._index}"'):
                return
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
        except _DRIVER_ERRORS:
            pool.terminate()

    async def write_record(self, record: Record) -> None:
        check_class_name(record.class_name)
        try:
            await self._run(
                "execute",
                self._upsert,
                record.id,
                record.class_name,
                record.data.decode(),
                record.schema_version,
                record.created_at,
                record.updated_at,
            )
        except _DRIVER_ERRORS as exc:
            raise self._error(exc, "save", record.class_name, record.id, [record.id]) from exc

    async def read_record(self, class_name: str, id: UUID) -> Record | None:
        check_class_name(class_name)
        try:
            row = await self._run("fetchrow", self._select, id)
        except _DRIVER_ERRORS as exc:
            raise self._error(exc, "load", class_name, id) from exc
        if row is None:
            return None
        return Record(id, row[0], row[1].encode(), row[2], row[3], row[4])

    async def write_records(self, records: Sequence[Record]) -> None:
        if len(records) <= 1:
            if records:
                await self.write_record(records[0])
            return
        # One upsert may not touch a row twice: keep the last record of each id.
        latest = list({record.id: record for record in records}.values())
        names = {check_class_name(record.class_name) for record in latest}
        try:
            await self._run(
                "execute",
                self._upsert_many,
                [record.id for record in latest],
                [record.class_name for record in latest],
                [record.data.decode() for record in latest],
                [record.schema_version for record in latest],
                [record.created_at for record in latest],
                [record.updated_at for record in latest],
            )
        except _DRIVER_ERRORS as exc:
            # One statement: PostgreSQL wrote all of the batch or none of it.
            failed = [record.id for record in latest]
            name = names.pop() if len(names) == 1 else ""
            raise self._error(exc, "save", name, failed_ids=failed) from exc

    async def read_records(self, class_name: str, ids: Sequence[UUID]) -> list[Record | None]:
        if len(ids) <= 1:
            return [await self.read_record(class_name, ids[0])] if ids else []
        check_class_name(class_name)
        try:
            rows = await self._run("fetch", self._select_many, ids)
        except _DRIVER_ERRORS as exc:
            raise self._error(exc, "load", class_name) from exc
        found = {row[0]: row for row in rows}
        records: list[Record | None] = []
        for id in ids:
            row = found.get(id)
            records.append(
                None if row is None else Record(id, row[1], row[2].encode(), row[3], row[4], row[5])
            )
        return records

    async def delete_records(self, class_name: str, ids: Sequence[UUID]) -> int:
        check_class_name(class_name)
        if not ids:
            return 0
        try:
            status = await self._run("execute", self._delete_many, ids, class_name)
        except _DRIVER_ERRORS as exc:
            raise self._error(exc, "delete", class_name) from exc
        return int(status.rpartition(" ")[2])

    async def scan_records(self, class_name: str | None = None) -> AsyncIterator[RecordInfo]:
        if class_name is not None:
            check_class_name(class_name)
        self._open()  # fail now, not at the first page, when not connected
        last: UUID | None = None
        while True:
            try:
                if last is None:
                    rows = await self._run("fetch", self._scan_first, class_name)
                else:
                    rows = await self._run("fetch", self._scan_next, class_name, last)
            except _DRIVER_ERRORS as exc:
                raise self._error(exc, "list", class_name or "") from exc
            for id, name, size, updated_at in rows:
                yield RecordInfo(name, id, size, updated_at)
            if len(rows) < SCAN_PAGE:
                return
            last = rows[-1][0]

    async def purge(self, class_name: str, before: datetime, *, batch_size: int = 500) -> int:
        check_class_name(class_name)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, not {batch_size!r}")
        self._open()
        deleted = 0
        while True:
            try:
                status = await self._run("execute", self._purge, class_name, before, batch_size)
            except _DRIVER_ERRORS as exc:
                raise self._error(exc, "purge", class_name) from exc
            count = int(status.rpartition(" ")[2])
            deleted += count
            if count < batch_size:
                return deleted

    async def _run(self, method: str, *args: Any) -> Any:
        """``connection.<method>(*args)`` on a pooled connection.

        Waiting for a free connection is bounded by `timeout`, as a statement is by
        `command_timeout` (asyncpg's pool would wait without end: a burst against a stalled
        server queued behind every earlier caller's timeout). With a connection idle there is
        no wait, and the bound is left out: asyncpg would spend a task on it.
        """
        pool = self._open()
        wait = None if pool.get_idle_size() else self.timeout
        try:
            connection = await pool.acquire(timeout=wait)
        except TimeoutError:
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
                # connection it still believes in use.
                task = asyncio.get_running_loop().create_task(pool.release(connection))
                self._releases.add(task)
                task.add_done_callback(self._releases.discard)
                raise

    def _open(self) -> Any:
        if self._pool is None:
            raise StorageConnectionError(
                f"the PostgreSQL backend for {self._where} is not connected", self.url
            )
        return self._pool

    def _error(
        self,
        exc: BaseException,
        verb: str,
        class_name: str = "",
        id: UUID | None = None,
        failed_ids: Sequence[UUID] = (),
    ) -> ExternalStorageError:
        """Our exception for a driver's: data PostgreSQL refuses to store is a validation
        error (retrying cannot help); everything else is a connection error, naming the
        records a failed write may not have stored."""
        what = f" {class_name} record" if class_name else ""
        what += f" {id}" if id is not None else ("s" if class_name else "")
        if isinstance(exc, asyncpg.DataError):
            return StorageValidationError(f"PostgreSQL cannot {verb}{what}: {exc}")
        sqlstate = getattr(exc, "sqlstate", None) or ""
        if sqlstate[:2] in _PERMANENT_SQLSTATE_CLASSES:
            # The server answered and refused (no permission, no such table, over a limit):
            # not a connection failure, so nothing retries it.
            return ExternalStorageError(
                f"PostgreSQL at {self._where} refused to {verb}{what}: "
                f"{type(exc).__name__} ({sqlstate}): {exc}"
            )
        return StorageConnectionError(
            f"PostgreSQL at {self._where}: could not {verb}{what}: {type(exc).__name__}: {exc}",
            self.url,
            failed_ids=map(str, failed_ids),
        )


# SQLSTATE classes of errors that retrying cannot fix: 22 data exception, 42 syntax error
# or access rule violation (permissions, undefined objects), 54 program limit exceeded.
_PERMANENT_SQLSTATE_CLASSES = frozenset({"22", "42", "54"})


def _option(
    name: str,
    given: float | None,
    options: dict[str, str],
    default: float,
    kind: type[int] | type[float],
    above: float,
) -> float:
    """A numeric option from the keyword or the URL, checked: at least ``above`` for ints
    (a count), more than ``above`` for floats (a duration)."""
    raw: str | float = given if given is not None else options.get(name, default)
    try:
        if isinstance(raw, bool):
            raise ValueError
        value = kind(raw)
        if kind is float and (not math.isfinite(value) or value <= above):
            raise ValueError
        if kind is int and value < above:
            raise ValueError
    except (TypeError, ValueError):
        bound = f"an integer >= {above:g}" if kind is int else f"a number of seconds > {above:g}"
        raise StorageValidationError(
            f"PostgreSQL option {name} must be {bound}, not {raw!r}"
        ) from None
    return value


def _index_name(table: str) -> str:
    """``{table}_class_updated``, shortened with a checksum where it would pass 63 characters
    (PostgreSQL would truncate it, and two long table names could then share one index name)."""
    name = f"{table}_class_updated"
    if len(name) <= 63:
        return name
    return f"{table[:48]}_{zlib.crc32(table.encode()):08x}_cu"
