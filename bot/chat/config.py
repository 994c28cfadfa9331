"""A channel's effective configuration: its stored overrides over the global settings."""

from __future__ import annotations

from dataclasses import dataclass

from bot.engine.sampling import SamplingParams
from bot.settings import Settings
from storage import SETTING_FIELDS, ChannelSettings, ReplyMode


@dataclass(frozen=True)
class ChannelConfig:
    """A channel's effective configuration: its overrides, or the global settings where it has none."""

    system_prompt: str
    temperature: float
    top_p: float
    max_new_tokens: int
    reply_mode: ReplyMode
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
            overridden=overridden,
        )

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens)
