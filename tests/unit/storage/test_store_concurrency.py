"""Many coroutines on one store, two stores (as two processes would) on one database, cancellation, and SIGKILL
durability: on both backends."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
from collections import defaultdict

import pytest

from storage import Store
from tests.support import REPO
from tests.support.databases import Database

BASE = 1_000_000_000_000_000_000


async def test_fifty_channels_and_a_hot_channel_written_concurrently(database: Database) -> None:
    channels, per_channel = 50, 40
    hot, hot_writers, per_hot_writer = BASE + 999, 20, 40
    rng = random.Random(7)

    async with database.open() as store:

        async def write_channel(index: int) -> None:
            channel = BASE + index
            for i in range(per_channel):
                await store.append_message(channel, "user" if i % 2 == 0 else "assistant", f"c{index}-{i}")
                if rng.random() < 0.1:
                    await asyncio.sleep(0)

        async def write_hot(writer: int) -> None:
            for i in range(per_hot_writer):
                await store.append_message(hot, "user", f"w{writer}-{i}", author_id=writer)
                if rng.random() < 0.3:
                    await asyncio.sleep(0)

        async def read_while_writing() -> None:
            for _ in range(100):
                history = await store.load_history(hot, 50)
                ids = [m.id for m in history]
                assert ids == sorted(ids)
                await asyncio.sleep(0)

        async def configure_while_writing() -> None:
            for i in range(40):
                await store.update_channel_settings(BASE + i % channels, changed_by=1, temperature=i / 40)

        tasks = [write_channel(i) for i in range(channels)]
        tasks += [write_hot(w) for w in range(hot_writers)]
        tasks += [read_while_writing(), configure_while_writing()]
        rng.shuffle(tasks)
        await asyncio.gather(*tasks)

        for index in range(channels):
            history = await store.load_history(BASE + index, 1000)
            assert [m.content for m in history] == [f"c{index}-{i}" for i in range(per_channel)]
            assert {m.channel_id for m in history} == {BASE + index}

        hot_history = await store.load_history(hot, 10_000)
        assert len(hot_history) == hot_writers * per_hot_writer
        assert len({m.id for m in hot_history}) == len(hot_history)
        by_writer: dict[int, list[str]] = defaultdict(list)
        for message in hot_history:
            by_writer[message.author_id].append(message.content)
        for writer in range(hot_writers):
            assert by_writer[writer] == [f"w{writer}-{i}" for i in range(per_hot_writer)]

    assert await database.count("messages") == channels * per_channel + hot_writers * per_hot_writer


@pytest.mark.parametrize("stores", ["one store", "two stores"])
async def test_resets_and_appends_on_one_channel_interleave_cleanly(stores: str, database: Database) -> None:
    """Two stores are two connections, as two processes have: nothing but the database keeps them in step."""
    channel = BASE + 1
    async with database.open() as first, database.open() as second:
        resetting = first if stores == "one store" else second
        appended: list[int] = []

        async def writer() -> None:
            for i in range(200):
                appended.append((await first.append_message(channel, "user", str(i))).id)

        async def resetter() -> list[int]:
            counts = []
            for _ in range(20):
                counts.append(await resetting.reset(channel))
                await asyncio.sleep(0)
            return counts

        _, counts = await asyncio.gather(writer(), resetter())
        remaining = await first.load_history(channel, 1000)
        # Every message was either hidden by exactly one reset or is still in the history.
        assert sum(counts) + len(remaining) == 200
        assert [m.id for m in remaining] == appended[len(appended) - len(remaining) :]


async def test_cancelled_operations_leave_the_store_usable(store: Store) -> None:
    channel = BASE + 2
    for round_ in range(20):
        tasks = [
            asyncio.create_task(store.update_channel_settings(channel, changed_by=1, top_p=0.5)),
            asyncio.create_task(store.reset(channel)),
            asyncio.create_task(store.append_message(channel, "user", f"r{round_}")),
            asyncio.create_task(store.load_history(channel, 10)),
        ]
        for _ in range(round_ % 4):
            await asyncio.sleep(0)
        for task in tasks[round_ % 2 :: 2]:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    # No transaction was left open and the lock is free: normal work goes on.
    final = await store.append_message(channel, "user", "final")
    assert (await store.load_history(channel, 1))[-1] == final
    settings = await store.update_channel_settings(channel, changed_by=2, max_new_tokens=7)
    assert settings.max_new_tokens == 7


async def test_an_append_is_never_swallowed_by_another_coroutines_rolled_back_transaction(store: Store) -> None:
    """A settings update cancelled mid-transaction rolls back; an append queued meanwhile must not go with it."""
    channel = BASE + 5
    returned = []
    for steps in range(6):
        update = asyncio.create_task(store.update_channel_settings(channel, changed_by=1, top_p=0.5))
        await asyncio.sleep(0)  # the update holds the lock and has queued BEGIN
        append = asyncio.create_task(store.append_message(channel, "user", f"m{steps}"))
        for _ in range(steps):
            await asyncio.sleep(0)
        update.cancel()
        results = await asyncio.gather(update, append, return_exceptions=True)
        if not isinstance(results[1], BaseException):
            returned.append(results[1])
    assert len(returned) == 6
    assert await store.load_history(channel, 100) == returned


async def test_two_stores_on_one_database_both_write(database: Database) -> None:
    """E.g. the bot and `llamacord chat` at once, or two shard processes: both commit, each in its own order."""
    async with database.open() as first, database.open() as second:

        async def write(store: Store, tag: str) -> None:
            for i in range(100):
                await store.append_message(BASE + 3, "user", f"{tag}{i}")
                await store.update_channel_settings(BASE + 4, changed_by=1, temperature=i / 100)

        await asyncio.gather(write(first, "a"), write(second, "b"))
        history = await first.load_history(BASE + 3, 1000)
    assert len(history) == 200
    assert [m.content for m in history if m.content[0] == "a"] == [f"a{i}" for i in range(100)]
    assert [m.content for m in history if m.content[0] == "b"] == [f"b{i}" for i in range(100)]


WRITER = """
import asyncio, sys
from storage import SQLiteStore, open_store

