"""Fair turns: which waiting request gets the next free batch slot, and how many are ahead of each.

Requests reach the engine first come, first served, so one member who mentions the bot in ten channels at once, or
one busy server, would fill every slot and the queue ahead of everybody else. In front of any engine (local or
remote) the turn pipeline takes a ticket here instead, and tickets are granted round-robin across servers (a DM
counts as its user's own server) and, within a server, across users:

- at most `slots` requests generate at once (the engine's MAX_BATCH_SIZE); the batch is kept full: a free slot goes
  to someone as long as anyone waits;
- a user generates at most `max_active_per_user` requests at once while others wait (alone, a user may fill idle
  slots: slots never stay idle);
- at most `max_waiting_per_user` of one user's requests wait; past that, and past `max_queued` in all, a request is
  refused at once (`QueueFullError`, a busy error).

Tickets are granted in the order `order()` gives: servers in turn, each server's users in turn, each user's requests
in arrival order. A ticket's place in that order is what "3 ahead of you" says.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter, deque
from collections.abc import AsyncIterator, Hashable, Iterator
from time import perf_counter

from bot.engine.errors import BUSY_MESSAGE, EngineBusyError

USER_BUSY_MESSAGE = "You already have {count} waiting for an answer. Please wait for those first."


class QueueFullError(EngineBusyError):
    """The queue has no room for this request; `per_user` when it is the user's own bound."""

    def __init__(self, message: str, *, per_user: bool) -> None:
        super().__init__(message)
        self.per_user = per_user


class Ticket:
    """One request's place: waiting, then granted a slot until `FairQueue.leave`."""

    def __init__(self, server: Hashable, user: Hashable) -> None:
        self.server = server
        self.user = user
        self.entered_at = perf_counter()
        self.granted_at: float | None = None
        self.left = False
        self._changed = asyncio.Event()  # set when it is granted, or the line moves

    @property
    def granted(self) -> bool:
        return self.granted_at is not None

    @property
    def waited_s(self) -> float:
        """Seconds it waited for its slot (so far, while it still waits)."""
        return (self.granted_at if self.granted_at is not None else perf_counter()) - self.entered_at


