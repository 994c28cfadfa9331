"""`SQLiteStore`: conversations and channel settings in one SQLite file, on one aiosqlite connection per process.

Concurrency. aiosqlite runs every statement on the connection's own thread, one at a time, in the order they
were queued. On top of that, every operation holds `SQLiteStore._lock` (an `asyncio.Lock`, FIFO) for its whole
duration, so a multi-statement transaction is never interleaved with another coroutine's statements, and the
writes of one coroutine land in the order it made them. Many coroutines may share one store. Other processes on the
same host may open the same file: every write transaction is `BEGIN IMMEDIATE`, which takes SQLite's one write lock
(waiting up to the busy timeout), so transactions of different processes never interleave either.

Durability. The database is in WAL mode with `synchronous=NORMAL` by default. Every write is committed before its
coroutine returns, so the commit is in the -wal file (in the OS page cache) and survives SIGKILL of the process;
the database stays consistent after power loss or an OS crash, but the last commits before it may be lost.
`synchronous="FULL"` also fsyncs the WAL on every commit, so returned writes survive power loss too, at the cost of
one fsync per write. See docs/storage.md.

Privacy. `secure_delete` is on: a deleted message's text is overwritten in the file, not just unlinked.

Every SQLite failure surfaces as `StoreError`, whose message names the database path.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager, suppress
from datetime import datetime
from pathlib import Path
from typing import Literal

import aiosqlite

from storage.base import Opening, Store, StoreError
from storage.models import CHANNEL_SETTINGS_FIELDS, MESSAGE_FIELDS, ChannelSettings, ReplyMode, Role, StoredMessage
from storage.schema import LATEST_VERSION, SQLITE_HEADER, SQLITE_MIGRATIONS, pending

Synchronous = Literal["FULL", "NORMAL"]

DEFAULT_BUSY_TIMEOUT_MS = 5_000

_MESSAGE_COLUMNS = ", ".join(MESSAGE_FIELDS)
_READ_SETTINGS = f"SELECT {', '.join(CHANNEL_SETTINGS_FIELDS)} FROM channels WHERE channel_id = ?"

_ROLES = {role.value: role for role in Role}

_ADD_CHANNEL = "INSERT OR IGNORE INTO channels (channel_id) VALUES (?)"
_INSERT_MESSAGE = (
    f"INSERT INTO messages ({', '.join(MESSAGE_FIELDS[1:])}) "
    f"VALUES ({', '.join('?' * (len(MESSAGE_FIELDS) - 1))}) RETURNING id"
)
# A Discord message shows one turn; mapping it again moves it to the newer turn.
_SHOW = (
    "INSERT INTO discord_messages (discord_message_id, turn_id) VALUES (?, ?) "
    "ON CONFLICT (discord_message_id) DO UPDATE SET turn_id = excluded.turn_id"
)
# Newest first, then reversed in Python. The index messages_by_channel (channel_id, id) turns this into a short
# backwards range scan whatever the size of the table; archived messages (id <= history_start_id) and those before
# the window start are skipped.
_LOAD_HISTORY = (
    f"SELECT {_MESSAGE_COLUMNS} FROM messages "
    "WHERE channel_id = ?1 "
    "AND id > coalesce((SELECT history_start_id FROM channels WHERE channel_id = ?1), 0) "
    "AND id >= coalesce((SELECT window_start_id FROM channels WHERE channel_id = ?1), 0) "
    "ORDER BY id DESC LIMIT ?2"
)
# Deletes the turns a `_PICK_...` prefix picks, and every reply to them; returns one row per deleted turn.
_DELETE_WITH_REPLIES = (
    "DELETE FROM messages WHERE id IN (SELECT id FROM picked UNION "
    "SELECT reply.id FROM messages AS reply JOIN picked ON reply.reply_to_id = picked.id) RETURNING id"
)
_PICK_SHOWN_BY = (
    "WITH picked (id) AS (SELECT turn_id FROM discord_messages "
    "WHERE discord_message_id IN (SELECT value FROM json_each(?1))) "
)
# ?2 NULL: every channel. The partial index messages_by_author (author_id, channel_id) WHERE role = 'user' finds them.
_PICK_AUTHORED = (
    "WITH picked (id) AS (SELECT id FROM messages "
    "WHERE role = 'user' AND author_id = ?1 AND (?2 IS NULL OR channel_id = ?2)) "
)


def _to_text(moment: datetime) -> str:
    """A UTC time as stored: fixed-width ISO 8601, so text order is time order."""
    return moment.isoformat(timespec="microseconds")


def _from_text(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


class SQLiteStore(Store):
    """The store on a SQLite file. Open it with `await SQLiteStore.open(path)` (or `async with`)."""

    def __init__(self, connection: aiosqlite.Connection, path: Path, synchronous: Synchronous) -> None:
        self._connection: aiosqlite.Connection | None = connection
        self._path = path
        self._synchronous = synchronous
        self._lock = asyncio.Lock()

    # --- opening and closing -------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        synchronous: Synchronous = "NORMAL",
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
    ) -> Opening[SQLiteStore]:
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
        return Opening(lambda: cls._open(Path(path), synchronous, busy_timeout_ms))

    @classmethod
    async def _open(cls, path: Path, synchronous: Synchronous, busy_timeout_ms: int) -> SQLiteStore:
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
            await connection.execute("PRAGMA secure_delete = ON")
        except sqlite3.Error as error:
            raise self._error("configure", error) from error

    async def _migrate(self) -> None:
        async with self._transaction("migrate") as connection:
            version = await self._scalar(connection, "PRAGMA user_version")
            if version > LATEST_VERSION:  # another process upgraded it after our check
                raise _newer_schema_error(self._path, version)
            if version == 0 and await self._scalar(connection, "SELECT count(*) FROM sqlite_master"):
                raise _foreign_database_error(self._path)
            for migration in pending(SQLITE_MIGRATIONS, version):
                for statement in migration.statements:
                    await connection.execute(statement)
            if version != LATEST_VERSION:
                await connection.execute(f"PRAGMA user_version = {LATEST_VERSION}")

    async def close(self) -> None:
        async with self._lock:
            connection, self._connection = self._connection, None
            if connection is None:
                return
            with suppress(sqlite3.Error):
                await connection.execute("PRAGMA optimize")
            await connection.close()

    @property
    def path(self) -> Path:
        return self._path

    @property
    def closed(self) -> bool:
        return self._connection is None

    # --- conversations ----------------------------------------------------------------------------------

    async def _append(self, message: StoredMessage, shown_by: tuple[int, ...]) -> int:
        async with self._transaction("append a message to") as connection:
            await connection.execute(_ADD_CHANNEL, (message.channel_id,))
            rows = await connection.execute_fetchall(
                _INSERT_MESSAGE,
                (
                    message.channel_id,
                    message.role.value,
                    message.content,
                    message.author_id,
                    message.author_name,
                    message.message_id,
                    _to_text(message.created_at),
                    message.reply_to_id,
                ),
            )
            stored_id = int(next(iter(rows))[0])
            await self._show(connection, stored_id, shown_by)
        return stored_id

    async def _load_history(self, channel_id: int, limit: int) -> list[StoredMessage]:
        rows = await self._read("load history from", _LOAD_HISTORY, (channel_id, limit))
        # Positional, in MESSAGE_FIELDS order: this loop is on every prompt's path.
        roles, parse_time = _ROLES, datetime.fromisoformat
        return [
            StoredMessage(row[0], row[1], roles[row[2]], row[3], row[4], row[5], row[6], parse_time(row[7]), row[8])
            for row in reversed(rows)
        ]

    async def _reset(self, channel_id: int, reset_by: int | None, reset_at: datetime) -> int:
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
                (newest, _to_text(reset_at), reset_by, channel_id),
            )
            return int(cleared)

    async def _set_window_start(self, channel_id: int, message_id: int) -> None:
        async with self._transaction("set the window start in") as connection:
            await connection.execute(
                "INSERT INTO channels (channel_id, window_start_id) VALUES (?, ?) "
                "ON CONFLICT (channel_id) DO UPDATE SET window_start_id = excluded.window_start_id",
                (channel_id, message_id),
            )

    async def _get_window_start(self, channel_id: int) -> int:
        rows = await self._read(
            "read the window start from", "SELECT window_start_id FROM channels WHERE channel_id = ?", (channel_id,)
        )
        return int(rows[0][0]) if rows else 0

    # --- deletions and edits ----------------------------------------------------------------------------------

    async def _delete_shown_by(self, message_ids: tuple[int, ...]) -> int:
        return await self._delete(_PICK_SHOWN_BY + _DELETE_WITH_REPLIES, (json.dumps(message_ids),))

    async def _forget_author(self, author_id: int, channel_id: int | None) -> int:
        return await self._delete(_PICK_AUTHORED + _DELETE_WITH_REPLIES, (author_id, channel_id))

    async def _purge_older_than(self, cutoff: datetime) -> int:
        return await self._delete("DELETE FROM messages WHERE created_at < ? RETURNING id", (_to_text(cutoff),))

    async def _delete(self, sql: str, parameters: tuple[object, ...]) -> int:
        async with self._transaction("delete messages from") as connection:
            return len(list(await connection.execute_fetchall(sql, parameters)))

    async def _edit_user_turn(self, message_id: int, edit: Callable[[str], str]) -> bool:
        async with self._transaction("edit a message in") as connection:
            rows = list(
                await connection.execute_fetchall(
                    "SELECT id, content FROM messages WHERE role = 'user' "
                    "AND id = (SELECT turn_id FROM discord_messages WHERE discord_message_id = ?)",
                    (message_id,),
                )
            )
            if not rows:
                return False
            [(turn_id, content)] = rows
            await connection.execute("UPDATE messages SET content = ? WHERE id = ?", (edit(content), turn_id))
            return True

    async def _update_reply(
        self, stored_id: int, content: str, message_id: int | None, shown_by: tuple[int, ...]
    ) -> None:
        async with self._transaction("update a reply in") as connection:
            rows = await connection.execute_fetchall(
                "UPDATE messages SET content = ?, message_id = ? WHERE id = ? AND role = 'assistant' RETURNING id",
                (content, message_id, stored_id),
            )
            if not list(rows):
                return
            await connection.execute("DELETE FROM discord_messages WHERE turn_id = ?", (stored_id,))
            await self._show(connection, stored_id, shown_by)

    async def _discord_message_ids(self, stored_id: int) -> list[int]:
        sql = "SELECT discord_message_id FROM discord_messages WHERE turn_id = ? ORDER BY discord_message_id"
        return [row[0] for row in await self._read("read a turn's messages from", sql, (stored_id,))]

    @staticmethod
    async def _show(connection: aiosqlite.Connection, stored_id: int, shown_by: Iterable[int]) -> None:
        await connection.executemany(_SHOW, [(discord_id, stored_id) for discord_id in shown_by])

    # --- channel settings ----------------------------------------------------------------------------------

    async def _get_channel_settings(self, channel_id: int) -> ChannelSettings:
        rows = await self._read("read channel settings from", _READ_SETTINGS, (channel_id,))
        return _settings(rows[0]) if rows else ChannelSettings(channel_id=channel_id)

    async def _update_channel_settings(
        self, channel_id: int, values: dict[str, object], changed_by: int | None, updated_at: datetime
    ) -> ChannelSettings:
        # Column names come from SETTING_FIELDS only (checked by the caller); every value is a bound parameter.
        assignments = ", ".join(f"{name} = ?" for name in values)
        parameters = [value.value if isinstance(value, ReplyMode) else value for value in values.values()]
        async with self._transaction("update channel settings in") as connection:
            await connection.execute(_ADD_CHANNEL, (channel_id,))
            await connection.execute(
                f"UPDATE channels SET {assignments}, updated_by = ?, updated_at = ? WHERE channel_id = ?",
                (*parameters, changed_by, _to_text(updated_at), channel_id),
            )
            # Read back, not RETURNING: RETURNING gives a REAL column's 0.0 back as the integer 0.
            rows = await connection.execute_fetchall(_READ_SETTINGS, (channel_id,))
            return _settings(next(iter(rows)))

    # --- internals ---------------------------------------------------------------------------------------

    def _conn(self) -> aiosqlite.Connection:
        if self._connection is None:
            raise StoreError(f"The store for {self._path} is closed")
        return self._connection

    def _error(self, action: str, error: sqlite3.Error) -> StoreError:
        return StoreError(f"Cannot {action} the database {self._path}: {error}")

    async def _read(self, action: str, sql: str, parameters: tuple[object, ...]) -> list[sqlite3.Row]:
        async with self._lock:
            connection = self._conn()
            try:
                return list(await connection.execute_fetchall(sql, parameters))
            except sqlite3.Error as error:
                raise self._error(action, error) from error

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


def _settings(row: sqlite3.Row) -> ChannelSettings:
    return ChannelSettings.from_row((*row[:-1], _from_text(row[-1])))


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
