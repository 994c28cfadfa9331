"""The process's request budget: its rate, its priorities, fairness between streams, and no starvation of edits."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable

import pytest

from bot.pacing import EDIT_EVERY, Pacer, Priority

FAST = 200.0  # turns a second: a 5 ms spacing keeps these tests short


async def turns_in_order(pacer: Pacer, requests: list[tuple[str, Priority, Hashable]]) -> list[str]:
    """Queue `requests` (name, priority, stream) in this order behind a turn just taken; the order they get theirs."""
    order: list[str] = []

    async def one(name: str, priority: Priority, stream: Hashable) -> None:
        await pacer.turn(priority, stream)
        order.append(name)

    await pacer.turn(Priority.FIRST)  # the next turn is one spacing away, so all of these wait in line
    async with asyncio.timeout(5):
        await asyncio.gather(*(one(*request) for request in requests))
    return order


async def test_turns_are_spaced_by_the_rate() -> None:
    pacer = Pacer(FAST)
    loop = asyncio.get_running_loop()
    started = loop.time()
    done: list[float] = []

    async def one(index: int) -> None:
        await pacer.turn(Priority.EDIT if index % 2 else Priority.FIRST, stream=index)
        done.append(loop.time())

    async with asyncio.timeout(5):
        await asyncio.gather(*(one(index) for index in range(30)))
    # The first turn is at once, each later one a spacing after the one before, whatever their priorities.
    assert max(done) - started >= 29 * pacer.spacing, "turns came faster than the rate"


async def test_an_idle_pacer_gives_a_turn_at_once() -> None:
    pacer = Pacer(1.0)  # the next turn would be a second away
    await asyncio.wait_for(pacer.turn(Priority.EDIT, "a"), timeout=0.5)
    second = asyncio.create_task(pacer.turn(Priority.FIRST))
    await asyncio.sleep(0.05)
    assert not second.done(), "a second turn within the spacing"
    second.cancel()


async def test_first_messages_go_before_edits_that_waited_longer() -> None:
    order = await turns_in_order(
        Pacer(FAST),
        [
            ("edit a", Priority.EDIT, "a"),
            ("edit b", Priority.EDIT, "b"),
            ("first 1", Priority.FIRST, None),
            ("first 2", Priority.FIRST, None),
        ],
    )
    assert order == ["first 1", "first 2", "edit a", "edit b"]


async def test_edits_still_get_a_share_under_a_flood_of_first_messages() -> None:
    firsts = [(f"first {i}", Priority.FIRST, None) for i in range(2 * EDIT_EVERY)]
    order = await turns_in_order(Pacer(FAST), [("edit a", Priority.EDIT, "a"), ("edit b", Priority.EDIT, "b"), *firsts])
    assert order.index("edit a") == EDIT_EVERY - 1
    assert order.index("edit b") == 2 * EDIT_EVERY - 1


async def test_streams_take_turns_round_robin() -> None:
    order = await turns_in_order(
        Pacer(FAST),
        [
            ("a1", Priority.EDIT, "a"),
            ("a2", Priority.EDIT, "a"),
            ("a3", Priority.EDIT, "a"),
            ("b1", Priority.EDIT, "b"),
            ("c1", Priority.EDIT, "c"),
        ],
    )
    assert order == ["a1", "b1", "c1", "a2", "a3"]


async def test_a_cancelled_wait_gives_up_its_place() -> None:
    pacer = Pacer(FAST)
    await pacer.turn(Priority.FIRST)
    gone = asyncio.create_task(pacer.turn(Priority.EDIT, "a"))
    kept = asyncio.create_task(pacer.turn(Priority.EDIT, "b"))
    await asyncio.sleep(0)
    assert pacer.waiting == 2
    gone.cancel()
    await asyncio.wait_for(kept, timeout=1)
    assert gone.cancelled()
    assert pacer.waiting == 0
    await asyncio.sleep(pacer.spacing * 2)
    await asyncio.wait_for(pacer.turn(Priority.EDIT, "a"), timeout=0.01)  # idle again: at once


async def test_turn_if_idle_only_takes_a_turn_nobody_waits_for() -> None:
    pacer = Pacer(FAST)
    assert await pacer.turn_if_idle()
    waiting = asyncio.create_task(pacer.turn(Priority.EDIT, "a"))
    await asyncio.sleep(0)
    assert not await pacer.turn_if_idle()
    await asyncio.wait_for(waiting, timeout=1)
    assert await asyncio.wait_for(pacer.turn_if_idle(), timeout=1)


def test_a_rate_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        Pacer(0)