class FairQueue:
    """Grants batch slots to tickets fairly. All methods run on the event loop."""

    def __init__(self, slots: int, *, max_queued: int, max_active_per_user: int, max_waiting_per_user: int) -> None:
        self.slots = slots
        self.max_queued = max_queued
        self.max_active_per_user = max_active_per_user
        self.max_waiting_per_user = max_waiting_per_user
        self._waiting: dict[Hashable, dict[Hashable, deque[Ticket]]] = {}  # server -> user -> waiting tickets
        self._active_users: Counter[Hashable] = Counter()  # user -> granted tickets
        self._active_servers: Counter[Hashable] = Counter()
        # When each server, and each user in a server, was last granted a slot: the least recently served goes
        # first, and one never served (or not since it last had nothing waiting or running) before anyone.
        self._served_servers: dict[Hashable, int] = {}
        self._served_users: dict[tuple[Hashable, Hashable], int] = {}
        self._grants = itertools.count()
        self._waiting_count = 0

    @property
    def active(self) -> int:
        return self._active_users.total()

    @property
    def waiting(self) -> int:
        return self._waiting_count

    def enter(self, server: Hashable, user: Hashable) -> Ticket:
        """A ticket for a new request, granted at once if a slot is free; `QueueFullError` if it may not wait."""
        if self.active >= self.slots:
            mine = sum(len(users.get(user, ())) for users in self._waiting.values())
            if mine >= self.max_waiting_per_user:
                count = "a message" if mine == 1 else f"{mine} messages"
                raise QueueFullError(USER_BUSY_MESSAGE.format(count=count), per_user=True)
            if self._waiting_count >= self.max_queued:
                raise QueueFullError(BUSY_MESSAGE, per_user=False)
        ticket = Ticket(server, user)
        self._waiting.setdefault(server, {}).setdefault(user, deque()).append(ticket)
        self._waiting_count += 1
        self._fill()
        return ticket

    async def wait(self, ticket: Ticket) -> None:
        """Until `ticket` is granted (or leaves the line)."""
        async for _ in self.moves(ticket):
            pass

    async def moves(self, ticket: Ticket) -> AsyncIterator[int]:
        """While `ticket` waits: how many are ahead of it, each time the line moves; ends when it is granted (or
        leaves the line)."""
        while not (ticket.granted or ticket.left):
            await ticket._changed.wait()
            ticket._changed.clear()  # after the wait: a change made while the caller handled the last place counts
            if not (ticket.granted or ticket.left):
                yield self.ahead(ticket)

    def leave(self, ticket: Ticket) -> None:
        """The request is done (or stopped while it waited): free its slot or its place. Idempotent."""
        if ticket.left:
            return
        ticket.left = True
        if ticket.granted:
            self._active_users[ticket.user] -= 1
            self._active_servers[ticket.server] -= 1
        else:
            self._waiting[ticket.server][ticket.user].remove(ticket)
            self._waiting_count -= 1
            ticket._changed.set()  # its own wait ends
        self._forget_idle(ticket.server, ticket.user)
        self._fill()

    def ahead(self, ticket: Ticket) -> int:
        """How many waiting tickets come before `ticket` (0 when it is next, or granted)."""
        for place, waiting in enumerate(self.order()):
            if waiting is ticket:
                return place
        return 0

    def order(self) -> Iterator[Ticket]:
        """The waiting tickets in the order they would be granted, were slots to free up one at a time now: servers
        in turn (the least recently served first), each server's users in turn (likewise), each user's tickets in
        arrival order."""

        def users_of(server: Hashable) -> deque[tuple[Hashable, deque[Ticket]]]:
            users = [(user, deque(tickets)) for user, tickets in self._waiting[server].items() if tickets]
            users.sort(key=lambda item: self._served_users.get((server, item[0]), -1))  # stable: arrival breaks ties
            return deque(users)

        servers = sorted(
            (server for server, users in self._waiting.items() if any(users.values())),
            key=lambda server: self._served_servers.get(server, -1),
        )
        rotation = deque((server, users_of(server)) for server in servers)
        while rotation:
            server, users = rotation.popleft()
            user, tickets = users.popleft()
            yield tickets.popleft()
            if tickets:
                users.append((user, tickets))
            if users:
                rotation.append((server, users))

    def _fill(self) -> None:
        """After any change: grant free slots, each to the first waiting ticket in `order()` whose user is under the
        per-user bound, or, when every waiting user is at the bound, the first in order (a slot never stays idle while
        anyone waits); then wake the waiters to see their new place."""
        while self.active < self.slots and self._waiting_count:
            candidates = list(self.order())
            chosen = next(
                (t for t in candidates if self._active_users[t.user] < self.max_active_per_user), candidates[0]
            )
            self._grant(chosen)
        for users in self._waiting.values():  # the line moved: every waiter may have a new place
            for tickets in users.values():
                for ticket in tickets:
                    ticket._changed.set()

    def _grant(self, ticket: Ticket) -> None:
        self._waiting[ticket.server][ticket.user].remove(ticket)
        self._waiting_count -= 1
        turn = next(self._grants)
        self._served_servers[ticket.server] = turn
        self._served_users[(ticket.server, ticket.user)] = turn
        self._active_users[ticket.user] += 1
        self._active_servers[ticket.server] += 1
        ticket.granted_at = perf_counter()
        ticket._changed.set()

    def _forget_idle(self, server: Hashable, user: Hashable) -> None:
        """Drop what is kept of a user, and a server, with nothing waiting or running any more."""
        users = self._waiting.get(server, {})
        if not users.get(user) and not self._active_users[user]:
            users.pop(user, None)
            self._served_users.pop((server, user), None)
            del self._active_users[user]
        if not any(users.values()) and not self._active_servers[server]:
            self._waiting.pop(server, None)
            self._served_servers.pop(server, None)
            del self._active_servers[server]
