"""Schema versions and the ordered migrations that reach the latest one, for both backends.

A version number means the same tables and columns in SQLite and in PostgreSQL; only the SQL dialect differs. On
open, each store applies every migration above the database's version, in order, in one transaction, then records
`LATEST_VERSION`: SQLite in `PRAGMA user_version` (inside `BEGIN IMMEDIATE`), PostgreSQL in the one-row table
`llamacord_schema_version` (under a transaction-level advisory lock, so shard processes starting together migrate
once). A fresh database runs them all, so every migration runs on every start-up of a new database. Never edit a
released migration: add a new one to both lists, with the same number.

PostgreSQL support began at version 3, so its history starts there: one migration creates the version-3 schema.

History:

1. The first schema: `channels` (one row per channel with its setting overrides) and `messages` (the
   conversation), with the index that loads "the last N messages of channel X". Reset deleted messages.
2. Reset archives instead of deleting: `channels.history_start_id` is the id of the last archived message of the
   channel (messages with `id <=` it are kept for moderation and audit but never loaded into a prompt), with
   `reset_at` and `reset_by` recording the last reset.
3. Deletions, edits and a prompt window: `channels.window_start_id` (the first stored message a prompt may load),
   `messages.reply_to_id` (an assistant turn's user turn), and `discord_messages`, mapping every Discord message
   that shows a stored turn (a long reply spans several) to it, deleted with the turn. Existing `message_id`s are
   copied into it; `reply_to_id` stays NULL for older replies (which user turn they answered was not recorded).
   Indexes for deleting a user turn's replies and an author's turns.
4. Who may talk to the bot in a channel: `channels.required_role_id`, a role a member needs there (NULL: anyone),
   and an index on `messages.created_at` for the retention purge.
"""

from __future__ import annotations

from dataclasses import dataclass

# The first 16 bytes of every SQLite 3 database file.
SQLITE_HEADER = b"SQLite format 3\x00"


@dataclass(frozen=True)
class Migration:
    version: int  # the schema version after this migration, the same in both backends
    description: str
    statements: tuple[str, ...]  # run one by one inside the migration transaction


V1_STATEMENTS = (
    """
    CREATE TABLE channels (
        channel_id      INTEGER PRIMARY KEY,            -- Discord snowflake (guild channel, thread or DM)
        system_prompt   TEXT,                           -- NULL: the global SYSTEM_PROMPT
        temperature     REAL,                           -- NULL: the global TEMPERATURE
        top_p           REAL,                           -- NULL: the global TOP_P
        max_new_tokens  INTEGER,                        -- NULL: the global MAX_NEW_TOKENS
        reply_mode      TEXT CHECK (reply_mode IN ('mention', 'all')),  -- NULL: mention
        updated_by      INTEGER,                        -- Discord user id of the last change
        updated_at      TEXT                            -- ISO 8601 UTC of the last change
    )
    """,
    """
    CREATE TABLE messages (
        id           INTEGER PRIMARY KEY AUTOINCREMENT, -- never reused: a channel's order is id order
        channel_id   INTEGER NOT NULL REFERENCES channels (channel_id),
        role         TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
        author_id    INTEGER,
        author_name  TEXT,
        content      TEXT NOT NULL,
        message_id   INTEGER,                           -- the Discord message id, when there is one
        created_at   TEXT NOT NULL                      -- ISO 8601 UTC
    )
    """,
    # "The last N messages of channel X": a range scan backwards from the end of X's entries, at any size.
    "CREATE INDEX messages_by_channel ON messages (channel_id, id)",
)

V2_STATEMENTS = (
    "ALTER TABLE channels ADD COLUMN history_start_id INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE channels ADD COLUMN reset_at TEXT",
    "ALTER TABLE channels ADD COLUMN reset_by INTEGER",
)

