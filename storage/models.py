"""The store's plain data: stored messages, per-channel settings and their enums, and the checks every argument of
the store passes (one set of rules for both backends). No SQL, no I/O.

`None` in any `ChannelSettings` override means "use the global default" (the `Settings` value, or
`DEFAULT_REPLY_MODE` for the reply mode, which has no global setting).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from enum import StrEnum
from typing import Any


class Role(StrEnum):
    """Who said a stored message, in chat-template terms."""

    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"


class ReplyMode(StrEnum):
    """When the bot answers in a channel."""

    MENTION = "mention"  # only when mentioned (or replied to)
    ALL = "all"  # every message


DEFAULT_REPLY_MODE = ReplyMode.MENTION

# The bounds of the sampling settings, defined once here (the lowest layer): the global settings, a channel's
# overrides, /config and the engine's `SamplingParams` all check these.
TEMPERATURE_RANGE = (0.0, 2.0)  # inclusive
TOP_P_RANGE = (0.0, 1.0)  # above 0, up to and including 1
MAX_NEW_TOKENS_RANGE = (1, 8192)  # inclusive

SNOWFLAKE_MAX = 2**63 - 1  # Discord ids are unsigned 64-bit but stay below 2**63; both stores' ids are signed 64-bit


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """One message of a channel's conversation, as stored."""

    id: int  # the store's own id: increases with every write, so it is the channel's order
    channel_id: int
    role: Role
    content: str
    author_id: int | None
    author_name: str | None
    message_id: int | None  # the Discord message id, when the message came from (or went to) Discord
    created_at: datetime  # UTC, timezone-aware
    reply_to_id: int | None = None  # an assistant turn: the store id of the user turn it answers


# The stored columns of a message, named and ordered as `StoredMessage`'s fields: both stores select them in this
# order and build `StoredMessage` positionally.
MESSAGE_FIELDS: tuple[str, ...] = tuple(field.name for field in fields(StoredMessage))


@dataclass(frozen=True, slots=True)
class ChannelSettings:
    """A channel's overrides; `None` means the global default."""

    channel_id: int
    system_prompt: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None
    reply_mode: ReplyMode | None = None
    required_role_id: int | None = None  # a role a member needs to talk to the bot here (moderators never do)
    updated_by: int | None = None  # who last changed any of them
    updated_at: datetime | None = None  # UTC, timezone-aware

    @property
    def effective_reply_mode(self) -> ReplyMode:
        return self.reply_mode if self.reply_mode is not None else DEFAULT_REPLY_MODE

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> ChannelSettings:
        """From stored values in `CHANNEL_SETTINGS_FIELDS` order, the reply mode still its text."""
        channel_id, system_prompt, temperature, top_p, max_new_tokens, reply_mode, role_id, updated_by, updated_at = row
        return cls(
            channel_id,
            system_prompt,
            temperature,
            top_p,
            max_new_tokens,
            None if reply_mode is None else ReplyMode(reply_mode),
            role_id,
            updated_by,
            updated_at,
        )


# The overridable fields, in column order. `Store.update_channel_settings` accepts exactly these names.
SETTING_FIELDS: tuple[str, ...] = (
    "system_prompt",
    "temperature",
    "top_p",
    "max_new_tokens",
    "reply_mode",
    "required_role_id",
)
# The stored columns of a channel's settings, named and ordered as `ChannelSettings`'s fields.
CHANNEL_SETTINGS_FIELDS: tuple[str, ...] = tuple(field.name for field in fields(ChannelSettings))


def check_id(name: str, value: object) -> int:
    """Return `value` if it is a Discord-style id or a store id: a non-negative int that fits a signed 64-bit
    column (SQLite INTEGER, PostgreSQL bigint)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not 0 <= value <= SNOWFLAKE_MAX:
        raise ValueError(f"{name} must be between 0 and 2**63 - 1, got {value}")
    return value


def check_snowflake(name: str, value: object, *, optional: bool = False) -> int | None:
    """`check_id`, where `optional` also accepts None."""
    return None if value is None and optional else check_id(name, value)


def check_ids(name: str, values: object) -> tuple[int, ...]:
    """Return `values` (a sequence of ids, not a string) as a tuple, in order, without repeats."""
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a sequence of ints, not {type(values).__name__}")
    return tuple(dict.fromkeys(check_id(name, value) for value in values))


def check_role(value: object) -> Role:
    try:
        return Role(value)
    except ValueError:
        raise ValueError(f"role must be one of {', '.join(Role)}, got {value!r}") from None


def check_text(name: str, value: object) -> str:
    """Return `value` if it is a str (any str: NUL bytes, emoji and empty ones included)."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    return value


def check_limit(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"limit must be an int, not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"limit must be 0 or more, got {value}")
    return value


def check_moment(name: str, value: object) -> datetime:
    """Return `value` if it is a timezone-aware datetime (a naive one would be read in an unknown zone)."""
    if not isinstance(value, datetime):
        raise TypeError(f"{name} must be a datetime, not {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware, such as datetime.now(UTC)")
    return value


def check_setting(name: str, value: object) -> object:
    """Validate one override and return it normalised; `None` (back to the default) is always valid."""
    if name not in SETTING_FIELDS:
        raise ValueError(f"unknown channel setting {name!r}; known settings: {', '.join(SETTING_FIELDS)}")
    if value is None:
        return None
    if name == "system_prompt":
        return check_text(name, value)
    if name == "required_role_id":
        return check_snowflake(name, value)
    if name == "reply_mode":
        try:
            return ReplyMode(value)
        except ValueError:
            choices = ", ".join(mode.value for mode in ReplyMode)
            raise ValueError(f"reply_mode must be one of {choices}, got {value!r}") from None
    if name == "max_new_tokens":
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"max_new_tokens must be an int, not {type(value).__name__}")
        low, high = MAX_NEW_TOKENS_RANGE
        if not low <= value <= high:
            raise ValueError(f"max_new_tokens must be between {low} and {high}, got {value}")
        return value
    # temperature, top_p
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if name == "temperature":
        low, high = TEMPERATURE_RANGE
        if not low <= number <= high:
            raise ValueError(f"temperature must be between {low:g} and {high:g}, got {value!r}")
    else:
        low, high = TOP_P_RANGE
        if not low < number <= high:
            raise ValueError(f"top_p must be above {low:g} and at most {high:g}, got {value!r}")
    return number
