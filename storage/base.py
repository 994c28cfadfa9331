"""`Store`: the one interface to conversations and channel settings, whichever database holds them.

Two backends implement it: `SQLiteStore` (one file, one host; `storage/sqlite.py`) and `PostgresStore` (one server
shared by shard processes on many hosts; `storage/postgres.py`). The public methods here check every argument, with
the rules of `storage/models.py`, before a backend sees it, so both refuse bad input alike and a refused call writes
nothing. The backends implement the `_`-methods, which get checked values only.

What every backend promises (`tests/unit/storage/` checks it on both):

- A write has committed when its `await` returns.
- A channel's order is the order of `StoredMessage.id`, which only grows.
- `reset` archives: older messages stay stored but never load again.
- Deletions (`delete_discord_messages`, `forget_author`, `purge_older_than`) remove rows for good, and deleting a
  user turn also deletes the assistant turns that answer it (`reply_to_id`).
- Every database failure surfaces as `StoreError`, whose message names the database (never a password).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

from storage.models import (
    SETTING_FIELDS,
    ChannelSettings,
    Role,
    StoredMessage,
    check_id,
    check_ids,
    check_limit,
    check_moment,
    check_role,
    check_setting,
    check_snowflake,
    check_text,
)

S = TypeVar("S", bound="Store", covariant=True)


class StoreError(Exception):
    """The database cannot be opened or used. `str()` names the database and, where it can, what to do."""


def now() -> datetime:
    """The time every store records (`created_at`, `updated_at`, `reset_at`): this host's clock, in UTC."""
    return datetime.now(UTC)


class Opening(Generic[S]):
    """What opening a store returns: await it for the store, or use it with `async with` to close it at the end."""

    def __init__(self, open_: Callable[[], Awaitable[S]]) -> None:
        self._open = open_
        self._store: S | None = None

    def __await__(self) -> Generator[Any, None, S]:
        return self._open().__await__()

    async def __aenter__(self) -> S:
        self._store = await self._open()
        return self._store

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._store is not None:
            await self._store.close()


def shown_by(message_id: int | None, part_ids: object) -> tuple[int, ...]:
    """Every Discord message that shows a turn: `message_id` (the first) and then `part_ids`, checked."""
    check_snowflake("message_id", message_id, optional=True)
    parts = check_ids("part_ids", part_ids)
    if parts and message_id is None:
        raise ValueError("part_ids continue the Discord message message_id, so they need a message_id")
    return tuple(dict.fromkeys((message_id, *parts))) if message_id is not None else ()


