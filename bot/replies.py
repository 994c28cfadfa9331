"""Pure helpers for putting a streamed reply on Discord: splitting at the 2,000-character limit, and pacing edits.

No discord import: the chat cog does the I/O, these decide what to send and when, so they are unit-tested alone.

Splitting prefers the most natural boundary that still fills at least half a message: a paragraph break, then a
line break, then the end of a sentence, then a space; only a single unbroken run longer than a message is cut
hard. A cut inside a fenced code block closes the fence at the end of the message and reopens it, with its
language, at the start of the next, so every message renders as valid Markdown.

A chunk's boundary depends only on the text up to one character past the message limit, so while a reply grows,
the messages already filled never change again; only the last one does. That keeps streaming edits to the newest
message.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

DISCORD_LIMIT = 2000
# A fence line longer than this (an absurd info string) is reopened as a bare fence, so reopening always fits.
MAX_REOPENED_FENCE = 100
# Sentence ends: punctuation, optional closing quotes, brackets or emphasis, then whitespace.
_SENTENCE_END = re.compile(r"[.!?…][\"')\]*_`]*\s")
# A fence line: up to three spaces, three or more backticks, an info string without backticks (CommonMark).
_FENCE_LINE = re.compile(r"^ {0,3}(`{3,})([^`\n]*)$", re.MULTILINE)


def open_fence(text: str) -> str | None:
    """The opening fence line (e.g. "```python") if `text` ends inside a fenced code block, else None."""
    opening: str | None = None
    for match in _FENCE_LINE.finditer(text):
        backticks, info = match[1], match[2].strip()
        if opening is None:
            opening = backticks + info
        elif not info and len(backticks) >= len(opening) - len(opening.lstrip("`")):
            opening = None
    return opening


def _closing(fence: str) -> str:
    """The line that closes the block `fence` opened: as many backticks, on a line of its own."""
    return "\n" + fence[: len(fence) - len(fence.lstrip("`"))]


def _cut(text: str, budget: int) -> tuple[int, int]:
    """Where this chunk ends and the next one starts, for a chunk of at most `budget` characters of `text`.

    Every boundary must leave at least half a message, so chunks stay full and splitting always progresses.
    """
    window = text[: budget + 1]  # one character of look-ahead: a boundary right at the limit still counts
    floor = budget // 2
    paragraph = window.rfind("\n\n", 0, budget + 1)
    if paragraph >= floor:
        return paragraph, paragraph + 2
    line = window.rfind("\n", 0, budget + 1)
    if line >= floor:
        return line, line + 1
    sentence = max((m.end() - 1 for m in _SENTENCE_END.finditer(window) if m.end() - 1 <= budget), default=-1)
    if sentence >= floor:
        return sentence, sentence + 1
    space = max(window.rfind(" ", 0, budget + 1), window.rfind("\t", 0, budget + 1))
    if space >= floor:
        return space, space + 1
    return budget, budget


def split_message(text: str, limit: int = DISCORD_LIMIT) -> list[str]:
    """Split `text` into messages of at most `limit` characters, each with its code blocks closed."""
    if limit < 4 * MAX_REOPENED_FENCE:
        raise ValueError(f"limit must be at least {4 * MAX_REOPENED_FENCE}, got {limit}")
    chunks: list[str] = []
    rest = text.strip("\n")
    while len(rest) > limit:
        end, start = _cut(rest, limit)
        fence = open_fence(rest[:end])
        if fence is not None:  # leave room for the closing fence, and look again: the cut may leave the block
            end, start = _cut(rest, limit - len(_closing(fence)))
            fence = open_fence(rest[:end])
            fence_line = rest.rfind("\n", 0, len(rest[:end].rstrip()))
            if fence is not None and fence_line > 0 and rest[fence_line + 1 : end].strip() == fence:
                end, start, fence = fence_line, fence_line + 1, None  # don't leave an empty block behind
        chunk = rest[:end].rstrip()
        rest = rest[start:].lstrip("\n")
        if fence is not None:
            chunk += _closing(fence)
            reopened = fence if len(fence) <= MAX_REOPENED_FENCE else _closing(fence).strip()
            rest = reopened + "\n" + rest
        if chunk.strip():
            chunks.append(chunk)
    if rest.strip():
        chunks.append(rest.rstrip())
    return chunks


@dataclass(frozen=True)
class MessagePlan:
    """What to do to make the messages on Discord show `wanted`: edit some, send the rest."""

    edits: list[tuple[int, str]]  # (index of an already-sent message, its new text)
    sends: list[str]  # new messages, in order, after the existing ones


def plan_messages(shown: list[str], wanted: list[str]) -> MessagePlan:
    """Compare the texts already on Discord with the wanted ones. Messages never shrink in number while a
    reply grows; a shown message beyond `wanted` is left as it is."""
    edits = [(i, text) for i, text in enumerate(wanted[: len(shown)]) if shown[i] != text]
    return MessagePlan(edits=edits, sends=list(wanted[len(shown) :]))


@dataclass
class EditThrottle:
    """At most one flush per `interval` seconds; the first flush is immediate, and the final one is always made
    (the caller waits `delay()` before it). One throttle paces a whole reply, so each of its messages is edited
    at most once per interval, which keeps Discord's per-message edit rate limit from ever answering 429."""

    interval: float
    clock: Callable[[], float] = time.monotonic
    _last: float | None = field(default=None, init=False)

    def delay(self) -> float:
        """Seconds until the next flush is allowed (0.0 when it is allowed now)."""
        if self._last is None:
            return 0.0
        return max(0.0, self._last + self.interval - self.clock())

    def ready(self) -> bool:
        return self.delay() == 0.0

    def flushed(self) -> None:
        """Record a flush made now."""
        self._last = self.clock()
