"""End to end: graceful shutdown (issue 13, item 3).

In process: the chat cog winds down (no new message answered, a reply that finishes within the grace period ends
normally, one that does not is interrupted and stored as far as it got). As a process: `llamacord run` gets SIGTERM
while it streams a reply, and exits cleanly with that reply interrupted, its button gone and its partial text
stored. (A button left by a run that could not clean up, killed, is answered after a restart: `test_bot_chat`.)
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot.chat.pipeline import INTERRUPTED_NOTE
from bot.cogs.chat import ChatCog
from bot.engine.local.executor import AsyncEngine
from storage import Role, open_store
from tests.support import REPO
from tests.support.bot_harness import (
    ScriptedEngine,
    ScriptedStream,
    bot_settings,
    buttons,
    counts_settle,
    reply_done,
    running_bot,
    save_lively_llama,
    wait_for_reply,
)
from tests.support.fake_discord import BOT_TOKEN, FakeDiscord

pytestmark = pytest.mark.asyncio(loop_scope="session")

START_TIMEOUT_S = 120.0  # a fresh process imports torch and loads the model
STOP_TIMEOUT_S = 30.0


class PausingStream(ScriptedStream):
    """Yields its first piece, then nothing until `resume` is set."""

    def __init__(self, text: str) -> None:
        super().__init__(text, piece=6, pause_s=0.005)
        self.resume = asyncio.Event()

    async def _deltas(self) -> AsyncIterator[str]:
        async for delta in super()._deltas():
            yield delta
            await self.resume.wait()

    async def cancel(self) -> None:
        await super().cancel()
        self.resume.set()  # as the engine's streams do, a cancel ends a wait for the next delta


class PausingEngine(ScriptedEngine):
    def generate(self, prompt: Any, params: Any) -> PausingStream:
        stream = PausingStream(self.text)
        self.streams.append(stream)
        return stream


async def test_winding_down_finishes_what_it_can_and_interrupts_the_rest(
    fake: FakeDiscord, tiny_engine: AsyncEngine, tmp_path: Path
) -> None:
    engine = PausingEngine(tiny_engine, "Hello there, how are you today?")
    async with running_bot(bot_settings(fake, tmp_path / "bot.sqlite3"), engine) as bot:
        finishing = await fake.send_message(fake.alice, "short one", mention_bot=True)
        await fake.wait_until(lambda: fake.replies_to(int(finishing["id"])), what="the first reply to start")
        cut = await fake.send_message(fake.bob, "long one", channel_id=fake.random_id, mention_bot=True)
        await fake.wait_until(lambda: fake.replies_to(int(cut["id"])), what="the second reply to start")

        chat = bot.client.get_cog(ChatCog.__cog_name__)
        assert isinstance(chat, ChatCog)
        winding = asyncio.create_task(chat.wind_down(1.0))
        late = await fake.send_message(fake.alice, "anyone there?", channel_id=fake.thread_id, mention_bot=True)
        engine.streams[0].resume.set()  # this one finishes within the grace period
        await asyncio.wait_for(winding, 10)

        done, _ = await wait_for_reply(fake, bot.store, finishing)
        assert done[-1]["content"] == "Hello there, how are you today?"
        interrupted, stored = await wait_for_reply(fake, bot.store, cut)
        assert interrupted[-1]["content"] == "Hello " + INTERRUPTED_NOTE
        assert stored.content == "Hello " and buttons(interrupted[-1]) == ["Retry"]  # no Stop; it may be retried
        assert fake.replies_to(int(late["id"])) == [] and len(engine.streams) == 2
        await counts_settle(bot, {"completed": 1, "cancelled": 1})


async def test_sigterm_interrupts_the_reply_in_progress_stores_it_and_exits_cleanly(
    fake: FakeDiscord, tiny_model_dir: Path, tmp_path: Path
) -> None:
    database = tmp_path / "bot.sqlite3"
    model = save_lively_llama(tiny_model_dir, tmp_path / "model")
    environment = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "DISCORD_TOKEN": BOT_TOKEN,
        "DISCORD_API_BASE_URL": fake.api_base_url,
        "DISCORD_GATEWAY_URL": fake.gateway_url,
        "DATABASE_PATH": str(database),
        "MODEL": str(model),
        "DEVICE": "cpu",
        "TEMPERATURE": "0",
        "MAX_NEW_TOKENS": "1500",  # greedy decoding of this prompt runs that far: seconds, unless interrupted
        "MAX_PROMPT_TOKENS": "512",
        "EDIT_INTERVAL_SECONDS": "0.05",
        "SHUTDOWN_GRACE_SECONDS": "0.2",
    }
    log = tmp_path / "bot.log"
    with log.open("wb") as output:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", "run", cwd=tmp_path, env=environment, stdout=output, stderr=output
        )
    try:
        await fake.wait_for_ready(timeout_s=START_TIMEOUT_S)
        sent = await fake.send_message(fake.alice, "talk for a long time", mention_bot=True)
        await fake.wait_until(lambda: fake.replies_to(int(sent["id"])), what="the reply to start streaming")
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S) == 0, log.read_text()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    posted = reply_done(fake, int(sent["id"]))
    assert posted is not None, "the reply kept its Stop button"
    assert posted[-1]["content"].endswith(INTERRUPTED_NOTE.strip())
    async with open_store(database) as store:
        history = await store.load_history(fake.general_id, 10)
    assert [m.role for m in history] == [Role.USER, Role.ASSISTANT]
    assert history[1].content.strip() and history[1].content.strip()[:30] in posted[0]["content"]
    assert "Traceback" not in log.read_text()
