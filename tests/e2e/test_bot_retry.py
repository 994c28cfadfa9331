"""End to end: the Retry button (issue 14, item 6). The newest reply in a channel carries it; the asker or a
moderator may press it; it answers the same user turn again in the same messages and replaces the stored reply; it
leaves a reply once a newer turn exists, and works after a restart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bot.cogs.replying import RETRY_DENIED, RETRY_PREFIX, RETRY_STALE
from bot.engine.local.executor import AsyncEngine
from storage import Role
from tests.support.bot_harness import (
    RunningBot,
    ScriptedEngine,
    ScriptedStream,
    bot_settings,
    buttons,
    eventually,
    running_bot,
    wait_for_reply,
)
from tests.support.fake_discord import EPHEMERAL_FLAG, FakeDiscord, FakeUser

pytestmark = pytest.mark.asyncio(loop_scope="session")


class TakesEngine(ScriptedEngine):
    """Real prompts; the n-th reply is `texts[n]` (the last one again after that)."""

    def __init__(self, engine: AsyncEngine, texts: list[str]) -> None:
        super().__init__(engine, texts[0])
        self.texts = texts

    def generate(self, prompt: Any, params: Any) -> ScriptedStream:
        text = self.texts[min(len(self.streams), len(self.texts) - 1)]
        stream = ScriptedStream(text, self.piece, self.pause_s)
        self.streams.append(stream)
        return stream


async def press_retry(fake: FakeDiscord, message: dict[str, Any], question: dict[str, Any], user: FakeUser) -> Any:
    """`user` presses Retry (of the reply to `question`) on one of the bot's messages."""
    return await fake.press_button(int(message["id"]), f"{RETRY_PREFIX}{question['id']}", user=user)


async def told(fake: FakeDiscord, pressed: Any) -> dict[str, Any]:
    """The ephemeral follow-up the bot sent after acknowledging a press."""

    def followup() -> dict[str, Any] | None:
        posts = [c for c in fake.interaction_calls(pressed) if c.method == "POST" and "/webhooks/" in c.path]
        return posts[0].json if posts else None

    return await fake.wait_until(followup, what="the bot's answer to the press")


async def stored_reply(bot: RunningBot, channel_id: int) -> Any:
    return [m for m in await bot.store.load_history(channel_id, 10) if m.role is Role.ASSISTANT][-1]


async def test_retry_answers_again_in_the_same_message_for_the_asker_or_a_moderator_only(
    fake: FakeDiscord, tiny_engine: AsyncEngine, tmp_path: Path
) -> None:
    engine = TakesEngine(tiny_engine, ["First answer.", "Second answer.", "Third answer."])
    async with running_bot(bot_settings(fake, tmp_path / "bot.sqlite3"), engine) as bot:
        question = await fake.send_message(fake.alice, "tell me something", mention_bot=True)
        [first], stored = await wait_for_reply(fake, bot.store, question)
        assert (first["content"], buttons(first)) == ("First answer.", ["Retry"])

        denied = await told(fake, await press_retry(fake, first, question, fake.bob))
        assert denied["content"] == RETRY_DENIED and denied["flags"] & EPHEMERAL_FLAG
        assert len(engine.streams) == 1 and (await stored_reply(bot, fake.general_id)).content == "First answer."

        for presser, expected in ((fake.alice, "Second answer."), (fake.moderator, "Third answer.")):
            await press_retry(fake, first, question, presser)

            async def replaced(text: str = expected) -> bool:
                return (await stored_reply(bot, fake.general_id)).content == text

            await eventually(replaced, what=f"the stored reply to become {expected!r}")
            shown = fake.messages[int(first["id"])]  # the same message, edited
            assert (shown["content"], buttons(shown)) == (expected, ["Retry"])
            again = await stored_reply(bot, fake.general_id)
            assert (again.id, again.message_id, again.reply_to_id) == (stored.id, int(first["id"]), stored.reply_to_id)
        # Each retry was prompted with the same conversation as the first answer.
        assert engine.prepared[1] == engine.prepared[2] == engine.prepared[0]
        history = await bot.store.load_history(fake.general_id, 10)
        assert [m.role for m in history] == [Role.USER, Role.ASSISTANT]


