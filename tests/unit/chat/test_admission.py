"""Fair turns (`bot.chat.admission`): round-robin across servers and users, a full batch, bounds that answer busy."""

from __future__ import annotations

import asyncio

import pytest

from bot.chat.admission import FairQueue, QueueFullError, Ticket


def queue(slots: int = 2, **bounds: int) -> FairQueue:
    values = {"max_queued": 64, "max_active_per_user": 1, "max_waiting_per_user": 16} | bounds
    return FairQueue(slots, **values)


def granted(tickets: list[Ticket]) -> list[int]:
    return [n for n, ticket in enumerate(tickets) if ticket.granted]


def test_a_flood_fills_idle_slots_but_a_newcomer_is_next() -> None:
    line = queue(slots=2)
    flood = [line.enter("guild", "alice") for _ in range(16)]
    assert granted(flood) == [0, 1], "alone, a user may fill the idle slots"
    bystander = line.enter("guild", "bob")
    assert not bystander.granted and line.ahead(bystander) == 0, "bob is next, ahead of alice's 14"
    line.leave(flood[0])
    assert bystander.granted and granted(flood) == [0, 1]
    line.leave(bystander)
    assert granted(flood) == [0, 1, 2], "then alice again"


def test_servers_take_turns_then_users_within_a_server() -> None:
    line = queue(slots=1, max_active_per_user=9)
    busy = [line.enter("busy-guild", user) for user in ("a", "a", "b")]  # the first is granted at once
    quiet = line.enter("quiet-guild", "c")
    dm = line.enter(("dm", "d"), "d")  # a DM is its user's own server
    # Servers not yet served first (in arrival order), then busy-guild, where bob was not served yet and alice was.
    assert list(line.order()) == [quiet, dm, busy[2], busy[1]]
    assert [line.ahead(t) for t in (quiet, dm, busy[2], busy[1])] == [0, 1, 2, 3]
    served = []
    for _ in range(4):
        current = next(t for t in [*busy, quiet, dm] if t.granted and not t.left)
        served.append(current)
        line.leave(current)
    assert served == [busy[0], quiet, dm, busy[2]], "one turn per server, and bob before alice's second"


def test_the_per_user_bound_applies_while_others_wait() -> None:
    line = queue(slots=3, max_active_per_user=1)
    alice = [line.enter("g", "alice") for _ in range(3)]
    assert granted(alice) == [0, 1, 2]  # nobody else waits: every slot is used
    bob = [line.enter("g", "bob") for _ in range(2)]
    line.leave(alice[0])
    line.leave(alice[1])
    assert granted(bob) == [0, 1], "alice holds more than her bound: freed slots go to bob"


def test_a_slot_never_stays_idle_while_anyone_waits() -> None:
    line = queue(slots=4, max_active_per_user=1)
    alice = [line.enter("g", "alice") for _ in range(3)]
    bob = [line.enter("g", "bob") for _ in range(3)]
    assert line.active == 4 and line.waiting == 2
    assert len(granted(alice)) + len(granted(bob)) == 4


def test_bounds_answer_busy_at_once() -> None:
    line = queue(slots=1, max_queued=3, max_waiting_per_user=2)
    line.enter("g", "alice")  # running
    line.enter("g", "alice")
    line.enter("g", "alice")
    with pytest.raises(QueueFullError) as mine:
        line.enter("g", "alice")
    assert mine.value.per_user and "You already have 2 messages waiting" in str(mine.value)
    line.enter("g", "bob")
    with pytest.raises(QueueFullError) as everyone:
        line.enter("g", "carol")
    assert not everyone.value.per_user
    assert line.waiting == 3


def test_leaving_the_line_frees_the_place_and_moves_the_others() -> None:
    line = queue(slots=1)
    running = line.enter("g", "alice")
    first, second = line.enter("g", "bob"), line.enter("g", "carol")
    assert line.ahead(second) == 1
    line.leave(first)  # Stop pressed while it waited
    line.leave(first)  # idempotent
    assert line.ahead(second) == 0 and line.waiting == 1
    line.leave(running)
    assert second.granted and line.active == 1


async def test_waiting_reports_the_line_moving_until_granted() -> None:
    line = queue(slots=1)
    running = line.enter("g", "alice")
    carol, dave = line.enter("x", "carol"), line.enter("y", "dave")
    bob = line.enter("z", "bob")
    assert line.ahead(bob) == 2
    moves: list[int] = []

    async def follow() -> None:
        async for ahead in line.moves(bob):
            moves.append(ahead)

    waiter = asyncio.create_task(follow())
    await asyncio.sleep(0)
    line.leave(carol)  # stopped while waiting
    await asyncio.sleep(0)
    line.leave(running)  # dave gets the slot
    await asyncio.sleep(0)
    assert dave.granted and not bob.granted
    line.leave(dave)
    await asyncio.wait_for(waiter, 1)
    assert moves == [2, 1, 0] and bob.granted and bob.waited_s > 0  # where it stood, then each move


async def test_a_ticket_that_leaves_the_line_stops_waiting() -> None:
    line = queue(slots=1)
    line.enter("g", "alice")
    stopped = line.enter("g", "bob")
    waiter = asyncio.create_task(line.wait(stopped))
    await asyncio.sleep(0)
    line.leave(stopped)
    await asyncio.wait_for(waiter, 1)
    assert not stopped.granted and line.waiting == 0
