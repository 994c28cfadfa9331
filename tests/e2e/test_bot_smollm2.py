"""End to end with a real instruction-tuned model (SmolLM2-135M-Instruct, MODEL=smollm2): the bot starts with every
default setting, remembers what a user told it in an earlier message of the channel, and forgets it after /reset,
after the message is deleted, and after /forget (then it is gone from the database too)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.app import serve
from bot.engine.local.executor import AsyncEngine
from bot.settings import Settings
from storage import Role, open_store
from tests.support.bot_harness import (
    RecordingEngine,
    bot_settings,
    eventually,
    reply_done,
    running_bot,
    wait_for_reply,
)
from tests.support.fake_discord import BOT_TOKEN, FakeDiscord

pytestmark = [pytest.mark.smollm2, pytest.mark.asyncio(loop_scope="session")]

FACT = "My cat is called Zorblax."
QUESTION = "What is my cat called?"


@pytest.fixture(scope="module")
async def smollm2_engine(smollm2_cache_dir: Path) -> AsyncIterator[AsyncEngine]:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        model="smollm2",
        model_cache_dir=smollm2_cache_dir,
        device="cpu",
        max_batch_size=2,
        max_queued_requests=2,
        max_prompt_tokens=1024,
        max_new_tokens=64,
    )
    engine = await AsyncEngine.from_settings(settings)
    yield engine
    await engine.shutdown()


async def test_remembers_a_fact_from_an_earlier_message_until_reset(
    smollm2_engine: AsyncEngine, tmp_path: Path
) -> None:
    engine = RecordingEngine(smollm2_engine)
    async with FakeDiscord() as fake:
        # Greedy decoding, so the answers are the same on every run.
        settings = bot_settings(fake, tmp_path / "bot.sqlite3", temperature=0.0, max_new_tokens=40)
        async with running_bot(settings, engine) as bot:
            told = await fake.send_message(fake.alice, FACT, mention_bot=True)
            await wait_for_reply(fake, bot.store, told, timeout_s=120)

            asked = await fake.send_message(fake.alice, QUESTION, mention_bot=True)
            _, answer = await wait_for_reply(fake, bot.store, asked, timeout_s=120)
            assert "zorblax" in answer.content.lower(), f"the bot forgot the fact: {answer.content!r}"

            reset = await fake.slash("reset", user=fake.moderator)
            assert "cleared" in (await fake.wait_for_response(reset, timeout_s=30))["content"]

            again = await fake.send_message(fake.alice, QUESTION, mention_bot=True)
            _, answer = await wait_for_reply(fake, bot.store, again, timeout_s=120)
            assert "zorblax" not in answer.content.lower(), f"the fact survived /reset: {answer.content!r}"
            # Not luck: the prompt after the reset no longer carries the fact.
            assert not any("Zorblax" in message["content"] for message in engine.prepared[-1])


def rows_containing(database: Path, text: str) -> int:
    """Stored messages holding `text`, archived ones included, read from the file itself."""
    with sqlite3.connect(database) as connection:
        return connection.execute("SELECT count(*) FROM messages WHERE instr(content, ?) > 0", (text,)).fetchone()[0]


@pytest.mark.parametrize("how", ["delete", "forget"])
async def test_a_deleted_or_forgotten_fact_is_gone_from_the_answers_and_the_database(
    smollm2_engine: AsyncEngine, tmp_path: Path, how: str
) -> None:
    engine = RecordingEngine(smollm2_engine)
    database = tmp_path / "bot.sqlite3"
    async with FakeDiscord() as fake:
        settings = bot_settings(fake, database, temperature=0.0, max_new_tokens=40)
        async with running_bot(settings, engine) as bot:
            told = await fake.send_message(fake.alice, FACT, mention_bot=True)
            await wait_for_reply(fake, bot.store, told, timeout_s=120)
            other = await fake.send_message(fake.bob, "I like green tea.", mention_bot=True)
            await wait_for_reply(fake, bot.store, other, timeout_s=120)
            assert rows_containing(database, "Zorblax") >= 1

            if how == "delete":
                await fake.delete_message(int(told["id"]))
            else:
                forgot = await fake.wait_for_response(await fake.slash("forget", user=fake.alice), timeout_s=30)
                assert "removed 2 messages" in forgot["content"]

            async def gone() -> bool:
                return rows_containing(database, "Zorblax") == 0

            await eventually(gone, what="the fact to leave the database")
            asked = await fake.send_message(fake.alice, QUESTION, mention_bot=True)
            _, answer = await wait_for_reply(fake, bot.store, asked, timeout_s=120)
            assert "zorblax" not in answer.content.lower(), f"the bot still knows: {answer.content!r}"
            assert not any("Zorblax" in message["content"] for message in engine.prepared[-1])
            assert rows_containing(database, "green tea") >= 1  # another member's words (and the reply) stay


async def test_the_bot_starts_with_every_default_on_smollm2_and_answers(
    smollm2_cache_dir: Path, tmp_path: Path
) -> None:
    """What a new user meets first: `MODEL=smollm2 llamacord run` with nothing else set but the way to Discord
    (the default MAX_BATCH_SIZE, MAX_PROMPT_TOKENS, MAX_NEW_TOKENS and KV_CACHE_MEMORY included)."""
    database = tmp_path / "llamacord.sqlite3"
    async with FakeDiscord() as fake:
        settings = Settings(
            _env_file=None,  # type: ignore[call-arg]
            model="smollm2",
            discord_token=BOT_TOKEN,
            discord_api_base_url=fake.api_base_url,
            discord_gateway_url=fake.gateway_url,
            database_path=database,
        )
        assert settings.model_cache_dir == smollm2_cache_dir  # the default, where the converted model waits
        stop = asyncio.Event()  # what SIGTERM sets
        task = asyncio.create_task(serve(settings, stop))
        try:
            await fake.wait_for_ready(timeout_s=120)
            sent = await fake.send_message(fake.alice, "Say hello in one short sentence.", mention_bot=True)
            await fake.wait_until(lambda: reply_done(fake, int(sent["id"])), timeout_s=180, what="the reply")
        finally:
            stop.set()
            await asyncio.wait_for(task, 60)
    reply = reply_done(fake, int(sent["id"]))
    assert reply and reply[0]["content"].strip() and "Sorry" not in reply[0]["content"]
    async with open_store(database) as store:
        history = await store.load_history(fake.general_id, 10)
    assert [m.role for m in history] == [Role.USER, Role.ASSISTANT]
