"""End to end: many replies streaming at once stay under Discord's global rate limit, and new replies and command
answers are not held up behind the streaming edits.

The fake's global limit is lowered (and the bot's budget with it) so that 30 channels overrun it many times over
while the test stays short: each reply's text arrives over two seconds and the bot edits at EDIT_INTERVAL (50 ms),
so unpaced they would ask for about 600 edits a second.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot.engine.local.executor import AsyncEngine
from tests.support.bot_harness import ScriptedEngine, ScriptedStream, bot_settings, running_bot, wait_for_reply
from tests.support.fake_discord import FakeDiscord, RestCall

pytestmark = pytest.mark.asyncio(loop_scope="session")

LIMIT = 25  # the fake's global limit, requests a second
PACE = 20  # the bot's DISCORD_REQUESTS_PER_SECOND
STREAMING = 25  # channels whose replies are streaming when the others ask
LATE = 5  # channels that ask while they stream
TEXT = " ".join(f"Word {i} of a reply that streams for two seconds." for i in range(30))
STREAM_SECONDS = 2.0
# Streaming edits that may reach Discord between a late reply's first text and its first message: the one in
# flight, and the share edits keep while first messages wait (one turn in EDIT_EVERY). Behind the edits, it would
# be about one for each streaming reply.
EDITS_AHEAD_AT_MOST = 4


class TimedStream(ScriptedStream):
    """The text arrives at a steady rate whether or not the reader keeps up, as an engine's does, and notes when
    the first of it came."""

    first_at: float | None = None

    async def _deltas(self) -> AsyncIterator[str]:
        start = time.monotonic()
        while self.yielded < len(self.text) and not self.cancelled:
            due = min(len(self.text), int((time.monotonic() - start) / STREAM_SECONDS * len(self.text)) + 1)
            if due > self.yielded:
                delta, self.yielded = self.text[self.yielded : due], due
                self.first_at = self.first_at or time.monotonic()
                yield delta
            await asyncio.sleep(self.pause_s)


class TimedEngine(ScriptedEngine):
    """Streams `TEXT` as a `TimedStream`, found by the question it answers."""

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine, TEXT, pause_s=0.01)
        self.by_question: dict[str, TimedStream] = {}

    def generate(self, prompt: Any, params: Any) -> TimedStream:
        chat = self.prepared[next(i for i, made in enumerate(self.prompts) if made is prompt)]
        stream = TimedStream(self.text, self.piece, self.pause_s)
        self.by_question[chat[-1]["content"]] = stream
        self.streams.append(stream)
        return stream

    def stream_for(self, question: str) -> TimedStream:
        return next(stream for asked, stream in self.by_question.items() if asked.endswith(question))


def question(channel_id: int) -> str:
    return f"a question in channel {channel_id}"


def streaming_edits_between(fake: FakeDiscord, start: float, end: float) -> list[RestCall]:
    """The edits that kept a reply's Stop button (not the last one, which takes it off), in (start, end)."""
    return [c for c in fake.calls if c.method == "PATCH" and (c.json or {}).get("components") and start < c.time < end]


async def test_many_streams_stay_under_the_global_limit_and_first_messages_go_first(
    tiny_engine: AsyncEngine, tmp_path: Path
) -> None:
    async with FakeDiscord(global_limit=LIMIT) as fake:
        channels = [fake.add_channel(f"load-{index}") for index in range(STREAMING + LATE)]
        engine = TimedEngine(tiny_engine)
        settings = bot_settings(
            fake,
            tmp_path / "bot.sqlite3",
            discord_requests_per_second=PACE,
            max_batch_size=STREAMING + LATE,
            max_queued_requests=STREAMING + LATE,
            max_active_per_user=STREAMING + LATE,
        )
        async with running_bot(settings, engine) as bot:
            assert bot.client.pacer is not None

            async def ask(channel_id: int) -> dict[str, Any]:
                return await fake.send_message(
                    fake.alice, question(channel_id), channel_id=channel_id, mention_bot=True
                )

            streaming = await asyncio.gather(*(ask(channel_id) for channel_id in channels[:STREAMING]))
            await fake.wait_until(
                lambda: all(fake.replies_to(int(message["id"])) for message in streaming),
                timeout_s=15,
                what="the first message of every streaming reply",
            )
            assert bot.client.pacer.waiting >= STREAMING // 2, "the streaming replies did not fill the budget"

            asked_at = time.monotonic()
            info = await fake.slash("info", user=fake.bob, channel_id=channels[0])
            late = await asyncio.gather(*(ask(channel_id) for channel_id in channels[STREAMING:]))
            answer = await fake.wait_for_call("POST", f"/interactions/{info.id}/{info.token}/callback", timeout_s=5)

            replies = await asyncio.gather(
                *(wait_for_reply(fake, bot.store, message, timeout_s=30) for message in [*streaming, *late])
            )

        assert fake.rate_limited == [], f"{len(fake.rate_limited)} requests went over the global limit"
        assert fake.peak_rate() <= LIMIT
        for posted, stored in replies:
            assert [message["content"] for message in posted] == [TEXT] and stored.content == TEXT
        for message in late:
            first_text_at = engine.stream_for(question(int(message["channel_id"]))).first_at
            assert first_text_at is not None
            first_post = fake.created_by[int(fake.replies_to(int(message["id"]))[0]["id"])]
            overtaken = streaming_edits_between(fake, first_text_at, first_post.time)
            assert len(overtaken) <= EDITS_AHEAD_AT_MOST, f"a first message waited behind {len(overtaken)} edits"
        # A command's answer (an interaction callback) does not wait for the budget at all.
        assert len(streaming_edits_between(fake, asked_at, answer.time)) <= EDITS_AHEAD_AT_MOST
