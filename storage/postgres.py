"""`PostgresStore`: conversations and channel settings in PostgreSQL, on an asyncpg connection pool.

Several shard processes, on any hosts, share one database. Nothing here relies on an in-process lock:

- Every operation is one statement, or one transaction, on one connection of the pool.
- `messages.id` comes from one identity sequence, so ids grow across all processes, and a channel's order is id
  order (a channel belongs to one shard, whose process writes its turns one after the other).
- An append locks its channel's row (`FOR KEY SHARE`) before it draws its id, and a reset locks the row
  `FOR UPDATE` before it reads the channel's newest id. So a reset waits for the appends already holding the row
  and counts them, and an append that comes later gets an id above the reset point: no message is hidden without
  being counted, and none drawn before a reset commits after it. (Without the lock, an id drawn before the reset
  could commit after it, below the reset point.)
- A deletion locks the turns it picked before it deletes them and their replies, in a second statement that sees
  every reply committed meanwhile; a reply stored later to a deleted turn fails (its `reply_to_id` is gone).

Connections. asyncpg's pool opens connections as needed, up to `POOL_MAX_SIZE`, and replaces one that broke
(server restart, network, `pg_terminate_backend`) on its next use. The operation that was running on it fails
with `StoreError` (the reply in flight fails; nothing is retried), and the next one reconnects.

Text (content, author names, system prompts) is stored as UTF-8 in BYTEA columns: PostgreSQL's TEXT cannot hold a
NUL character, and the store keeps every str exactly. Messages name the database as `DATABASE_URL=` with the
password shown as `***`, never the password itself.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from datetime import datetime
from os import PathLike
from typing import TypeVar
from urllib.parse import unquote

import asyncpg

from storage.base import Opening, Store, StoreError
from storage.models import CHANNEL_SETTINGS_FIELDS, MESSAGE_FIELDS, ChannelSettings, ReplyMode, Role, StoredMessage
from storage.schema import LATEST_VERSION, POSTGRES_MIGRATIONS, pending

POOL_MIN_SIZE = 1
POOL_MAX_SIZE = 10  # per process: N processes need N × 10 of the server's max_connections (default 100)
CONNECT_TIMEOUT_S = 10.0
COMMAND_TIMEOUT_S = 30.0  # a statement that takes longer fails (StoreError) instead of holding a reply forever
CLOSE_TIMEOUT_S = 10.0
APPLICATION_NAME = "llamacord"  # pg_stat_activity shows which connections are ours
MIGRATION_LOCK = 0x6C6C_616D_6163_6F72  # "llamacor": the advisory lock that makes starting processes migrate once
VERSION_TABLE = "llamacord_schema_version"
OWN_TABLES = ("channels", "messages", "discord_messages")

_SCHEMES = ("postgresql://", "postgres://")
# What asyncpg and the network raise; anything else is a bug and propagates as it is.
# The server ended the connection (shut down, restarted, or terminated the backend). An idle connection that read
# the server's goodbye fails its next use with an InternalClientError (the protocol is left mid-error), before any
# statement is sent.
_CONNECTION_LOST = (
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.AdminShutdownError,
    asyncpg.InternalClientError,
    ConnectionError,
)
_DRIVER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError, *_CONNECTION_LOST)
T = TypeVar("T")
_PASSWORD_PARAMETER = re.compile(r"([?&]password=)([^&]*)", re.IGNORECASE)

_ROLES = {role.value: role for role in Role}
_MESSAGE_COLUMNS = ", ".join(MESSAGE_FIELDS)
_SETTINGS_COLUMNS = ", ".join(CHANNEL_SETTINGS_FIELDS)

_ADD_CHANNEL = "INSERT INTO channels (channel_id) VALUES ($1) ON CONFLICT DO NOTHING"
# One round trip: lock the channel's row, draw the id, insert the turn and map its Discord messages (a Discord
# message shows one turn: mapping it again moves it to the newer turn). No row back: the channel has no row yet.
_APPEND = f"""
WITH channel AS (
    SELECT channel_id FROM channels WHERE channel_id = $1 FOR KEY SHARE
), turn AS (
    INSERT INTO messages ({", ".join(MESSAGE_FIELDS[1:])})
    SELECT channel_id, $2::text, $3::bytea, $4::bigint, $5::bytea, $6::bigint, $7::timestamptz, $8::bigint
    FROM channel
    RETURNING id
), shown AS (
    INSERT INTO discord_messages (discord_message_id, turn_id)
    SELECT discord_id, turn.id FROM turn, unnest($9::bigint[]) AS discord_id
    ON CONFLICT (discord_message_id) DO UPDATE SET turn_id = excluded.turn_id
)
SELECT id FROM turn
"""
_SHOW = """
INSERT INTO discord_messages (discord_message_id, turn_id) SELECT discord_id, $1 FROM unnest($2::bigint[]) AS discord_id
ON CONFLICT (discord_message_id) DO UPDATE SET turn_id = excluded.turn_id
"""
# Newest first, then reversed in Python: a short backwards scan of messages_by_channel (channel_id, id).
_LOAD_HISTORY = f"""
SELECT {_MESSAGE_COLUMNS} FROM messages
WHERE channel_id = $1
AND id > coalesce((SELECT history_start_id FROM channels WHERE channel_id = $1), 0)
AND id >= coalesce((SELECT window_start_id FROM channels WHERE channel_id = $1), 0)
ORDER BY id DESC LIMIT $2
"""
# A deletion is a `picked (id)` CTE (the turns asked for) followed by one of these.
_LOCK_PICKED = "SELECT 1 FROM messages JOIN picked USING (id) FOR UPDATE OF messages"
_DELETE_WITH_REPLIES = """, gone AS (
    DELETE FROM messages WHERE id IN (
        SELECT id FROM picked UNION SELECT reply.id FROM messages AS reply JOIN picked ON reply.reply_to_id = picked.id
    ) RETURNING 1
) SELECT count(*) FROM gone"""
_PICK_SHOWN_BY = (
    "WITH picked (id) AS (SELECT turn_id FROM discord_messages WHERE discord_message_id = ANY($1::bigint[])) "
)
_PICK_AUTHORED = (
    "WITH picked (id) AS (SELECT id FROM messages "
    "WHERE role = 'user' AND author_id = $1 AND ($2::bigint IS NULL OR channel_id = $2)) "
)


def is_postgres_url(location: str | PathLike[str]) -> bool:
    """Whether `location` is a PostgreSQL URL (DATABASE_URL) rather than a SQLite path."""
    return isinstance(location, str) and location[:13].lower().startswith(_SCHEMES)


def hide_passwords(url: str) -> tuple[str, frozenset[str]]:
    """`url` with its passwords (`user:PASSWORD@`, `?password=`) shown as `***`, and the passwords themselves (as
    written and percent-decoded), so that no message or log line shows them."""
    found: set[str] = set()
    scheme, separator, rest = url.partition("://")
    authority, slash, tail = rest.partition("/")
    userinfo, at, hosts = authority.rpartition("@")
    if at and ":" in userinfo:
        user, _, password = userinfo.partition(":")
        found.add(password)
        authority = f"{user}:***@{hosts}"

    def hide(match: re.Match[str]) -> str:
        found.add(match[2])
        return match[1] + "***"

    shown = _PASSWORD_PARAMETER.sub(hide, f"{scheme}{separator}{authority}{slash}{tail}")
    return shown, frozenset(word for password in found for word in (password, unquote(password)) if word)


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


def _bytes(value: str | None) -> bytes | None:
    return None if value is None else value.encode()


class PostgresStore(Store):
    """The store on a PostgreSQL database. Open it with `await PostgresStore.open(url)` (or `async with`)."""

    def __init__(self, pool: asyncpg.Pool, name: str, secrets: frozenset[str]) -> None:
        self._pool: asyncpg.Pool | None = pool
        self._name = name
        self._secrets = secrets

    # --- opening and closing -------------------------------------------------------------------------------

    @classmethod
    def open(cls, url: str) -> Opening[PostgresStore]:
        """Connect to the database at `url` (postgresql://user:password@host:port/database) and migrate it.

        Raises `StoreError`, naming DATABASE_URL without its password, when the server cannot be reached or
        refuses the login, when the database holds tables of the same names that llamacord did not create, and
        when its schema is newer than this code knows (then nothing is changed).
        """
        if not is_postgres_url(url):
            raise ValueError("url must be a postgresql:// URL")
        return Opening(lambda: cls._open(url))

    @classmethod
    async def _open(cls, url: str) -> PostgresStore:
        shown, secrets = hide_passwords(url)
        name = f"the PostgreSQL database at DATABASE_URL={shown}"
        try:
            pool = await asyncpg.create_pool(
                url,
                min_size=POOL_MIN_SIZE,
                max_size=POOL_MAX_SIZE,
                timeout=CONNECT_TIMEOUT_S,
                command_timeout=COMMAND_TIMEOUT_S,
                server_settings={"application_name": APPLICATION_NAME},
            )
        except (*_DRIVER_ERRORS, ValueError) as error:
            # `from None`: a parsing error's traceback could show parts of the URL.
            raise StoreError(
                _scrub(
                    f"Cannot connect to {name}: {_describe(error)}. Check that the server is running and reachable "
                    "from this host, and the user, password, host, port and database name in DATABASE_URL.",
                    secrets,
                )
            ) from None
        store = cls(pool, name, secrets)
        try:
            await store._migrate()
        except BaseException:
            pool.terminate()
            raise
        return store

    async def _migrate(self) -> None:
        async with self._transaction("migrate") as connection:
            await connection.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            version = 0
            if await connection.fetchval("SELECT to_regclass($1)", VERSION_TABLE) is not None:
                version = await connection.fetchval(f"SELECT coalesce(max(version), 0) FROM {VERSION_TABLE}")
            if version > LATEST_VERSION:
                raise StoreError(
                    f"{_capitalised(self._name)} has schema version {version}, newer than this llamacord knows (up "
                    f"to {LATEST_VERSION}); it was written by a newer llamacord. Upgrade llamacord or point "
                    "DATABASE_URL at another database. Nothing was changed."
                )
            if version == 0:
                taken = [t for t in OWN_TABLES if await connection.fetchval("SELECT to_regclass($1)", t) is not None]
                if taken:
                    raise StoreError(
                        f"{_capitalised(self._name)} already has tables named {', '.join(taken)} that llamacord did "
                        "not create. Point DATABASE_URL at a database (or a schema, with ?search_path=) of its own. "
                        "Nothing was changed."
                    )
                await connection.execute(f"CREATE TABLE {VERSION_TABLE} (version INTEGER NOT NULL)")
                await connection.execute(f"INSERT INTO {VERSION_TABLE} (version) VALUES (0)")
            for migration in pending(POSTGRES_MIGRATIONS, version):
                for statement in migration.statements:
                    await connection.execute(statement)
            if version != LATEST_VERSION:
                await connection.execute(f"UPDATE {VERSION_TABLE} SET version = $1", LATEST_VERSION)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), CLOSE_TIMEOUT_S)
        except TimeoutError:
            pool.terminate()

    @property
    def closed(self) -> bool:
        return self._pool is None

    # --- conversations ----------------------------------------------------------------------------------

    async def _append(self, message: StoredMessage, shown_by: tuple[int, ...]) -> int:
        parameters = (
            message.channel_id,
            message.role.value,
            message.content.encode(),
            message.author_id,
            _bytes(message.author_name),
            message.message_id,
            message.created_at,
            message.reply_to_id,
            shown_by,
        )
        async with self._connection("append a message to") as connection:
            stored_id = await connection.fetchval(_APPEND, *parameters)
            if stored_id is None:  # the channel's first message: give it a row, then append
                await connection.execute(_ADD_CHANNEL, message.channel_id)
                stored_id = await connection.fetchval(_APPEND, *parameters)
        return int(stored_id)

    async def _load_history(self, channel_id: int, limit: int) -> list[StoredMessage]:
        rows = await self._read(
            "load history from", lambda connection: connection.fetch(_LOAD_HISTORY, channel_id, limit)
        )
        roles = _ROLES
        return [
            StoredMessage(r[0], r[1], roles[r[2]], r[3].decode(), r[4], _text(r[5]), r[6], r[7], r[8])
            for r in reversed(rows)
        ]

    async def _reset(self, channel_id: int, reset_by: int | None, reset_at: datetime) -> int:
        async with self._transaction("reset a channel in") as connection:
            # Lock, then count in a new statement: it sees every append that held the row before the lock was ours.
            start = await connection.fetchval(
                "SELECT history_start_id FROM channels WHERE channel_id = $1 FOR UPDATE", channel_id
            )
            if start is None:
                return 0
            cleared, newest = await connection.fetchrow(
                "SELECT count(*), max(id) FROM messages WHERE channel_id = $1 AND id > $2", channel_id, start
            )
            if not cleared:
                return 0
            await connection.execute(
                "UPDATE channels SET history_start_id = $2, reset_at = $3, reset_by = $4 WHERE channel_id = $1",
                channel_id,
                newest,
                reset_at,
                reset_by,
            )
            return int(cleared)

    async def _set_window_start(self, channel_id: int, message_id: int) -> None:
        async with self._connection("set the window start in") as connection:
            await connection.execute(
                "INSERT INTO channels (channel_id, window_start_id) VALUES ($1, $2) "
                "ON CONFLICT (channel_id) DO UPDATE SET window_start_id = excluded.window_start_id",
                channel_id,
                message_id,
            )

    async def _get_window_start(self, channel_id: int) -> int:
        start = await self._read(
            "read the window start from",
            lambda connection: connection.fetchval(
                "SELECT window_start_id FROM channels WHERE channel_id = $1", channel_id
            ),
        )
        return int(start or 0)

    # --- deletions and edits ----------------------------------------------------------------------------------

    async def _delete_shown_by(self, message_ids: tuple[int, ...]) -> int:
        return await self._delete_picked(_PICK_SHOWN_BY, message_ids)

    async def _forget_author(self, author_id: int, channel_id: int | None) -> int:
        return await self._delete_picked(_PICK_AUTHORED, author_id, channel_id)

    async def _delete_picked(self, pick: str, *parameters: object) -> int:
        async with self._transaction("delete messages from") as connection:
            await connection.execute(pick + _LOCK_PICKED, *parameters)
            return int(await connection.fetchval(pick + _DELETE_WITH_REPLIES, *parameters))

    async def _purge_older_than(self, cutoff: datetime) -> int:
        async with self._connection("delete messages from") as connection:
            return int(
                await connection.fetchval(
                    "WITH gone AS (DELETE FROM messages WHERE created_at < $1 RETURNING 1) SELECT count(*) FROM gone",
                    cutoff,
                )
            )

    async def _edit_user_turn(self, message_id: int, edit: Callable[[str], str]) -> bool:
        async with self._transaction("edit a message in") as connection:
            row = await connection.fetchrow(
                "SELECT id, content FROM messages WHERE role = 'user' "
                "AND id = (SELECT turn_id FROM discord_messages WHERE discord_message_id = $1) FOR UPDATE",
                message_id,
            )
            if row is None:
                return False
            new = edit(row["content"].decode()).encode()
            await connection.execute("UPDATE messages SET content = $2 WHERE id = $1", row["id"], new)
        return True

    async def _update_reply(
        self, stored_id: int, content: str, message_id: int | None, shown_by: tuple[int, ...]
    ) -> None:
        async with self._transaction("update a reply in") as connection:
            updated = await connection.fetchval(
                "UPDATE messages SET content = $2, message_id = $3 WHERE id = $1 AND role = 'assistant' RETURNING id",
                stored_id,
                content.encode(),
                message_id,
            )
            if updated is None:
                return
            await connection.execute("DELETE FROM discord_messages WHERE turn_id = $1", stored_id)
            await connection.execute(_SHOW, stored_id, shown_by)

    async def _discord_message_ids(self, stored_id: int) -> list[int]:
        rows = await self._read(
            "read a turn's messages from",
            lambda connection: connection.fetch(
                "SELECT discord_message_id FROM discord_messages WHERE turn_id = $1 ORDER BY discord_message_id",
                stored_id,
            ),
        )
        return [row[0] for row in rows]

    # --- channel settings ----------------------------------------------------------------------------------

    async def _get_channel_settings(self, channel_id: int) -> ChannelSettings:
        row = await self._read(
            "read channel settings from",
            lambda connection: connection.fetchrow(
                f"SELECT {_SETTINGS_COLUMNS} FROM channels WHERE channel_id = $1", channel_id
            ),
        )
        return ChannelSettings(channel_id=channel_id) if row is None else _settings(row)

    async def _update_channel_settings(
        self, channel_id: int, values: dict[str, object], changed_by: int | None, updated_at: datetime
    ) -> ChannelSettings:
        # Column names come from SETTING_FIELDS only (checked by the caller); every value is a bound parameter.
        columns = [*values, "updated_by", "updated_at"]
        parameters = [_stored_setting(value) for value in values.values()]
        placeholders = ", ".join(f"${i}" for i in range(2, len(columns) + 2))
        assignments = ", ".join(f"{column} = excluded.{column}" for column in columns)
        async with self._connection("update channel settings in") as connection:
            row = await connection.fetchrow(
                f"INSERT INTO channels (channel_id, {', '.join(columns)}) VALUES ($1, {placeholders}) "
                f"ON CONFLICT (channel_id) DO UPDATE SET {assignments} RETURNING {_SETTINGS_COLUMNS}",
                channel_id,
                *parameters,
                changed_by,
                updated_at,
            )
        return _settings(row)

    # --- internals ---------------------------------------------------------------------------------------

    @asynccontextmanager
    async def _connection(self, action: str) -> AsyncIterator[asyncpg.Connection]:
        """A connection of the pool for one operation; a driver or network error becomes `StoreError`. When the
        server ended the connection (a restart, a failover, pg_terminate_backend), the pool's other idle connections
        are likely gone too: all are replaced on their next use."""
        pool = self._pool
        if pool is None:
            raise StoreError(f"The store for {self._name} is closed")
        try:
            async with pool.acquire() as connection:
                try:
                    yield connection
                except _CONNECTION_LOST:
                    await pool.expire_connections()  # every connection is replaced before its next use
                    with suppress(asyncpg.InterfaceError):  # already given back: the expiry replaces it
                        connection.terminate()  # not back into the pool, whatever state its protocol is in
                    raise
        except _DRIVER_ERRORS as error:
            raise StoreError(_scrub(f"Cannot {action} {self._name}: {_describe(error)}", self._secrets)) from error

    async def _read(self, action: str, run: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """`run` on a pooled connection, once more on a fresh one if the first turned out to be one the server had
        ended while it sat idle. Reads change nothing, so trying again is safe; writes are not tried again: the one
        in flight fails, and the next one gets a fresh connection."""
        try:
            async with self._connection(action) as connection:
                return await run(connection)
        except StoreError as error:
            if not isinstance(error.__cause__, _CONNECTION_LOST):
                raise
        async with self._connection(action) as connection:
            return await run(connection)

    @asynccontextmanager
    async def _transaction(self, action: str) -> AsyncIterator[asyncpg.Connection]:
        """`_connection` inside one transaction (READ COMMITTED), rolled back on any exception or cancellation."""
        async with self._connection(action) as connection, connection.transaction():
            yield connection


def _settings(row: asyncpg.Record) -> ChannelSettings:
    return ChannelSettings.from_row((row[0], _text(row[1]), *row[2:]))


def _stored_setting(value: object) -> object:
    if isinstance(value, ReplyMode):
        return value.value
    return value.encode() if isinstance(value, str) else value  # the system prompt


def _describe(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "no answer in time"
    return str(error) or type(error).__name__


def _scrub(text: str, secrets: frozenset[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def _capitalised(text: str) -> str:
    return text[:1].upper() + text[1:]
