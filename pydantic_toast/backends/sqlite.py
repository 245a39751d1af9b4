"""``sqlite:///path.db``: the embedded default, on the standard library's `sqlite3`.

The table has the same columns as PostgreSQL's ``external_models``. Statements run inline on
the event loop's thread: a small SQLite read or write takes microseconds, less than handing it
to a worker thread would. Each event loop's backend has its own connection (the sync bridge's
too), and the database runs in WAL mode with a busy timeout, so connections of several loops
or processes can read while one writes.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from uuid import UUID

from pydantic_toast._errors import StorageOperationError, StorageValidationError
from pydantic_toast.backends.base import Capabilities, StorageBackend
from pydantic_toast.backends.options import BackendOptions, Identifier, Seconds
from pydantic_toast.backends.records import Record, StoredInfo, timestamp_text

__all__ = ["SQLiteBackend"]


# SQLite limits the number of bound parameters per statement; stay well below it.
_IDS_PER_STATEMENT = 500


class SQLiteOptions(BackendOptions):
    label = "sqlite"

    #: The table (created on connect).
    table: Identifier = "external_models"
    #: Seconds to wait for another writer.
    timeout: Seconds = 5.0


class SQLiteBackend(StorageBackend):
    """Options (URL query or keywords): ``table`` (default ``external_models``), ``timeout``
    seconds to wait for another writer (default 5)."""

    options_model = SQLiteOptions
    options: SQLiteOptions
    capabilities = Capabilities(
        delete=True,
        conditional_delete=True,
        conditional_write=True,
        scan=True,
        purge=True,
        keeps_created_at=True,
        coalesce_loads=False,  # in-process: a batch would not wait on anything less
        batch_size=_IDS_PER_STATEMENT,
        concurrency=1,
    )

    def __init__(self, url: str, **options: object) -> None:
        super().__init__(url, **options)
        location = self.location
        if location.netloc:
            raise StorageValidationError(
                "sqlite URLs have no host: use sqlite:///relative.db or sqlite:////absolute.db"
            )
        path = location.path[1:] if location.path.startswith("/") else location.path
        if not path or path == ":memory:":
            raise StorageValidationError(
                "sqlite URLs need a file path (sqlite:///models.db); for memory use memory://"
            )
        self.path = Path(path)
        self.table = self.options.table
        self.timeout = self.options.timeout
        self._connection: sqlite3.Connection | None = None
        quoted = f'"{self.table}"'
        self._upsert = (
            f"INSERT INTO {quoted} (id, class_name, data, schema_version, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET"
            " class_name = excluded.class_name, data = excluded.data,"
            " schema_version = excluded.schema_version, updated_at = excluded.updated_at"
        )
        self._upsert_returning = self._upsert + " RETURNING created_at"
        self._replace = (
            f"UPDATE {quoted} SET data = ?, schema_version = ?, created_at = ?, updated_at = ?"
            " WHERE id = ? AND class_name = ? AND updated_at = ?"
        )
        self._created = f"SELECT id, created_at FROM {quoted} WHERE id IN ({{}})"
        # The row's first five columns are what `decode_stored` reads; the id comes last.
        self._select = (
            "SELECT class_name, data, schema_version, created_at, updated_at, id"
            f" FROM {quoted} WHERE id IN ({{}})"
        )

    @property
    def where(self) -> str:
        return f"sqlite database {self.path}"

    async def connect(self) -> None:
        if self.create_missing:
            if self.path.parent != Path():
                self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        else:  # tools working on what exists: never create the file or the table
            mode = "ro" if self.read_only else "rw"
            uri = f"{self.path.absolute().as_uri()}?mode={mode}"
            connection = sqlite3.connect(uri, timeout=self.timeout, isolation_level=None, uri=True)
        try:
            if self.create_missing:
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
            elif not connection.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (self.table,)
            ).fetchone():
                raise StorageOperationError(f"{self.where} has no table {self.table!r}", self.url)
        except BaseException:
            connection.close()
            raise
        self._connection = connection

    async def disconnect(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()

    def _open(self) -> sqlite3.Connection:
        if self._connection is None:
            raise self.closed()
        return self._connection

    async def put_many(self, records: Sequence[Record]) -> list[datetime]:
        """The upsert keeps a stored ``created_at``; only a first save (``created_at ==
        updated_at``) can meet a record it does not know of, so only then is it read back."""
        connection = self._open()
        rows = _rows(records)
        first_saves = [row[0] for row in rows if row[4] == row[5]]
        if len(rows) == 1:
            if not first_saves:
                connection.execute(self._upsert, rows[0])
                return [records[0].created_at]
            (stored,) = connection.execute(self._upsert_returning, rows[0]).fetchone()
            return [_created_at(stored, records[0])]
        found: dict[str, object] = {}
        connection.execute("BEGIN IMMEDIATE")
        try:
            if first_saves:
                placeholders = ", ".join("?" * len(first_saves))
                found = dict(connection.execute(self._created.format(placeholders), first_saves))
            connection.executemany(self._upsert, rows)
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")
        return [
            record.created_at if row[0] not in found else _created_at(found[row[0]], record)
            for row, record in zip(rows, records, strict=True)
        ]

    async def put_unchanged(
        self, records: Sequence[Record], expected: Sequence[datetime]
    ) -> list[bool]:
        """One transaction of one ``UPDATE ... WHERE updated_at = ?`` per record: SQLite runs
        one writer at a time, so each check is its write's own. Timestamps are compared as the
        fixed-width UTC text every write stores."""
        connection = self._open()
        rows = _rows(records)
        written = []
        connection.execute("BEGIN IMMEDIATE")
        try:
            for (key, name, data, version, created, updated), moment in zip(
                rows, expected, strict=True
            ):
                cursor = connection.execute(
                    self._replace,
                    (data, version, created, updated, key, name, _utc_text(moment)),
                )
                written.append(cursor.rowcount == 1)
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")
        return written

    async def get_many(
        self, class_name: str, ids: Sequence[UUID]
    ) -> list[tuple[object, ...] | None]:
        keys = [str(id) for id in ids]
        statement = self._select.format(", ".join("?" * len(keys)))
        found = {row[5]: row for row in self._open().execute(statement, keys)}
        return [found.get(key) for key in keys]

    async def delete_many(self, class_name: str, ids: Sequence[UUID]) -> int:
        keys = [str(id) for id in ids]
        cursor = self._open().execute(
            f'DELETE FROM "{self.table}" WHERE class_name = ? AND id IN '
            f"({', '.join('?' * len(keys))})",
            [class_name, *keys],
        )
        return cursor.rowcount

    async def delete_stale(self, class_name: str, ids: Sequence[UUID], before: datetime) -> int:
        # One statement, and SQLite runs one writer at a time: the check is the delete's own.
        keys = [str(id) for id in ids]
        cursor = self._open().execute(
            f'DELETE FROM "{self.table}" WHERE class_name = ? AND updated_at < ? AND id IN '
            f"({', '.join('?' * len(keys))})",
            [class_name, timestamp_text(before.astimezone(UTC)), *keys],
        )
        return cursor.rowcount

    async def scan(self, class_name: str | None) -> AsyncIterator[StoredInfo]:
        # Keyset pagination: no cursor stays open across a yield, so callers may delete.
        last = ""
        while True:
            rows = (
                self._open()
                .execute(
                    "SELECT id, class_name, length(CAST(data AS BLOB)), updated_at, schema_version"
                    f' FROM "{self.table}" WHERE id > ?'
                    " AND (? IS NULL OR class_name = ?) ORDER BY id LIMIT 500",
                    (last, class_name, class_name),
                )
                .fetchall()
            )
            for key, name, size, updated_at, version in rows:
                try:
                    id = UUID(key)
                except (TypeError, ValueError):
                    continue  # not a record of ours
                yield StoredInfo(id, name, size, updated_at, schema_version=version)
            if len(rows) < 500:
                return
            last = rows[-1][0]

    async def purge_before(self, class_name: str, before: datetime, batch_size: int) -> int:
        # Timestamps are stored as UTC ISO text of fixed width, so text order is time order.
        cutoff = timestamp_text(before.astimezone(UTC))
        deleted = 0
        while True:
            cursor = self._open().execute(
                f'DELETE FROM "{self.table}" WHERE id IN (SELECT id FROM "{self.table}"'
                " WHERE class_name = ? AND updated_at < ? LIMIT ?)",
                (class_name, cutoff, batch_size),
            )
            deleted += cursor.rowcount
            if cursor.rowcount < batch_size:
                return deleted

    def is_transient(self, exc: BaseException) -> bool:
        # Another writer holding the database past the busy timeout goes away by itself.
        if isinstance(exc, sqlite3.OperationalError):
            return "locked" in str(exc) or "busy" in str(exc)
        return super().is_transient(exc)


def _rows(records: Sequence[Record]) -> list[tuple[str, str, str, int, str, str]]:
    """The records as rows, timestamps as fixed-width UTC text (so that text order is time
    order); a batch shares one ``updated_at``, which is formatted once."""
    texts: dict[datetime, str] = {}

    def text(moment: datetime) -> str:
        formatted = texts.get(moment)
        if formatted is None:
            utc = moment if moment.tzinfo is UTC else moment.astimezone(UTC)
            formatted = texts[moment] = timestamp_text(utc)
        return formatted

    return [
        (
            str(record.id),
            record.class_name,
            record.data.decode(),
            record.schema_version,
            text(record.created_at),
            text(record.updated_at),
        )
        for record in records
    ]


def _utc_text(moment: datetime) -> str:
    return timestamp_text(moment if moment.tzinfo is UTC else moment.astimezone(UTC))


def _created_at(stored: object, record: Record) -> datetime:
    """The stored ``created_at`` the upsert kept; the record's own if it is missing or
    unreadable (the record then reads back as corrupt, which says more than a made-up time)."""
    try:
        moment = datetime.fromisoformat(stored) if isinstance(stored, str) else None
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        return record.created_at
    return moment
