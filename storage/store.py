"""`Store`: conversations and channel settings in SQLite, on one aiosqlite connection per process.

Concurrency. aiosqlite runs every statement on the connection's own thread, one at a time, in the order they
were queued. On top of that, every operation holds `Store._lock` (an `asyncio.Lock`, FIFO) for its whole
duration, so a multi-statement transaction is never interleaved with another coroutine's statements, and the
writes of one coroutine land in the order it made them. Many coroutines may share one `Store`.

Durability. The database is in WAL mode with `synchronous=NORMAL` by default. Every write is committed in
autocommit mode or an explicit transaction before its coroutine returns, so the commit is in the -wal file (in
the OS page cache) and survives SIGKILL of the process; the database stays consistent after power loss or an OS
crash, but the last commits before it may be lost. `synchronous="FULL"` also fsyncs the WAL on every commit, so
returned writes survive power loss too, at the cost of one fsync per write (about 4 ms on the benchmark machine,
against a 2 ms target for an append). See docs/storage.md.

Reset archives: `reset()` moves the channel's history start past its newest message. Older messages stay in the
database for moderation and audit, but `load_history` never returns them.

Every SQLite failure surfaces as `StoreError`, whose message names the database path.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import AsyncIterator, Generator
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import aiosqlite

from storage.models import (
    SETTING_FIELDS,
    ChannelSettings,
    ReplyMode,
    Role,
    StoredMessage,
    check_setting,
    check_snowflake,
)
from storage.schema import LATEST_VERSION, SQLITE_HEADER, pending

Synchronous = Literal["FULL", "NORMAL"]

DEFAULT_BUSY_TIMEOUT_MS = 5_000

_MESSAGE_COLUMNS = "id, channel_id, role, content, author_id, author_name, message_id, created_at"
_SETTINGS_COLUMNS = "channel_id, " + ", ".join(SETTING_FIELDS) + ", updated_by, updated_at"

_ROLES = {role.value: role for role in Role}

_INSERT_MESSAGE = (
    "INSERT INTO messages (channel_id, role, content, author_id, author_name, message_id, created_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id"
)
# Newest first, then reversed in Python. The index messages_by_channel (channel_id, id) turns this into a short
# backwards range scan whatever the size of the table; archived messages (id <= history_start_id) are skipped.
_LOAD_HISTORY = (
    f"SELECT {_MESSAGE_COLUMNS} FROM messages "
    "WHERE channel_id = ?1 "
    "AND id > coalesce((SELECT history_start_id FROM channels WHERE channel_id = ?1), 0) "
    "ORDER BY id DESC LIMIT ?2"
)


class StoreError(Exception):
    """The database cannot be opened or used. `str()` names the path and, where it can, what to do."""


def _now() -> datetime:
    return datetime.now(UTC)


def _to_text(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds")


def _from_text(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


class _Opening:
    """What `Store.open` returns: await it for a `Store`, or use it with `async with` to close it at the end."""

    def __init__(self, path: str | os.PathLike[str], synchronous: Synchronous, busy_timeout_ms: int) -> None:
        self._args = (path, synchronous, busy_timeout_ms)
        self._store: Store | None = None

    def __await__(self) -> Generator[Any, None, Store]:
        return Store._open(*self._args).__await__()

    async def __aenter__(self) -> Store:
        self._store = await Store._open(*self._args)
        return self._store

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._store is not None:
            await self._store.close()


class Store:
    """The async store. Create it with `await Store.open(path)` (or `async with Store.open(path) as store`)."""

    def __init__(self, connection: aiosqlite.Connection, path: Path, synchronous: Synchronous) -> None:
        self._connection: aiosqlite.Connection | None = connection
        self._path = path
        self._synchronous = synchronous
        self._lock = asyncio.Lock()
        # Channels known to have a `channels` row, so that an append is a single INSERT (one commit).
        self._known_channels: set[int] = set()

    # --- opening and closing -------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        synchronous: Synchronous = "NORMAL",
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
    ) -> _Opening:
        """Open (creating if needed) and migrate the database at `path`.

        Raises `StoreError`, leaving the file byte-for-byte untouched, when the file is not a SQLite database,
        belongs to something else, or has a newer schema than this code knows; and when the directory is
        missing or read-only, or the file is read-only.

        `synchronous`: "NORMAL" (default) makes every returned write survive SIGKILL; "FULL" also makes it survive
        power loss, with one fsync per write. `busy_timeout_ms`: how long to wait for another process's lock.
        """
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError(f"synchronous must be 'FULL' or 'NORMAL', got {synchronous!r}")
        if isinstance(busy_timeout_ms, bool) or not isinstance(busy_timeout_ms, int) or busy_timeout_ms < 0:
            raise ValueError(f"busy_timeout_ms must be a non-negative int, got {busy_timeout_ms!r}")
        return _Opening(path, synchronous, busy_timeout_ms)

    @classmethod
    async def _open(cls, path: str | os.PathLike[str], synchronous: Synchronous, busy_timeout_ms: int) -> Store:
        path = Path(path)
        await asyncio.to_thread(_check_before_opening, path)
        try:
            connection = await aiosqlite.connect(path, isolation_level=None)
        except sqlite3.Error as error:
            raise StoreError(f"Cannot open the database {path}: {error}") from error
        store = cls(connection, path, synchronous)
        try:
            await store._configure(busy_timeout_ms)
            await store._migrate()
        except BaseException:
            await connection.close()
            raise
        return store

    async def _configure(self, busy_timeout_ms: int) -> None:
        connection = self._conn()
        try:
            # busy_timeout first: switching to WAL needs a lock another process may briefly hold.
            await connection.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
            rows = await connection.execute_fetchall("PRAGMA journal_mode = WAL")
            mode = str(next(iter(rows))[0]).lower()
            if mode != "wal":
                raise StoreError(
                    f"Cannot use the database {self._path} in WAL mode (SQLite kept journal_mode={mode}); "
                    "put DATABASE_PATH on a local filesystem"
                )
            await connection.execute(f"PRAGMA synchronous = {self._synchronous}")
            await connection.execute("PRAGMA foreign_keys = ON")
        except sqlite3.Error as error:
            raise self._error("configure", error) from error

    async def _migrate(self) -> None:
        async with self._transaction("migrate") as connection:
            version = await self._scalar(connection, "PRAGMA user_version")
            if version > LATEST_VERSION:  # another process upgraded it after our check
                raise _newer_schema_error(self._path, version)
            if version == 0 and await self._scalar(connection, "SELECT count(*) FROM sqlite_master"):
                raise _foreign_database_error(self._path)
            for migration in pending(version):
                for statement in migration.statements:
                    await connection.execute(statement)
            if version != LATEST_VERSION:
                await connection.execute(f"PRAGMA user_version = {LATEST_VERSION}")

    async def close(self) -> None:
        """Close the connection after the operations already waiting. Safe to call twice."""
        async with self._lock:
            connection, self._connection = self._connection, None
            if connection is None:
                return
            with suppress(sqlite3.Error):
                await connection.execute("PRAGMA optimize")
            await connection.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def path(self) -> Path:
        return self._path

    @property
    def closed(self) -> bool:
        return self._connection is None

    # --- conversations ----------------------------------------------------------------------------------

    async def append_message(
        self,
        channel_id: int,
        role: Role | str,
        content: str,
        *,
        author_id: int | None = None,
        author_name: str | None = None,
        message_id: int | None = None,
    ) -> StoredMessage:
        """Append one message to a channel's conversation. When this returns, the message is durable."""
        check_snowflake("channel_id", channel_id)
        check_snowflake("author_id", author_id, optional=True)
        check_snowflake("message_id", message_id, optional=True)
        try:
            role = Role(role)
        except ValueError:
            raise ValueError(f"role must be one of {', '.join(Role)}, got {role!r}") from None
        if not isinstance(content, str):
            raise TypeError(f"content must be a str, not {type(content).__name__}")
        if author_name is not None and not isinstance(author_name, str):
            raise TypeError(f"author_name must be a str or None, not {type(author_name).__name__}")
        created_at = _now()
        parameters = (channel_id, role.value, content, author_id, author_name, message_id, _to_text(created_at))
        async with self._lock:
            connection = self._conn()
            try:
                rows = await self._insert_message(connection, channel_id, parameters)
            except sqlite3.Error as error:
                raise self._error("append a message to", error) from error
        return StoredMessage(
            id=rows[0][0],
            channel_id=channel_id,
            role=role,
            content=content,
            author_id=author_id,
            author_name=author_name,
            message_id=message_id,
            created_at=created_at,
        )

    async def _insert_message(
        self, connection: aiosqlite.Connection, channel_id: int, parameters: tuple[object, ...]
    ) -> list[sqlite3.Row]:
        # Caller holds the lock. Autocommit: the INSERT is its own transaction, committed when it returns.
        if channel_id not in self._known_channels:
            await connection.execute("INSERT OR IGNORE INTO channels (channel_id) VALUES (?)", (channel_id,))
            self._known_channels.add(channel_id)
        try:
            return list(await connection.execute_fetchall(_INSERT_MESSAGE, parameters))
        except sqlite3.IntegrityError:
            # The channel row went away behind our back (another process); recreate it and retry once.
            self._known_channels.discard(channel_id)
            await connection.execute("INSERT OR IGNORE INTO channels (channel_id) VALUES (?)", (channel_id,))
            self._known_channels.add(channel_id)
            return list(await connection.execute_fetchall(_INSERT_MESSAGE, parameters))

    async def load_history(self, channel_id: int, limit: int) -> list[StoredMessage]:
        """The newest `limit` messages of the channel since its last reset, oldest first. Unknown channel: []."""
        check_snowflake("channel_id", channel_id)
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise TypeError(f"limit must be an int, not {type(limit).__name__}")
        if limit < 0:
            raise ValueError(f"limit must be 0 or more, got {limit}")
        if limit == 0:
            return []
        async with self._lock:
            connection = self._conn()
            try:
                rows = await connection.execute_fetchall(_LOAD_HISTORY, (channel_id, limit))
            except sqlite3.Error as error:
                raise self._error("load history from", error) from error
        # Positional, in _MESSAGE_COLUMNS order (StoredMessage's field order): this loop is on every prompt's path.
        roles, parse_time = _ROLES, datetime.fromisoformat
        return [
            StoredMessage(row[0], row[1], roles[row[2]], row[3], row[4], row[5], row[6], parse_time(row[7]))
            for row in reversed(rows)
        ]

    async def reset(self, channel_id: int, *, reset_by: int | None = None) -> int:
        """Archive the channel's conversation so the next prompt starts fresh; return how many messages that hid.

        The messages stay in the database (for moderation and audit) but are never loaded again.
        """
        check_snowflake("channel_id", channel_id)
        check_snowflake("reset_by", reset_by, optional=True)
        async with self._transaction("reset a channel in") as connection:
            rows = await connection.execute_fetchall(
                "SELECT count(m.id), max(m.id) FROM channels AS c JOIN messages AS m "
                "ON m.channel_id = c.channel_id AND m.id > c.history_start_id WHERE c.channel_id = ?",
                (channel_id,),
            )
            cleared, newest = next(iter(rows))
            if not cleared:
                return 0
            await connection.execute(
                "UPDATE channels SET history_start_id = ?, reset_at = ?, reset_by = ? WHERE channel_id = ?",
                (newest, _to_text(_now()), reset_by, channel_id),
            )
            return int(cleared)

    # --- channel settings ----------------------------------------------------------------------------------

    async def get_channel_settings(self, channel_id: int) -> ChannelSettings:
        """The channel's overrides; all `None` (the global defaults) for a channel never configured."""
        check_snowflake("channel_id", channel_id)
        async with self._lock:
            connection = self._conn()
            try:
                return await self._read_settings(connection, channel_id)
            except sqlite3.Error as error:
                raise self._error("read channel settings from", error) from error

    async def update_channel_settings(
        self, channel_id: int, *, changed_by: int | None, **changes: object
    ) -> ChannelSettings:
        """Change some of the channel's overrides and return them all.

        Fields not passed stay as they are; a field passed as `None` goes back to the global default. Unknown
        field names and out-of-range values raise `ValueError` (wrong types `TypeError`) before anything is
        written. `changed_by` (a Discord user id, or None for the terminal) and the time are recorded. With no
        changes, nothing is written and the current settings are returned.
        """
        check_snowflake("channel_id", channel_id)
        check_snowflake("changed_by", changed_by, optional=True)
        unknown = sorted(set(changes) - set(SETTING_FIELDS))
        if unknown:
            raise ValueError(
                f"unknown channel setting(s) {', '.join(unknown)}; known settings: {', '.join(SETTING_FIELDS)}"
            )
        values = {name: check_setting(name, value) for name, value in changes.items()}
        if not values:
            return await self.get_channel_settings(channel_id)
        # Column names come from SETTING_FIELDS only (checked above); every value is a bound parameter.
        assignments = ", ".join(f"{name} = ?" for name in values)
        parameters = [value.value if isinstance(value, ReplyMode) else value for value in values.values()]
        async with self._transaction("update channel settings in") as connection:
            await connection.execute("INSERT OR IGNORE INTO channels (channel_id) VALUES (?)", (channel_id,))
            await connection.execute(
                f"UPDATE channels SET {assignments}, updated_by = ?, updated_at = ? WHERE channel_id = ?",
                (*parameters, changed_by, _to_text(_now()), channel_id),
            )
            settings = await self._read_settings(connection, channel_id)
        self._known_channels.add(channel_id)
        return settings

    async def _read_settings(self, connection: aiosqlite.Connection, channel_id: int) -> ChannelSettings:
        rows = list(
            await connection.execute_fetchall(
                f"SELECT {_SETTINGS_COLUMNS} FROM channels WHERE channel_id = ?", (channel_id,)
            )
        )
        if not rows:
            return ChannelSettings(channel_id=channel_id)
        _, system_prompt, temperature, top_p, max_new_tokens, reply_mode, updated_by, updated_at = rows[0]
        return ChannelSettings(
            channel_id=channel_id,
            system_prompt=system_prompt,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            reply_mode=None if reply_mode is None else ReplyMode(reply_mode),
            updated_by=updated_by,
            updated_at=_from_text(updated_at),
        )

    # --- internals ---------------------------------------------------------------------------------------

    def _conn(self) -> aiosqlite.Connection:
        if self._connection is None:
            raise StoreError(f"The store for {self._path} is closed")
        return self._connection

    def _error(self, action: str, error: sqlite3.Error) -> StoreError:
        return StoreError(f"Cannot {action} the database {self._path}: {error}")

    @asynccontextmanager
    async def _transaction(self, action: str) -> AsyncIterator[aiosqlite.Connection]:
        """Hold the lock and run the body in one `BEGIN IMMEDIATE` transaction; roll back on any exception.

        Statements queued on aiosqlite's thread run in order even if this task is cancelled while awaiting
        them, so the ROLLBACK queued here always comes after them and before anything another coroutine queues.
        """
        async with self._lock:
            connection = self._conn()
            try:
                await connection.execute("BEGIN IMMEDIATE")
                yield connection
                await connection.execute("COMMIT")
            except BaseException as error:
                with suppress(sqlite3.Error):  # "no transaction is active" if BEGIN or COMMIT failed
                    await connection.execute("ROLLBACK")
                if isinstance(error, sqlite3.Error):
                    raise self._error(action, error) from error
                raise

    @staticmethod
    async def _scalar(connection: aiosqlite.Connection, sql: str) -> int:
        rows = await connection.execute_fetchall(sql)
        return int(next(iter(rows))[0])


