"""Durable conversation history and channel settings, in SQLite or PostgreSQL. The only package that contains SQL.

`open_store(location)` opens the store that `location` names: a `postgresql://` URL (DATABASE_URL) or the path of
a SQLite file (DATABASE_PATH). Everything above uses the `Store` interface only.
"""

import os

from storage.base import Opening, Store, StoreError
from storage.models import DEFAULT_REPLY_MODE, SETTING_FIELDS, ChannelSettings, ReplyMode, Role, StoredMessage
from storage.postgres import PostgresStore, is_postgres_url
from storage.sqlite import SQLiteStore


def open_store(location: str | os.PathLike[str]) -> Opening[Store]:
    """Open (creating and migrating as needed) the store at `location`: await it, or use it with `async with`."""
    if is_postgres_url(location):
        return PostgresStore.open(str(location))
    return SQLiteStore.open(location)


__all__ = [
    "DEFAULT_REPLY_MODE",
    "SETTING_FIELDS",
    "ChannelSettings",
    "Opening",
    "PostgresStore",
    "ReplyMode",
    "Role",
    "SQLiteStore",
    "Store",
    "StoreError",
    "StoredMessage",
    "is_postgres_url",
    "open_store",
]
