"""``sqlite:///path.db``: the embedded default, on the standard library's `sqlite3`.

The table has the same columns as PostgreSQL's ``external_models``. Statements run inline on
the event loop's thread: a small SQLite read or write takes microseconds, less than handing it
to a worker thread would. Each event loop's backend has its own connection (the sync bridge's
too), and the database runs in WAL mode with a busy timeout, so connections of several loops
or processes can read while one writes.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit
from uuid import UUID

from pydantic_toast.backends.base import Record, RecordInfo, StorageBackend, check_class_name
from pydantic_toast.errors import StorageConnectionError, StorageValidationError

__all__ = ["SQLiteBackend"]

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
# SQLite limits the number of bound parameters per statement; stay well below it.
_IDS_PER_SELECT = 500


class SQLiteBackend(StorageBackend):
    """Options (URL query): ``table`` (default ``external_models``), ``timeout`` seconds
    to wait for another writer (default 5)."""

    coalesce_loads = False  # in-process: a batch would not wait on anything less

    def __init__(self, url: str, *, table: str | None = None, timeout: float | None = None) -> None:
        super().__init__(url)
        parts = urlsplit(url)
        options = dict(parse_qsl(parts.query, keep_blank_values=True))
        unknown = set(options) - {"table", "timeout"}
        if unknown:
            raise StorageValidationError(f"unknown sqlite option(s): {', '.join(sorted(unknown))}")
        if parts.netloc:
            raise StorageValidationError(
                "sqlite URLs have no host: use sqlite:///relative.db or sqlite:////absolute.db"
            )
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        if not path or path == ":memory:":
            raise StorageValidationError(
                "sqlite URLs need a file path (sqlite:///models.db); for memory use memory://"
            )
        self.path = Path(path)
        self.table = table or options.get("table", "external_models")
        if _IDENTIFIER.fullmatch(self.table) is None:
            raise StorageValidationError(f"invalid table name {self.table!r}")
        try:
            self.timeout = float(timeout if timeout is not None else options.get("timeout", 5))
        except ValueError:
            self.timeout = -1.0
        if not 0 < self.timeout < float("inf"):
            raise StorageValidationError(
                "sqlite option timeout must be a positive number of seconds"
            )
        self._connection: sqlite3.Connection | None = None
        quoted = f'"{self.table}"'
        self._upsert = (
            f"INSERT INTO {quoted} (id, class_name, data, schema_version, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET"
            " class_name = excluded.class_name, data = excluded.data,"
            " schema_version = excluded.schema_version, updated_at = excluded.updated_at"
        )
        self._select = (
            f"SELECT id, class_name, data, schema_version, created_at, updated_at FROM {quoted}"
            " WHERE id IN ({})"
        )

    async def connect(self) -> None:
        with self._errors("open"):
            if self.path.parent != Path():
                self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
            try:
                connection.execute("PRAGMA journal_mode=WAL")
                connection.execute("PRAGMA synchronous=NORMAL")
                connection.execute(
                    f'CREATE TABLE IF NOT EXISTS "{self.table}" ('
                    " id TEXT PRIMARY KEY, class_name TEXT NOT NULL, data TEXT NOT NULL,"
                    " schema_version INTEGER NOT NULL, created_at TEXT NOT NULL,"
                    " updated_at TEXT NOT NULL)"
                )
                connection.execute(
                    f'CREATE INDEX IF NOT EXISTS "{self.table}_class_updated"'
                    f' ON "{self.table}" (class_name, updated_at)'
                )
            except BaseException:
                connection.close()
                raise
        self._connection = connection

    async def disconnect(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()

    async def write_record(self, record: Record) -> None:
        await self.write_records((record,))

    async def read_record(self, class_name: str, id: UUID) -> Record | None:
        return (await self.read_records(class_name, (id,)))[0]

    async def write_records(self, records: Sequence[Record]) -> None:
        rows = [_row(record) for record in records]
        with self._errors("write"):
            connection = self._open()
            if len(rows) == 1:
                connection.execute(self._upsert, rows[0])
                return
            connection.execute("BEGIN IMMEDIATE")
            try:
                connection.executemany(self._upsert, rows)
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")

    async def read_records(self, class_name: str, ids: Sequence[UUID]) -> list[Record | None]:
        check_class_name(class_name)
        found: dict[str, Record] = {}
        with self._errors("read"):
            connection = self._open()
            keys = [str(id) for id in ids]
            for start in range(0, len(keys), _IDS_PER_SELECT):
                chunk = keys[start : start + _IDS_PER_SELECT]
                statement = self._select.format(", ".join("?" * len(chunk)))
                for row in connection.execute(statement, chunk):
                    found[row[0]] = _record(row)
        return [found.get(key) for key in keys]

    async def delete_records(self, class_name: str, ids: Sequence[UUID]) -> int:
        check_class_name(class_name)
        deleted = 0
        with self._errors("delete"):
            connection = self._open()
            keys = [str(id) for id in ids]
            for start in range(0, len(keys), _IDS_PER_SELECT):
                chunk = keys[start : start + _IDS_PER_SELECT]
                cursor = connection.execute(
                    f'DELETE FROM "{self.table}" WHERE class_name = ? AND id IN '
                    f"({', '.join('?' * len(chunk))})",
                    [class_name, *chunk],
                )
                deleted += cursor.rowcount
        return deleted

    async def scan_records(self, class_name: str | None = None) -> AsyncIterator[RecordInfo]:
        # Keyset pagination: no cursor stays open across a yield, so callers may delete.
        last = ""
        while True:
            with self._errors("list"):
                rows = (
                    self._open()
                    .execute(
                        "SELECT id, class_name, length(CAST(data AS BLOB)), updated_at"
                        f' FROM "{self.table}" WHERE id > ?'
                        " AND (? IS NULL OR class_name = ?) ORDER BY id LIMIT 500",
                        (last, class_name, class_name),
                    )
                    .fetchall()
                )
            for id, name, size, updated_at in rows:
                yield RecordInfo(name, UUID(id), size, datetime.fromisoformat(updated_at))
            if len(rows) < 500:
                return
            last = rows[-1][0]

    async def purge(self, class_name: str, before: datetime, *, batch_size: int = 500) -> int:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        check_class_name(class_name)
        # Timestamps are stored as UTC ISO text of fixed width, so text order is time order.
        cutoff = before.astimezone(UTC).isoformat(timespec="microseconds")
        deleted = 0
        while True:
            with self._errors("purge"):
                cursor = self._open().execute(
                    f'DELETE FROM "{self.table}" WHERE id IN (SELECT id FROM "{self.table}"'
                    " WHERE class_name = ? AND updated_at < ? LIMIT ?)",
                    (class_name, cutoff, batch_size),
                )
            deleted += cursor.rowcount
            if cursor.rowcount < batch_size:
                return deleted

    def _open(self) -> sqlite3.Connection:
        if self._connection is None:
            raise StorageConnectionError("the sqlite backend is closed", self.url)
        return self._connection

    @contextmanager
    def _errors(self, verb: str) -> Iterator[None]:
        try:
            yield
        except (sqlite3.Error, OSError) as exc:
            raise StorageConnectionError(
                f"sqlite could not {verb} {self.path}: {exc}", self.url
            ) from exc


def _row(record: Record) -> tuple[str, str, str, int, str, str]:
    check_class_name(record.class_name)
    return (
        str(record.id),
        record.class_name,
        record.data.decode(),
        record.schema_version,
        record.created_at.isoformat(timespec="microseconds"),
        record.updated_at.isoformat(timespec="microseconds"),
    )


def _record(row: tuple[Any, ...]) -> Record:
    id, class_name, data, version, created_at, updated_at = row
    return Record(
        id=UUID(id),
        class_name=class_name,
        data=data.encode(),
        schema_version=version,
        created_at=datetime.fromisoformat(created_at),
        updated_at=datetime.fromisoformat(updated_at),
    )
