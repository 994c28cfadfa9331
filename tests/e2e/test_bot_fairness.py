"""Fair turns on the fake Discord: a flood does not hold up a bystander, a waiting message shows its place in line and
becomes the reply, Stop takes it out of the line, and a user's own bound answers busy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bot.chat.pipeline import STOPPED_NOTE, waiting_text
from bot.engine.local.executor import AsyncEngine
from storage import Role
from tests.support.bot_harness import RecordingEngine, bot_settings, press_stop, reply_done, running_bot, wait_for_reply
from tests.support.fake_discord import FakeDiscord

pytestmark = pytest.mark.asyncio(loop_scope="session")

LONG = 1500  # tokens: greedy decoding of these prompts runs to the limit (seconds on a CPU) unless stopped


def first_posted_at(fake: FakeDiscord, message: dict[str, Any]) -> float:
    """When the bot posted its first message in reply to `message` (the fake stamps every REST call)."""
    reply = fake.replies_to(int(message["id"]))[0]
    return fake.created_by[int(reply["id"])].time


async def stop(fake: FakeDiscord, message: dict[str, Any]) -> None:
    """The asker presses Stop on the bot's reply to `message`."""
    await press_stop(fake, message, fake.alice)


async def test_a_bystander_waits_for_one_flood_reply_not_for_the_flood(
    fake: FakeDiscord, tiny_engine: AsyncEngine, tmp_path: Path
) -> None:
    channels = [fake.add_channel(f"flood-{n}") for n in range(5)]
    settings = bot_settings(fake, tmp_path / "bot.sqlite3", max_batch_size=1, max_new_tokens=40, temperature=0.0)
    async with running_bot(settings, RecordingEngine(tiny_engine)):
        flood = [
            await fake.send_message(fake.alice, f"question {n}", channel_id=channel, mention_bot=True)
            for n, channel in enumerate(channels)
        ]
        await fake.wait_until(lambda: fake.replies_to(int(flood[0]["id"])), what="the flood's first reply")
        bystander = await fake.send_message(fake.bob, "just one question", mention_bot=True)
        for message in [bystander, *flood]:
            await fake.wait_until(lambda m=message: reply_done(fake, int(m["id"])), timeout_s=60, what="a reply")
    started = sorted((first_posted_at(fake, m), m["content"]) for m in [*flood, bystander])
    order = [content.removeprefix(f"<@{fake.bot_user.id}> ") for _, content in started]
    # One slot: alice's first question runs, bob's goes next, then the rest of alice's.
    assert order[:2] == ["question 0", "just one question"], order


async def test_a_waiting_message_shows_its_place_and_becomes_the_reply(
    fake: FakeDiscord, tiny_engine: AsyncEngine, tmp_path: Path
) -> None:
    settings = bot_settings(
        fake, tmp_path / "bot.sqlite3", max_batch_size=1, max_new_tokens=LONG, temperature=0.0, queue_notice_seconds=0.1
    )
    async with running_bot(settings, RecordingEngine(tiny_engine)) as bot:
        running = await fake.send_message(fake.alice, "talk for a long time", mention_bot=True)
        await fake.wait_until(lambda: fake.replies_to(int(running["id"])), what="the first reply")
        second = await fake.send_message(fake.bob, "second", channel_id=fake.random_id, mention_bot=True)
        third = await fake.send_message(fake.owner, "third", channel_id=fake.thread_id, mention_bot=True)
        placeholder = (await fake.wait_until(lambda: fake.replies_to(int(third["id"])), what="a placeholder"))[0]
        placeholder_id = int(placeholder["id"])
        assert placeholder["content"] == waiting_text(1) and placeholder["components"], "with its Stop button"

        await stop(fake, running)  # the line moves: the second goes, the third is next
        await fake.wait_until(
            lambda: fake.messages[placeholder_id]["content"] == waiting_text(0), what="the place to move"
        )
        await stop(fake, second)
        posted, stored = await wait_for_reply(fake, bot.store, third, timeout_s=60)
        assert int(posted[0]["id"]) == placeholder_id, "the placeholder became the reply"
        assert posted[0]["content"] not in (waiting_text(0), waiting_text(1))
        assert stored.message_id == placeholder_id


async def test_stop_on_a_waiting_message_frees_its_place(
    fake: FakeDiscord, tiny_engine: AsyncEngine, tmp_path: Path
) -> None:
    settings = bot_settings(
        fake, tmp_path / "bot.sqlite3", max_batch_size=1, max_new_tokens=LONG, temperature=0.0, queue_notice_seconds=0
    )
    engine = RecordingEngine(tiny_engine)
    async with running_bot(settings, engine) as bot:
        running = await fake.send_message(fake.alice, "talk for a long time", mention_bot=True)
        await fake.wait_until(lambda: fake.replies_to(int(running["id"])), what="the first reply")
        waiting = await fake.send_message(fake.alice, "never mind", channel_id=fake.random_id, mention_bot=True)
        await fake.wait_until(
            lambda: (fake.replies_to(int(waiting["id"])) or [{}])[0].get("content") == waiting_text(0),
            what="the placeholder",
        )
        await stop(fake, waiting)
        stopped = await fake.wait_until(lambda: reply_done(fake, int(waiting["id"])), what="the stopped placeholder")
        assert stopped[0]["content"] == STOPPED_NOTE.strip() and not stopped[0]["components"]
        assert len(engine.prepared) == 1, "the stopped message never reached the engine"
        await stop(fake, running)
        await wait_for_reply(fake, bot.store, running)
        history = await bot.store.load_history(fake.random_id, 10)
    assert history == [], "a message stopped while it waited is not stored"
    assert bot.metrics.registry.get_sample_value("llamacord_replies_total", {"outcome": "cancelled"}) == 2


async def test_a_users_own_bound_answers_busy_at_once(
    fake: FakeDiscord, tiny_engine: AsyncEngine, tmp_path: Path
) -> None:
    settings = bot_settings(
        fake, tmp_path / "bot.sqlite3", max_batch_size=1, max_waiting_per_user=1, max_new_tokens=LONG, temperature=0.0
    )
    async with running_bot(settings, RecordingEngine(tiny_engine)) as bot:
        running = await fake.send_message(fake.alice, "talk for a long time", mention_bot=True)
        await fake.wait_until(lambda: fake.replies_to(int(running["id"])), what="the first reply")
        waits = await fake.send_message(fake.alice, "one more", channel_id=fake.random_id, mention_bot=True)
        refused = await fake.send_message(fake.alice, "and another", channel_id=fake.thread_id, mention_bot=True)
        busy = await fake.wait_until(lambda: fake.replies_to(int(refused["id"])), what="the busy answer")
        assert busy[0]["content"] == "You already have a message waiting for an answer. Please wait for those first."
        other = await fake.send_message(fake.bob, "may I?", channel_id=fake.thread_id, mention_bot=True)
        await stop(fake, running)
        await wait_for_reply(fake, bot.store, waits, timeout_s=60)
        await wait_for_reply(fake, bot.store, other, timeout_s=60)  # bob's own bound is untouched
        thread = await bot.store.load_history(fake.thread_id, 10)
    assert [m.content for m in thread if m.role is Role.USER] == ["may I?"]
    assert bot.metrics.registry.get_sample_value("llamacord_requests_refused_total", {"bound": "user"}) == 1
