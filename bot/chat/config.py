"""A channel's effective configuration (its stored overrides over the global settings), and the copy of each
channel's overrides the process keeps so that deciding whether to answer a message costs no database read."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from bot.engine.sampling import SamplingParams
from bot.settings import Settings
from storage import SETTING_FIELDS, ChannelSettings, ReplyMode, Store

# Channels whose overrides are kept in memory; past this, the least recently used are read again when needed.
CONFIG_CACHE_SIZE = 10_000
# The least room for a prompt a channel's max_new_tokens may leave in one request's context: less, and a reply
# could barely see the message it answers.
MIN_PROMPT_TOKENS = 256


@dataclass(frozen=True)
class ChannelConfig:
    """A channel's effective configuration: its overrides, or the global settings where it has none."""

    system_prompt: str
    temperature: float
    top_p: float
    max_new_tokens: int
    reply_mode: ReplyMode
    required_role_id: int | None  # a role a member needs to talk to the bot here (None: anyone)
    overridden: frozenset[str]  # the fields the channel set itself

    @classmethod
    def resolve(cls, settings: Settings, overrides: ChannelSettings) -> ChannelConfig:
        overridden = frozenset(name for name in SETTING_FIELDS if getattr(overrides, name) is not None)
        return cls(
            system_prompt=overrides.system_prompt if overrides.system_prompt is not None else settings.system_prompt,
            temperature=overrides.temperature if overrides.temperature is not None else settings.temperature,
            top_p=overrides.top_p if overrides.top_p is not None else settings.top_p,
            max_new_tokens=(
                overrides.max_new_tokens if overrides.max_new_tokens is not None else settings.max_new_tokens
            ),
            reply_mode=overrides.effective_reply_mode,
            required_role_id=overrides.required_role_id,
            overridden=overridden,
        )

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens)


def prompt_room_problem(max_new_tokens: int, context_length: int) -> str | None:
    """Why `max_new_tokens` cannot be a channel's reply length in a context of `context_length` tokens (None when
    it can): it must leave MIN_PROMPT_TOKENS for the prompt."""
    most = context_length - MIN_PROMPT_TOKENS
    if max_new_tokens <= most:
        return None
    if most < 1:
        return f"one request holds only {context_length} tokens here, too few to change the reply length"
    return (
        f"max_new_tokens {max_new_tokens} would leave less than {MIN_PROMPT_TOKENS} tokens for the prompt "
        f"(one request holds {context_length} tokens here); the most is {most}"
    )


class ChannelConfigs:
    """Every channel's configuration, read from the store once and then kept (up to CONFIG_CACHE_SIZE channels).

    Changes must go through `update`, which writes the store and the copy together. That keeps the copy true
    across shard processes too: a server's messages and commands all reach the one process that runs its shard
    (direct messages reach shard 0), so no other process changes a channel's settings behind this one's back.
    """

    def __init__(self, store: Store, settings: Settings, size: int = CONFIG_CACHE_SIZE) -> None:
        self.store = store
        self.settings = settings
        self._size = size
        self._overrides: OrderedDict[int, ChannelSettings] = OrderedDict()

    def cached(self, channel_id: int) -> ChannelConfig | None:
        """The channel's configuration if it is in memory (no I/O), else None."""
        overrides = self._overrides.get(channel_id)
        return None if overrides is None else ChannelConfig.resolve(self.settings, overrides)

    async def get(self, channel_id: int) -> ChannelConfig:
        overrides = self._overrides.get(channel_id)
        if overrides is None:
            overrides = await self.store.get_channel_settings(channel_id)
            self._keep(overrides)
        else:
            self._overrides.move_to_end(channel_id)
        return ChannelConfig.resolve(self.settings, overrides)

    async def update(self, channel_id: int, *, changed_by: int | None, **changes: Any) -> ChannelConfig:
        """Change the channel's overrides (None puts a field back to the default); the store checks the values and
        raises `ValueError`/`TypeError` for bad ones, changing nothing."""
        overrides = await self.store.update_channel_settings(channel_id, changed_by=changed_by, **changes)
        self._keep(overrides)
        return ChannelConfig.resolve(self.settings, overrides)

    def _keep(self, overrides: ChannelSettings) -> None:
        self._overrides[overrides.channel_id] = overrides
        self._overrides.move_to_end(overrides.channel_id)
        while len(self._overrides) > self._size:
            self._overrides.popitem(last=False)
