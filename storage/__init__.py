"""Durable conversation history and channel settings in SQLite. The only package that contains SQL."""

from storage.models import DEFAULT_REPLY_MODE, SETTING_FIELDS, ChannelSettings, ReplyMode, Role, StoredMessage
from storage.store import Store, StoreError

__all__ = [
    "DEFAULT_REPLY_MODE",
    "SETTING_FIELDS",
    "ChannelSettings",
    "ReplyMode",
    "Role",
    "Store",
    "StoreError",
    "StoredMessage",
]
