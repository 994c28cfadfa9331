"""Schema versions and the ordered migrations that reach the latest one.

The database's version is `PRAGMA user_version`. `Store.open` applies every migration above it, in order, in one
`BEGIN IMMEDIATE` transaction, then sets `user_version` to `LATEST_VERSION`. A fresh database runs them all, so
every migration is exercised on every start-up of a new database. Never edit a released migration: add a new one.

History:

1. The first schema: `channels` (one row per channel with its setting overrides) and `messages` (the
   conversation), with the index that loads "the last N messages of channel X". Reset deleted messages.
2. Reset archives instead of deleting: `channels.history_start_id` is the id of the last archived message of the
   channel (messages with `id <=` it are kept for moderation and audit but never loaded into a prompt), with
   `reset_at` and `reset_by` recording the last reset.
"""

from __future__ import annotations

from dataclasses import dataclass

# The first 16 bytes of every SQLite 3 database file.
SQLITE_HEADER = b"SQLite format 3\x00"


@dataclass(frozen=True)
class Migration:
    version: int  # the schema version after this migration
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

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "channels and messages", V1_STATEMENTS),
    Migration(2, "reset archives: channels.history_start_id, reset_at, reset_by", V2_STATEMENTS),
)

LATEST_VERSION = MIGRATIONS[-1].version

assert [m.version for m in MIGRATIONS] == list(range(1, LATEST_VERSION + 1)), "migrations must be 1, 2, 3, ..."


def pending(version: int) -> tuple[Migration, ...]:
    """The migrations that take a database at `version` to `LATEST_VERSION`, in order."""
    return tuple(m for m in MIGRATIONS if m.version > version)
