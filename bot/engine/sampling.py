"""How one request samples. Every request carries its own; the executor batches requests with different ones."""

from __future__ import annotations

import math
from dataclasses import dataclass

from bot.settings import Settings
from storage.models import MAX_NEW_TOKENS_RANGE, TEMPERATURE_RANGE, TOP_P_RANGE

_SETTINGS = Settings.model_fields  # the defaults are the global settings' defaults, written down once there


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Sampling for one request. `temperature == 0` is greedy decoding (the argmax, exactly as `generate` picks it)."""

    temperature: float = _SETTINGS["temperature"].default
    top_p: float = _SETTINGS["top_p"].default
    max_new_tokens: int = _SETTINGS["max_new_tokens"].default

    def __post_init__(self) -> None:
        low, high = TEMPERATURE_RANGE
        if not (math.isfinite(self.temperature) and low <= self.temperature <= high):
            raise ValueError(f"temperature must be between {low:g} and {high:g}, got {self.temperature!r}")
        low, high = TOP_P_RANGE
        if not (math.isfinite(self.top_p) and low < self.top_p <= high):
            raise ValueError(f"top_p must be above {low:g} and at most {high:g}, got {self.top_p!r}")
        # Only the lower bound: above it, what limits a request is the room in the engine's context, which
        # `generate()` checks. MAX_NEW_TOKENS_RANGE's upper bound is what a setting may ask for.
        least = MAX_NEW_TOKENS_RANGE[0]
        if (
            isinstance(self.max_new_tokens, bool)
            or not isinstance(self.max_new_tokens, int)
            or self.max_new_tokens < least
        ):
            raise ValueError(f"max_new_tokens must be an integer >= {least}, got {self.max_new_tokens!r}")
        # The continuous-batching processors type-check their per-request kwargs as float: accept ints here.
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def from_settings(cls, settings: Settings) -> SamplingParams:
        """The global defaults; a channel's overrides are applied by `bot.chat.config.ChannelConfig`."""
        return cls(temperature=settings.temperature, top_p=settings.top_p, max_new_tokens=settings.max_new_tokens)
