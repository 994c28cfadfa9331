"""Per-request timings and their summary, shared by every side `llamacord bench` measures (the pipeline baseline,
the engine, an OpenAI-compatible server), so each side's figures mean the same thing. Standard library only."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any


@dataclass(frozen=True, slots=True)
class RequestTiming:
    """One conversation, in seconds from the moment it was handed over."""

    ttft_s: float
    e2e_s: float
    prompt_tokens: int
    generated_tokens: int
    cached_prompt_tokens: int | None = None  # of prompt_tokens, served from a prefix cache; None: not reported


@dataclass(slots=True)
class PathResult:
    """Every request and wall-clock interval of one path (the baseline, the engine or the server at one
    concurrency)."""

    name: str
    concurrency: int
    requests: list[RequestTiming] = field(default_factory=list)
    wall_s: float = 0.0
    peak_memory_mib: float | None = None  # None: not measured (a server's memory is another process's)

    def summary(self) -> dict[str, Any]:
        ttft = [r.ttft_s for r in self.requests]
        e2e = [r.e2e_s for r in self.requests]
        tokens = sum(r.generated_tokens for r in self.requests)
        cached = [r.cached_prompt_tokens for r in self.requests if r.cached_prompt_tokens is not None]
        # How fast one reply grows once it has started: what a user watching it sees.
        stream_rates = [(r.generated_tokens - 1) / (r.e2e_s - r.ttft_s) for r in self.requests if r.e2e_s > r.ttft_s]
        return {
            "path": self.name,
            "concurrency": self.concurrency,
            "requests": len(self.requests),
            "prompt_tokens_mean": statistics.fmean(r.prompt_tokens for r in self.requests),
            "cached_prompt_tokens_mean": statistics.fmean(cached) if len(cached) == len(self.requests) else None,
            "generated_tokens": tokens,
            "wall_s": self.wall_s,
            "total_tok_s": tokens / self.wall_s,
            "stream_tok_s": statistics.median(stream_rates) if stream_rates else None,
            "ttft_p50_s": percentile(ttft, 50),
            "ttft_p95_s": percentile(ttft, 95),
            "e2e_p50_s": percentile(e2e, 50),
            "e2e_p95_s": percentile(e2e, 95),
            "peak_memory_mib": self.peak_memory_mib,
        }


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), exact for small samples."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class FirstTokenView:
    """A reply view (`bot.chat.pipeline.ReplyView`) for benchmarks that run the turn pipeline: it shows nothing and
    notes when the first text came (`perf_counter()`)."""

    def __init__(self) -> None:
        self.first_at: float | None = None

    def preparing(self) -> nullcontext[None]:
        return nullcontext()

    async def waiting(self, ahead: int) -> None:
        return None

    async def show(self, text: str) -> None:
        if self.first_at is None:
            self.first_at = perf_counter()

    async def finish(self, text: str, *, retry: bool) -> list[int]:
        await self.show(text)
        return []

    async def abandon(self, text: str) -> None:
        return None