class Store(ABC):
    """The async store. Open one with `storage.open_store(location)`; many coroutines may share it."""

    # --- conversations ----------------------------------------------------------------------------------------

    async def append_message(
        self,
        channel_id: int,
        role: Role | str,
        content: str,
        *,
        author_id: int | None = None,
        author_name: str | None = None,
        message_id: int | None = None,
        reply_to_id: int | None = None,
        part_ids: Sequence[int] = (),
    ) -> StoredMessage:
        """Append one message to a channel's conversation. When this returns, the message is durable.

        `message_id` is the Discord message that shows it (the first one), `part_ids` the further Discord messages
        showing the same turn (a long reply's continuations); deleting any of them deletes the turn. `reply_to_id`
        is, for an assistant turn, the store id of the user turn it answers; `StoreError` if that turn is gone.
        """
        shown = shown_by(message_id, part_ids)
        message = StoredMessage(
            id=0,  # the backend's
            channel_id=check_id("channel_id", channel_id),
            role=check_role(role),
            content=check_text("content", content),
            author_id=check_snowflake("author_id", author_id, optional=True),
            author_name=None if author_name is None else check_text("author_name", author_name),
            message_id=message_id,
            created_at=now(),
            reply_to_id=check_snowflake("reply_to_id", reply_to_id, optional=True),
        )
        return replace(message, id=await self._append(message, shown))

    async def load_history(self, channel_id: int, limit: int) -> list[StoredMessage]:
        """The newest `limit` messages of the channel since its last reset and from its window start on, oldest
        first. Unknown channel: []."""
        check_id("channel_id", channel_id)
        if check_limit(limit) == 0:
            return []
        return await self._load_history(channel_id, limit)

    async def reset(self, channel_id: int, *, reset_by: int | None = None) -> int:
        """Archive the channel's conversation so the next prompt starts fresh; return how many messages that hid.

        The messages stay in the database (for moderation and audit) but are never loaded again.
        """
        check_id("channel_id", channel_id)
        check_snowflake("reset_by", reset_by, optional=True)
        return await self._reset(channel_id, reset_by, now())

    async def set_window_start(self, channel_id: int, message_id: int) -> None:
        """Start the channel's prompt window at the stored message `message_id` (a `StoredMessage.id`): older
        messages stay stored but are not loaded. A reset still hides everything before it as well."""
        await self._set_window_start(check_id("channel_id", channel_id), check_id("message_id", message_id))

    async def get_window_start(self, channel_id: int) -> int:
        """The store id the channel's prompt window starts at; 0 when never set."""
        return await self._get_window_start(check_id("channel_id", channel_id))

    # --- deletions and edits (Discord's message events, data-removal requests) --------------------------------

    async def delete_discord_messages(self, message_ids: Sequence[int]) -> int:
        """Delete for good every stored turn shown by any of these Discord messages, and the assistant turns that
        answer a deleted user turn; return how many stored turns were deleted."""
        ids = check_ids("message_ids", message_ids)
        return await self._delete_shown_by(ids) if ids else 0

    async def edit_discord_message(self, message_id: int, edit: Callable[[str], str]) -> bool:
        """Replace the stored text of the user turn shown by this Discord message with `edit(its stored text)`, read and
        written in one transaction; False when none is stored."""
        if not callable(edit):
            raise TypeError(f"edit must be a function of the stored text, got {type(edit).__name__}")
        message_id = check_id("message_id", message_id)
        return await self._edit_user_turn(message_id, lambda stored: check_text("content", edit(stored)))

    async def forget_author(self, author_id: int, channel_id: int | None = None) -> int:
        """Delete the author's user turns (in one channel, or everywhere with None) and the assistant turns that
        answer them; return how many stored turns were deleted."""
        check_id("author_id", author_id)
        return await self._forget_author(author_id, check_snowflake("channel_id", channel_id, optional=True))

    async def purge_older_than(self, cutoff: datetime) -> int:
        """Delete every message created before `cutoff` (archived ones included); return how many."""
        return await self._purge_older_than(check_moment("cutoff", cutoff).astimezone(UTC))

    async def update_reply(
        self, stored_id: int, content: str, *, message_id: int | None, part_ids: Sequence[int] = ()
    ) -> None:
        """Replace an assistant turn's text and the Discord messages that show it (a retried answer to the same
        user turn). Does nothing when the turn is gone (deleted meanwhile) or is not an assistant turn."""
        check_id("stored_id", stored_id)
        check_text("content", content)
        await self._update_reply(stored_id, content, message_id, shown_by(message_id, part_ids))

    async def discord_message_ids(self, stored_id: int) -> list[int]:
        """The Discord messages that show a stored turn, oldest first ([] when it is gone or never was shown)."""
        return await self._discord_message_ids(check_id("stored_id", stored_id))

    # --- channel settings ---------------------------------------------------------------------------------------

    async def get_channel_settings(self, channel_id: int) -> ChannelSettings:
        """The channel's overrides; all `None` (the global defaults) for a channel never configured."""
        return await self._get_channel_settings(check_id("channel_id", channel_id))

    async def update_channel_settings(
        self, channel_id: int, *, changed_by: int | None, **changes: object
    ) -> ChannelSettings:
        """Change some of the channel's overrides and return them all.

        Fields not passed stay as they are; a field passed as `None` goes back to the global default. Unknown
        field names and out-of-range values raise `ValueError` (wrong types `TypeError`) before anything is
        written. `changed_by` (a Discord user id, or None for the terminal) and the time are recorded. With no
        changes, nothing is written and the current settings are returned.
        """
        check_id("channel_id", channel_id)
        check_snowflake("changed_by", changed_by, optional=True)
        unknown = sorted(set(changes) - set(SETTING_FIELDS))
        if unknown:
            raise ValueError(
                f"unknown channel setting(s) {', '.join(unknown)}; known settings: {', '.join(SETTING_FIELDS)}"
            )
        values = {name: check_setting(name, value) for name, value in changes.items()}
        if not values:
            return await self.get_channel_settings(channel_id)
        return await self._update_channel_settings(channel_id, values, changed_by, now())

    # --- lifetime -------------------------------------------------------------------------------------------------

    @abstractmethod
    async def close(self) -> None:
        """Close after the operations already running. Safe to call twice; every later call raises `StoreError`."""

    @property
    @abstractmethod
    def closed(self) -> bool: ...

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # --- what a backend implements, on checked arguments ------------------------------------------------------

    @abstractmethod
    async def _append(self, message: StoredMessage, shown_by: tuple[int, ...]) -> int:
        """Store `message` (its id is 0) and map each of `shown_by` to it; return its new id."""

    @abstractmethod
    async def _load_history(self, channel_id: int, limit: int) -> list[StoredMessage]: ...

    @abstractmethod
    async def _reset(self, channel_id: int, reset_by: int | None, reset_at: datetime) -> int: ...

    @abstractmethod
    async def _set_window_start(self, channel_id: int, message_id: int) -> None: ...

    @abstractmethod
    async def _get_window_start(self, channel_id: int) -> int: ...

    @abstractmethod
    async def _delete_shown_by(self, message_ids: tuple[int, ...]) -> int: ...

    @abstractmethod
    async def _edit_user_turn(self, message_id: int, edit: Callable[[str], str]) -> bool: ...

    @abstractmethod
    async def _forget_author(self, author_id: int, channel_id: int | None) -> int: ...

    @abstractmethod
    async def _purge_older_than(self, cutoff: datetime) -> int: ...

    @abstractmethod
    async def _update_reply(
        self, stored_id: int, content: str, message_id: int | None, shown_by: tuple[int, ...]
    ) -> None: ...

    @abstractmethod
    async def _discord_message_ids(self, stored_id: int) -> list[int]: ...

    @abstractmethod
    async def _get_channel_settings(self, channel_id: int) -> ChannelSettings: ...

    @abstractmethod
    async def _update_channel_settings(
        self, channel_id: int, values: dict[str, object], changed_by: int | None, updated_at: datetime
    ) -> ChannelSettings:
        """Set `values` (checked; `ReplyMode` members for the reply mode) and return all the settings."""