async def main(location, count, synchronous):
    opening = SQLiteStore.open(location, synchronous=synchronous) if synchronous else open_store(location)
    store = await opening
    for i in range(count):
        message = await store.append_message(42, "user", f"durable {i} \\x00 🦙", author_id=i)
        print(message.id, i, flush=True)  # only after the write has returned

asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
"""


@pytest.mark.parametrize(
    ("database", "synchronous"),
    [("sqlite", "NORMAL"), ("sqlite", "FULL"), ("postgres", "")],
    indirect=["database"],
    ids=["sqlite-NORMAL", "sqlite-FULL", "postgres"],
)
def test_every_returned_write_survives_sigkill(database: Database, synchronous: str) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(database.location), "1000000", synchronous],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    watchdog = threading.Timer(120, child.kill)  # reading the pipe has no timeout of its own
    watchdog.start()
    printed: list[tuple[int, int]] = []
    try:
        for line in child.stdout:
            printed.append(tuple(map(int, line.split())))
            if len(printed) == 300:
                child.send_signal(signal.SIGKILL)
                break
        # Lines the child printed before it died are still in the pipe: they count too.
        for line in child.stdout:
            if line.strip():
                printed.append(tuple(map(int, line.split())))
    finally:
        watchdog.cancel()
        child.kill()
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL, child.stderr.read() if child.stderr else ""
    assert len(printed) >= 300

    async def check() -> None:
        async with database.open() as store:
            history = await store.load_history(42, 2_000_000)
        stored = {m.id: m for m in history}
        for message_id, i in printed:
            assert message_id in stored, f"write {i} (id {message_id}) returned but is gone after SIGKILL"
            assert stored[message_id].content == f"durable {i} \x00 🦙"
            assert stored[message_id].author_id == i
        # The order of writes is the order of ids, with nothing missing in between.
        assert [m.author_id for m in history][: len(printed)] == list(range(len(printed)))

    asyncio.run(check())
