"""How often one person is told the same thing: a flood of messages past a limit gets one explanation a minute,
not one post per message (each post would add to the flood, in the channel and against Discord's rate limits)."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

# One notice (busy, slow down) per user per channel in this many seconds; the front end acknowledges the rest
# more quietly (Discord: a reaction).
NOTICE_INTERVAL_SECONDS = 60.0
# Prune the table when it grows past this many (channel, user) pairs.
NOTICE_TABLE_SIZE = 4096


class Notices:
    """Decides whether a notice is posted or only acknowledged."""

    def __init__(
        self, interval_s: float = NOTICE_INTERVAL_SECONDS, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._last: dict[Hashable, float] = {}  # (channel, user) -> when the last notice was posted

    def should_post(self, channel_id: int, user_id: int) -> bool:
        """True (and the interval starts over) when this user was not told anything in this channel for a while."""
        now = self._clock()
        key = (channel_id, user_id)
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            return False
        if len(self._last) >= NOTICE_TABLE_SIZE:
            self._last = {k: t for k, t in self._last.items() if now - t < self.interval_s}
        self._last[key] = now
        return True
