"""The store's plain data: stored messages, per-channel settings and their enums. No SQL, no I/O.

`None` in any `ChannelSettings` override means "use the global default" (the `Settings` value, or
`DEFAULT_REPLY_MODE` for the reply mode, which has no global setting).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum


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

SNOWFLAKE_MAX = 2**63 - 1  # Discord ids are unsigned 64-bit but stay below 2**63; SQLite INTEGER is signed 64-bit


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


@dataclass(frozen=True, slots=True)
class ChannelSettings:
    """A channel's overrides; `None` means the global default."""

    channel_id: int
    system_prompt: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None
    reply_mode: ReplyMode | None = None
    updated_by: int | None = None  # who last changed any of them
    updated_at: datetime | None = None  # UTC, timezone-aware

    @property
    def effective_reply_mode(self) -> ReplyMode:
        return self.reply_mode if self.reply_mode is not None else DEFAULT_REPLY_MODE


# The overridable fields, in column order. `Store.update_channel_settings` accepts exactly these names.
SETTING_FIELDS: tuple[str, ...] = ("system_prompt", "temperature", "top_p", "max_new_tokens", "reply_mode")


def check_snowflake(name: str, value: object, *, optional: bool = False) -> int | None:
    """Return `value` if it is a Discord-style id (a non-negative int that fits SQLite's INTEGER)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not 0 <= value <= SNOWFLAKE_MAX:
        raise ValueError(f"{name} must be between 0 and 2**63 - 1, got {value}")
    return value


def check_setting(name: str, value: object) -> object:
    """Validate one override and return it normalised; `None` (back to the default) is always valid."""
    if name not in SETTING_FIELDS:
        raise ValueError(f"unknown channel setting {name!r}; known settings: {', '.join(SETTING_FIELDS)}")
    if value is None:
        return None
    if name == "system_prompt":
        if not isinstance(value, str):
            raise TypeError(f"system_prompt must be a str, not {type(value).__name__}")
        return value
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