async def test_a_newer_turn_takes_the_button_off_and_one_left_from_before_a_restart_is_stale(
    fake: FakeDiscord, tiny_engine: AsyncEngine, tmp_path: Path
) -> None:
    database = tmp_path / "bot.sqlite3"
    engine = TakesEngine(tiny_engine, ["An answer."])
    async with running_bot(bot_settings(fake, database), engine) as bot:
        first = await fake.send_message(fake.alice, "one", mention_bot=True)
        [old], _ = await wait_for_reply(fake, bot.store, first)
        second = await fake.send_message(fake.alice, "two", mention_bot=True)
        [kept], _ = await wait_for_reply(fake, bot.store, second)
        await fake.wait_until(lambda: not buttons(fake.messages[int(old["id"])]), what="Retry to leave the old reply")
        assert buttons(fake.messages[int(kept["id"])]) == ["Retry"]
    # A restarted bot does not know which message had the button: a newer turn leaves it on `kept`.
    async with running_bot(bot_settings(fake, database), engine) as bot:
        third = await fake.send_message(fake.alice, "three", mention_bot=True)
        await wait_for_reply(fake, bot.store, third)
        assert buttons(fake.messages[int(kept["id"])]) == ["Retry"]
        stale = await told(fake, await press_retry(fake, kept, second, fake.alice))
        assert stale["content"] == RETRY_STALE and stale["flags"] & EPHEMERAL_FLAG
        await fake.wait_until(lambda: not buttons(fake.messages[int(kept["id"])]), what="the stale button to go")
        assert len(engine.streams) == 3


async def test_retrying_a_long_reply_reuses_its_messages_and_deletes_the_rest(
    fake: FakeDiscord, tiny_engine: AsyncEngine, tmp_path: Path
) -> None:
    long = " ".join(f"word{i}" for i in range(700))  # three messages
    engine = TakesEngine(tiny_engine, [long, "Short now."])
    async with running_bot(bot_settings(fake, tmp_path / "bot.sqlite3"), engine) as bot:
        question = await fake.send_message(fake.alice, "talk a lot", mention_bot=True)
        parts, stored = await wait_for_reply(fake, bot.store, question)
        assert len(parts) == 3 and buttons(parts[-1]) == ["Retry"]
        await press_retry(fake, parts[-1], question, fake.alice)

        await fake.wait_until(lambda: int(parts[2]["id"]) in fake.deleted, what="the surplus messages to go")
        assert {int(parts[1]["id"]), int(parts[2]["id"])} <= fake.deleted
        shown = fake.messages[int(parts[0]["id"])]
        assert (shown["content"], buttons(shown)) == ("Short now.", ["Retry"])
        assert await bot.store.discord_message_ids(stored.id) == [int(parts[0]["id"])]
        assert (await stored_reply(bot, fake.general_id)).content == "Short now."


async def test_retry_works_on_the_newest_reply_after_a_restart(
    fake: FakeDiscord, tiny_engine: AsyncEngine, tmp_path: Path
) -> None:
    database = tmp_path / "bot.sqlite3"
    async with running_bot(bot_settings(fake, database), TakesEngine(tiny_engine, ["Before."])) as bot:
        question = await fake.send_message(fake.alice, "hello", mention_bot=True)
        [reply], _ = await wait_for_reply(fake, bot.store, question)
    async with running_bot(bot_settings(fake, database), TakesEngine(tiny_engine, ["After."])) as bot:
        await fake.wait_for_ready(2)
        await press_retry(fake, reply, question, fake.alice)

        async def replaced() -> bool:
            return (await stored_reply(bot, fake.general_id)).content == "After."

        await eventually(replaced, what="the retried reply to be stored")
        assert fake.messages[int(reply["id"])]["content"] == "After."
