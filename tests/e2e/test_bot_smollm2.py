"""End to end with a real instruction-tuned model (SmolLM2-135M-Instruct, MODEL=smollm2): the bot remembers what
a user told it in an earlier message of the channel, and forgets it after /reset."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.engine.local.executor import AsyncEngine
from bot.settings import Settings
from tests.support.bot_harness import RecordingEngine, bot_settings, running_bot, wait_for_reply
from tests.support.fake_discord import FakeDiscord

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
