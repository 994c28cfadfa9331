"""One budget of requests per second for a whole process, handed out in turns: first messages before streaming edits.

Discord allows a bot 50 REST requests a second in all; past that every request is answered 429, and 10,000 of
those in ten minutes earn a temporary ban. discord.py waits out each 429 after the fact; `Pacer` keeps a process
under the limit beforehand, and decides whose request goes first when there is not room for all:

- turns are spaced evenly, at most one per `1 / per_second` seconds (no bursts: a burst sent in one instant can
  reach Discord in the same second as the next one);
- `FIRST` requests (a reply's first message, the edit that ends a reply, a busy notice, a read the bot waits on)
  go before `EDIT`s, so a new reply does not queue behind the edits of the replies already streaming;
- edits take turns round-robin by stream, so each stream gets its share and, when many stream, each edits less
  often instead of the process sending more;
- while both wait, every `EDIT_EVERY`-th turn goes to an edit anyway, so a flood of first messages slows the
  streams down but never stops them.

Pure asyncio; the Discord adapter decides which request is which (`bot/client.py`).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Hashable
from enum import IntEnum

# While first messages and edits both wait, one turn in this many goes to an edit.
EDIT_EVERY = 5


class Priority(IntEnum):
    FIRST = 0  # everything that is not a streaming edit: new messages, the edit that ends a reply, notices, reads
    EDIT = 1  # an edit of a message while it streams


class Pacer:
    """At most `per_second` turns a second, evenly spaced, in priority order; a request waits its turn and never
    fails for pacing."""

    def __init__(self, per_second: float) -> None:
        if per_second <= 0:
            raise ValueError(f"per_second must be positive, got {per_second}")
        self.spacing = 1.0 / per_second
        self._free_at = float("-inf")  # the loop time from which the next turn may be given
        self._first: deque[asyncio.Future[None]] = deque()
        self._edits: OrderedDict[Hashable, deque[asyncio.Future[None]]] = OrderedDict()  # stream -> its waiters
        self._firsts_in_a_row = 0  # turns given to FIRST while an edit waited
        self._timer: asyncio.TimerHandle | None = None

    @property
    def waiting(self) -> int:
        return len(self._first) + sum(len(waiters) for waiters in self._edits.values())

    async def turn(self, priority: Priority, stream: Hashable = None) -> None:
        """Wait for this request's turn. Edits of one `stream` share its turns with the other streams'."""
        loop = asyncio.get_running_loop()
        if not self.waiting and loop.time() >= self._free_at:
            self._given(loop.time())
            return
        waiter: asyncio.Future[None] = loop.create_future()
        queue = self._first if priority is Priority.FIRST else self._edits.setdefault(stream, deque())
        queue.append(waiter)
        self._wake_later(loop)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.cancelled():  # still in line (a turn already given is spent: it may have been sent)
                self._forget(waiter, queue, stream)
            raise

    async def turn_if_idle(self) -> bool:
        """Take the next turn only if no other request waits for one (then within one spacing); False otherwise.
        For what is worth sending only when there is room, such as a typing indicator."""
        if self.waiting:
            return False
        await self.turn(Priority.FIRST)
        return True

    def _given(self, now: float) -> None:
        self._free_at = now + self.spacing

    def _forget(self, waiter: asyncio.Future[None], queue: deque[asyncio.Future[None]], stream: Hashable) -> None:
        if waiter in queue:
            queue.remove(waiter)
        if queue is not self._first and not queue and self._edits.get(stream) is queue:
            del self._edits[stream]

    def _wake_later(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is None:
            self._timer = loop.call_at(self._free_at, self._wake, loop)

    def _wake(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        if loop.time() < self._free_at:  # woken a hair early (the loop's clock resolution): not yet
            self._wake_later(loop)
            return
        while (waiter := self._next()) is not None:
            if not waiter.done():  # one cancelled a moment ago is skipped
                waiter.set_result(None)
                self._given(loop.time())
                break
        if self.waiting:
            self._wake_later(loop)

    def _next(self) -> asyncio.Future[None] | None:
        """The waiter whose turn it is, taken out of its queue."""
        if self._edits and (not self._first or self._firsts_in_a_row >= EDIT_EVERY - 1):
            self._firsts_in_a_row = 0
            stream, waiters = next(iter(self._edits.items()))
            waiter = waiters.popleft()
            if waiters:
                self._edits.move_to_end(stream)  # round-robin: this stream's next edit goes after the others'
            else:
                del self._edits[stream]
            return waiter
        if self._first:
            if self._edits:
                self._firsts_in_a_row += 1
            return self._first.popleft()
        return None