# --- checks before SQLite touches the file ------------------------------------------------------------------


def _newer_schema_error(path: Path, version: int) -> StoreError:
    return StoreError(
        f"The database {path} has schema version {version}, newer than this llamacord knows "
        f"(up to {LATEST_VERSION}); it was written by a newer llamacord. Upgrade llamacord or set DATABASE_PATH "
        "to another file. The file was left untouched."
    )


def _foreign_database_error(path: Path) -> StoreError:
    return StoreError(
        f"The database {path} is a SQLite database that llamacord did not create (it has tables but no llamacord "
        "schema version). Set DATABASE_PATH to another file. The file was left untouched."
    )


def _check_before_opening(path: Path) -> None:
    """Raise StoreError for anything we can tell before opening read-write. Reads, never writes."""
    directory = path.parent
    if not directory.exists():
        raise StoreError(
            f"Cannot open the database {path}: the directory {directory} does not exist. "
            "Create it, or set DATABASE_PATH to a file in an existing directory."
        )
    if not directory.is_dir():
        raise StoreError(f"Cannot open the database {path}: {directory} is not a directory.")
    if path.is_dir():
        raise StoreError(f"Cannot open the database {path}: it is a directory, not a file.")
    try:
        with path.open("rb") as file:
            header = file.read(len(SQLITE_HEADER))
    except FileNotFoundError:
        header = None
    except OSError as error:
        raise StoreError(f"Cannot read the database {path}: {error.strerror or error}.") from error
    # An empty file is what `touch` makes: SQLite treats it as a new, empty database.
    if header and header != SQLITE_HEADER:
        raise StoreError(
            f"The file {path} is not a SQLite database (it does not start with the SQLite header). "
            "Set DATABASE_PATH to another file, or move this one away. The file was left untouched."
        )
    if header is not None and not os.access(path, os.R_OK | os.W_OK):
        raise StoreError(f"Cannot open the database {path}: the file is read-only. Make it writable.")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise StoreError(
            f"Cannot open the database {path}: the directory {directory} is read-only, and SQLite must be able to "
            f"create {path.name}-wal and {path.name}-shm beside the database. Make it writable or choose another "
            "DATABASE_PATH."
        )
    if header or (header is not None and path.with_name(path.name + "-wal").exists()):
        _check_existing_database(path)


def _check_existing_database(path: Path) -> None:
    """Read the schema version through a read-only connection, which never writes to or checkpoints the file.

    Without a -wal file beside it (the database was closed cleanly) the file alone is the whole database, so it is
    opened `immutable`, which also keeps SQLite from creating -wal and -shm files next to a file we then refuse.
    """
    wal = path.with_name(path.name + "-wal")
    uri = path.absolute().as_uri() + ("?mode=ro" if wal.exists() else "?mode=ro&immutable=1")
    try:
        connection = sqlite3.connect(uri, uri=True)
    except sqlite3.Error as error:
        raise StoreError(f"Cannot open the database {path}: {error}.") from error
    try:
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        objects = connection.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    except sqlite3.DatabaseError as error:
        raise StoreError(
            f"The file {path} is not a usable SQLite database ({error}). Set DATABASE_PATH to another file, or "
            "restore it from a backup. The file was left untouched."
        ) from error
    finally:
        connection.close()
    if version > LATEST_VERSION:
        raise _newer_schema_error(path, version)
    if version == 0 and objects:
        raise _foreign_database_error(path)