V3_STATEMENTS = (
    "ALTER TABLE channels ADD COLUMN window_start_id INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE messages ADD COLUMN reply_to_id INTEGER REFERENCES messages (id) ON DELETE SET NULL",
    # Deleting a user turn finds its replies here; so does SQLite's ON DELETE SET NULL (without it, a full scan).
    "CREATE INDEX messages_by_reply ON messages (reply_to_id) WHERE reply_to_id IS NOT NULL",
    "CREATE INDEX messages_by_author ON messages (author_id, channel_id) WHERE role = 'user'",
    """
    CREATE TABLE discord_messages (
        discord_message_id  INTEGER PRIMARY KEY,        -- a Discord message that shows the turn
        turn_id             INTEGER NOT NULL REFERENCES messages (id) ON DELETE CASCADE
    )
    """,
    "CREATE INDEX discord_messages_by_turn ON discord_messages (turn_id)",
    # A Discord message shows one turn: should two rows name the same one, the newer turn keeps it.
    """
    INSERT INTO discord_messages (discord_message_id, turn_id)
    SELECT message_id, id FROM messages WHERE message_id IS NOT NULL ORDER BY id
    ON CONFLICT (discord_message_id) DO UPDATE SET turn_id = excluded.turn_id
    """,
)

V4_STATEMENTS = (
    "ALTER TABLE channels ADD COLUMN required_role_id INTEGER",
    # The retention purge deletes by age across every channel.
    "CREATE INDEX messages_by_age ON messages (created_at)",
)

SQLITE_MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "channels and messages", V1_STATEMENTS),
    Migration(2, "reset archives: channels.history_start_id, reset_at, reset_by", V2_STATEMENTS),
    Migration(3, "window start, reply_to_id, discord_messages", V3_STATEMENTS),
    Migration(4, "channels.required_role_id, messages by age", V4_STATEMENTS),
)

# PostgreSQL: free text is BYTEA holding UTF-8, because TEXT cannot hold NUL characters and the store keeps any str
# exactly; times are TIMESTAMPTZ; ids are BIGINT, `messages.id` from an identity sequence.
POSTGRES_V3_STATEMENTS = (
    """
    CREATE TABLE channels (
        channel_id        BIGINT PRIMARY KEY,
        system_prompt     BYTEA,
        temperature       DOUBLE PRECISION,
        top_p             DOUBLE PRECISION,
        max_new_tokens    INTEGER,
        reply_mode        TEXT CHECK (reply_mode IN ('mention', 'all')),
        updated_by        BIGINT,
        updated_at        TIMESTAMPTZ,
        history_start_id  BIGINT NOT NULL DEFAULT 0,
        reset_at          TIMESTAMPTZ,
        reset_by          BIGINT,
        window_start_id   BIGINT NOT NULL DEFAULT 0
    )
    """,
    """
    CREATE TABLE messages (
        id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        channel_id   BIGINT NOT NULL REFERENCES channels (channel_id),
        role         TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
        author_id    BIGINT,
        author_name  BYTEA,
        content      BYTEA NOT NULL,
        message_id   BIGINT,
        created_at   TIMESTAMPTZ NOT NULL,
        reply_to_id  BIGINT REFERENCES messages (id) ON DELETE SET NULL
    )
    """,
    "CREATE INDEX messages_by_channel ON messages (channel_id, id)",
    "CREATE INDEX messages_by_reply ON messages (reply_to_id) WHERE reply_to_id IS NOT NULL",
    "CREATE INDEX messages_by_author ON messages (author_id, channel_id) WHERE role = 'user'",
    """
    CREATE TABLE discord_messages (
        discord_message_id  BIGINT PRIMARY KEY,
        turn_id             BIGINT NOT NULL REFERENCES messages (id) ON DELETE CASCADE
    )
    """,
    "CREATE INDEX discord_messages_by_turn ON discord_messages (turn_id)",
)

POSTGRES_V4_STATEMENTS = (
    "ALTER TABLE channels ADD COLUMN required_role_id BIGINT",
    "CREATE INDEX messages_by_age ON messages (created_at)",
)

POSTGRES_MIGRATIONS: tuple[Migration, ...] = (
    Migration(3, "the version-3 schema: channels, messages, discord_messages", POSTGRES_V3_STATEMENTS),
    Migration(4, "channels.required_role_id, messages by age", POSTGRES_V4_STATEMENTS),
)

LATEST_VERSION = SQLITE_MIGRATIONS[-1].version

assert [m.version for m in SQLITE_MIGRATIONS] == list(range(1, LATEST_VERSION + 1)), "migrations must be 1, 2, 3, ..."
assert [m.version for m in POSTGRES_MIGRATIONS] == list(range(3, LATEST_VERSION + 1)), "PostgreSQL: 3, 4, ..."


def pending(migrations: tuple[Migration, ...], version: int) -> tuple[Migration, ...]:
    """The `migrations` that take a database at `version` to `LATEST_VERSION`, in order."""
    return tuple(m for m in migrations if m.version > version)
