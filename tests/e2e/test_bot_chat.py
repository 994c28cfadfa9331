"""End to end: the real bot and discord.py client against the fake Discord, answering with the tiny Llama.

Chatting: what gets an answer and what does not, histories per channel, streaming and splitting, the Stop button,
no pings, and the busy and error paths.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import discord
import pytest

from bot.chat.pipeline import TRUNCATED_NOTE
from bot.cogs.chat import MAX_WAITING_PER_CHANNEL
from bot.cogs.replying import REPLY_ENDED, STOP_DENIED, STOP_PREFIX
from bot.engine.api import FinishReason
from bot.engine.errors import BUSY_MESSAGE, GenerationError
from bot.engine.local.executor import AsyncEngine
from bot.engine.sampling import SamplingParams
from bot.settings import DEFAULT_SYSTEM_PROMPT
from storage import ReplyMode, Role
from tests.support.bot_harness import (
    EDIT_INTERVAL,
    HeldEngine,
    RecordingEngine,
    RunningBot,
    ScriptedEngine,
    ScriptedStream,
    bot_settings,
    buttons,
    counts_settle,
    errors_counted,
    eventually,
    has_no_pings,
    lively_engine,
    message_bodies,
    press_stop,
    replies_counted,
    running_bot,
    wait_for_reply,
)
from tests.support.fake_discord import INVALID_FORM_BODY, MESSAGE_DEFAULT, FakeDiscord

pytestmark = pytest.mark.asyncio(loop_scope="session")

DISCORD_LIMIT = 2000


def assert_no_pings(fake: FakeDiscord) -> None:
    bodies = message_bodies(fake)
    assert bodies, "the bot posted nothing"
    for path, body in bodies:
        assert has_no_pings(body), f"{path} was sent without allowed_mentions that forbid every ping: {body}"


def fence_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.lstrip().startswith("```")]


async def test_mention_gets_a_reply_posted_then_edited(fake: FakeDiscord, bot: RunningBot) -> None:
    sent = await fake.send_message(fake.alice, "hello there, llama", mention_bot=True)
    posted, stored = await wait_for_reply(fake, bot.store, sent)

    messages_path = f"/channels/{fake.general_id}/messages"
    post = fake.find_calls("POST", messages_path)[0]
    typing = fake.find_calls("POST", f"/channels/{fake.general_id}/typing")
    assert typing and typing[0].time <= post.time, "no typing indicator before the reply"
    assert int(post.json["message_reference"]["message_id"]) == int(sent["id"])
    button = post.json["components"][0]["components"][0]
    assert button["custom_id"] == f"{STOP_PREFIX}{sent['id']}" and button["label"] == "Stop"

    edits = fake.find_calls("PATCH", f"{messages_path}/{posted[0]['id']}")
    assert edits, "the reply was posted but never edited"
    assert buttons(edits[-1].json) == ["Retry"], "the Stop button stayed, or no Retry came, when the reply was done"
    times = [post.time] + [edit.time for edit in edits]
    assert all(later - earlier >= 0.8 * EDIT_INTERVAL for earlier, later in itertools.pairwise(times))

    history = await bot.store.load_history(fake.general_id, 10)
    assert [m.role for m in history] == [Role.USER, Role.ASSISTANT]
    user = history[0]
    assert (user.content, user.author_id, user.author_name, user.message_id) == (
        "hello there, llama",
        fake.alice.id,
        "Alice",
        int(sent["id"]),
    )
    assert stored.content.strip() == posted[0]["content"].strip()
    assert stored.author_id == fake.bot_user.id
    asked = bot.engine.prompt_with("hello there, llama")
    assert asked[0]["role"] == "system" and asked[-1]["role"] == "user" and "Alice" in asked[-1]["content"]
    assert_no_pings(fake)


async def test_reply_to_the_bot_is_answered_and_other_messages_are_not(fake: FakeDiscord, bot: RunningBot) -> None:
    first = await fake.send_message(fake.alice, "start of the story", mention_bot=True)
    posted, _ = await wait_for_reply(fake, bot.store, first)

    answered = await fake.send_message(
        fake.bob, f"tell <@{fake.alice.id}> more", mentions=[fake.alice], reply_to=int(posted[0]["id"])
    )
    await wait_for_reply(fake, bot.store, answered)

    unaddressed = await fake.send_message(fake.bob, "just chatting with friends")
    reply_to_human = await fake.send_message(fake.bob, "agreed, Alice", reply_to=int(first["id"]))
    # Messages in a channel are handled in order, so once this one is answered the two before it were judged.
    marker = await fake.send_message(fake.alice, "and now you", mention_bot=True)
    await wait_for_reply(fake, bot.store, marker)

    assert fake.replies_to(int(unaddressed["id"])) == []
    assert fake.replies_to(int(reply_to_human["id"])) == []
    history = await bot.store.load_history(fake.general_id, 100)
    users = [(m.content, m.author_name) for m in history if m.role is Role.USER]
    assert users == [("start of the story", "Alice"), ("tell @Alice more", "Bobby"), ("and now you", "Alice")]


async def test_each_channel_thread_and_dm_has_its_own_history(fake: FakeDiscord, bot: RunningBot) -> None:
    words = {fake.general_id: "apple", fake.random_id: "banana", fake.thread_id: "cherry", fake.dm_id: "durian"}
    sent = [
        await fake.send_message(fake.alice, f"the password is {word}", channel_id=channel, mention_bot=True)
        for channel, word in words.items()
    ]
    # All four at once: different channels are answered concurrently.
    await asyncio.gather(*(wait_for_reply(fake, bot.store, message) for message in sent))

    for channel, word in words.items():
        history = await bot.store.load_history(channel, 20)
        texts = " ".join(m.content for m in history if m.role is Role.USER)
        assert word in texts
        assert not any(other in texts for other in words.values() if other != word)
        asked = " ".join(m["content"] for m in bot.engine.prompt_with(word))
        assert not any(other in asked for other in words.values() if other != word)


async def test_a_dm_gets_a_reply_without_a_mention(fake: FakeDiscord, bot: RunningBot) -> None:
    sent = await fake.send_message(fake.bob, "hi in private", channel_id=fake.dm_id)
    posted, stored = await wait_for_reply(fake, bot.store, sent)
    assert int(posted[0]["channel_id"]) == fake.dm_id
    history = await bot.store.load_history(fake.dm_id, 10)
    assert [m.content for m in history if m.role is Role.USER] == ["hi in private"]
    assert stored.channel_id == fake.dm_id


async def test_messages_in_one_channel_wait_their_turn(fake: FakeDiscord, bot: RunningBot) -> None:
    first = await fake.send_message(fake.alice, "first question", mention_bot=True)
    second = await fake.send_message(fake.bob, "second question", mention_bot=True)
    await wait_for_reply(fake, bot.store, first)
    await wait_for_reply(fake, bot.store, second)
    history = await bot.store.load_history(fake.general_id, 10)
    assert [(m.role, m.content if m.role is Role.USER else "") for m in history] == [
        (Role.USER, "first question"),
        (Role.ASSISTANT, ""),
        (Role.USER, "second question"),
        (Role.ASSISTANT, ""),
    ]
    # The second prompt was built after the first reply was stored.
    assert [m["role"] for m in bot.engine.prompt_with("second question")][-3:] == ["user", "assistant", "user"]


async def test_an_all_mode_channel_answers_in_arrival_order(fake: FakeDiscord, bot: RunningBot) -> None:
    # Deciding to answer the plain message reads the store; the mention after it must not overtake it meanwhile.
    await bot.store.update_channel_settings(fake.random_id, changed_by=None, reply_mode=ReplyMode.ALL)
    plain = await fake.send_message(fake.alice, "a plain question", channel_id=fake.random_id)
    mention = await fake.send_message(fake.bob, "a question for you", channel_id=fake.random_id, mention_bot=True)
    first, _ = await wait_for_reply(fake, bot.store, plain)
    second, _ = await wait_for_reply(fake, bot.store, mention)
    assert int(first[0]["id"]) < int(second[0]["id"]), "the mention was answered first"
    history = await bot.store.load_history(fake.random_id, 10)
    assert [(m.role, m.content if m.role is Role.USER else "") for m in history] == [
        (Role.USER, "a plain question"),
        (Role.ASSISTANT, ""),
        (Role.USER, "a question for you"),
        (Role.ASSISTANT, ""),
    ]


async def test_a_flooded_channel_tells_messages_past_the_waiting_limit_it_is_busy(
    fake: FakeDiscord, tiny_engine: AsyncEngine, tmp_path: Path
) -> None:
    engine = HeldEngine(tiny_engine, "Noted.")
    async with running_bot(bot_settings(fake, tmp_path / "bot.sqlite3"), engine) as bot:
        await bot.store.update_channel_settings(fake.general_id, changed_by=None, reply_mode=ReplyMode.ALL)
        answered = [await fake.send_message(fake.alice, "message 0")]

        async def first_reply_started() -> bool:
            return bool(engine.streams)

        await eventually(first_reply_started, what="the first reply to start")
        answered += [await fake.send_message(fake.alice, f"message {i}") for i in range(1, MAX_WAITING_PER_CHANNEL + 1)]
        overflow = await fake.send_message(fake.bob, "one too many")
        busy = await fake.wait_until(lambda: fake.replies_to(int(overflow["id"])), what="the busy answer")
        assert busy[0]["content"] == BUSY_MESSAGE
        assert not any(fake.replies_to(int(m["id"])) for m in answered), "the first reply was not held"

        engine.release.set()
        for message in answered:
            await wait_for_reply(fake, bot.store, message)
        history = await bot.store.load_history(fake.general_id, 100)
        assert [m.content for m in history if m.role is Role.USER] == [m["content"] for m in answered]
        await counts_settle(bot, {"completed": len(answered), "busy": 1})
    assert errors_counted(bot) == {"busy": 1}


async def test_bots_webhooks_system_messages_and_its_own_messages_are_ignored(
    fake: FakeDiscord, bot: RunningBot
) -> None:
    # Even in a channel that answers every message.
    await bot.store.update_channel_settings(fake.random_id, changed_by=None, reply_mode=ReplyMode.ALL)
    channel = fake.random_id
    from_bot = await fake.send_message(fake.other_bot, "I am a bot", channel_id=channel, mention_bot=True)
    from_webhook = await fake.send_message(fake.alice, "via webhook", channel_id=channel, webhook=True)
    system = await fake.send_message(fake.alice, "pinned a message", channel_id=channel, message_type=6)
    human = await fake.send_message(fake.alice, "a human speaks", channel_id=channel)
    posted, _ = await wait_for_reply(fake, bot.store, human)

    for ignored in (from_bot, from_webhook, system):
        assert fake.replies_to(int(ignored["id"])) == []
    # Its own reply came back over the gateway too (as on Discord) and got no answer.
    for message in fake.bot_messages(channel):
        assert fake.replies_to(int(message["id"])) == []
    history = await bot.store.load_history(channel, 20)
    assert [m.content for m in history if m.role is Role.USER] == ["a human speaks"]
    assert human["type"] == MESSAGE_DEFAULT and len(posted) == 1


LONG_PROSE = " ".join(f"Sentence number {i} explains one more detail of the plan." for i in range(30))
LONG_CODE = "\n".join(f"    total += compute_step({i}, weights[{i}])  # step {i}" for i in range(70))
LONG_REPLY = f"{LONG_PROSE}\n\n```python\ndef run(weights):\n    total = 0\n{LONG_CODE}\n    return total\n```\n\nDone."


async def test_a_long_reply_continues_in_new_messages_keeping_the_code_block_whole(
    fake: FakeDiscord, tiny_engine: AsyncEngine, tmp_path: Path
) -> None:
    engine = ScriptedEngine(tiny_engine, LONG_REPLY, piece=60)
    async with running_bot(bot_settings(fake, tmp_path / "bot.sqlite3"), engine) as bot:
        sent = await fake.send_message(fake.alice, "write the plan and the code", mention_bot=True)
        posted, stored = await wait_for_reply(fake, bot.store, sent, timeout_s=20)

    assert len(LONG_REPLY) > 2 * DISCORD_LIMIT and len(posted) >= 3
    contents = [m["content"] for m in posted]
    assert all(len(text) <= DISCORD_LIMIT for text in contents)
    for text in contents:  # every message renders on its own: its fences pair up
        assert len(fence_lines(text)) % 2 == 0, text
    assert contents[0].startswith("Sentence number 0")
    assert any(text.startswith("```python\n") for text in contents[1:]), "the code block was not reopened"
    code_lines = [line for text in contents for line in text.splitlines() if "compute_step" in line]
    assert code_lines == LONG_CODE.splitlines(), "code lines were lost, cut or repeated"
    assert contents[-1].endswith("Done.")
    assert stored.content == LONG_REPLY, "the stored reply is not the whole reply"

    # The Stop button always sits on the newest message: it leaves a message before the next one is posted.
    messages_path = f"/channels/{fake.general_id}/messages"
    for index, message in enumerate(posted[1:], start=1):
        post = fake.created_by[int(message["id"])]
        previous_edits = fake.find_calls("PATCH", f"{messages_path}/{posted[index - 1]['id']}")
        assert post.json["components"], "a continuation was posted without the Stop button"
        assert any(e.json["components"] == [] and e.time <= post.time for e in previous_edits)
    for message in posted:  # each message is edited at most once per EDIT_INTERVAL_SECONDS
        edits = [c.time for c in fake.find_calls("PATCH", f"{messages_path}/{message['id']}")]
        assert all(later - earlier >= 0.8 * EDIT_INTERVAL for earlier, later in itertools.pairwise(edits))
    assert_no_pings(fake)


async def test_generated_mentions_never_ping(fake: FakeDiscord, tiny_engine: AsyncEngine, tmp_path: Path) -> None:
    text = f"@everyone @here <@{fake.alice.id}> <@&{fake.moderator_role_id}> look at this"
    engine = ScriptedEngine(tiny_engine, text)
    async with running_bot(bot_settings(fake, tmp_path / "bot.sqlite3"), engine) as bot:
        sent = await fake.send_message(fake.alice, "ping everyone please", mention_bot=True)
        posted, _ = await wait_for_reply(fake, bot.store, sent)
    assert posted[0]["content"] == text
    assert_no_pings(fake)


async def test_a_full_engine_gets_a_short_busy_answer(fake: FakeDiscord, tiny_model_dir: Path, tmp_path: Path) -> None:
    # One batch slot and no queue, taken by a request that runs for seconds (greedy, to the 1,500-token limit).
    async with lively_engine(tiny_model_dir, tmp_path / "model", max_batch_size=1, max_queued_requests=0) as small:
        chat = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": "Alice: talk on"}]
        blocker = small.generate(
            await small.prepare(chat, 1500), SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=1500)
        )
        async with running_bot(bot_settings(fake, tmp_path / "bot.sqlite3"), RecordingEngine(small)) as bot:
            sent = await fake.send_message(fake.alice, "are you there?", mention_bot=True)
            answer = await fake.wait_until(lambda: fake.replies_to(int(sent["id"])), what="the busy answer")
            assert answer[0]["content"] == BUSY_MESSAGE
            assert not answer[0].get("components"), "a busy answer has nothing to stop"
            assert not blocker.finished, "the engine was not full after all: the test proves nothing"
            assert await bot.store.load_history(fake.general_id, 10) == [], "the unanswered message was stored"

            await blocker.cancel()  # the slot is free again: the user asks again and gets a real reply
            again = await fake.send_message(fake.alice, "are you there?", mention_bot=True)
            await wait_for_reply(fake, bot.store, again)
            history = await bot.store.load_history(fake.general_id, 10)
            assert [(m.role, m.message_id) for m in history if m.role is Role.USER] == [(Role.USER, int(again["id"]))]
            asked = bot.engine.prepared[-1]
            assert [m["content"] for m in asked if m["role"] == "user"] == ["Alice: are you there?"]
            await counts_settle(bot, {"busy": 1, "completed": 1})
    assert errors_counted(bot) == {"busy": 1}
    assert_no_pings(fake)


class FailingStream(ScriptedStream):
    """Yields a little text, then fails as a generation error does."""

    async def _deltas(self) -> AsyncIterator[str]:
        yield "Half an answ"
        raise GenerationError("Generation failed. Please try again.")


class FailingEngine(ScriptedEngine):
    """Fails every reply while `failing`, then generates for real."""

    failing = True

    def generate(self, prompt: Any, params: Any) -> Any:
        return FailingStream("", 1, 0) if self.failing else self._engine.generate(prompt, params)


async def test_generation_error_gets_a_short_reply_and_the_bot_goes_on(
    fake: FakeDiscord, tiny_engine: AsyncEngine, tmp_path: Path
) -> None:
    engine = FailingEngine(tiny_engine, "")
    async with running_bot(bot_settings(fake, tmp_path / "bot.sqlite3"), engine) as bot:
        sent = await fake.send_message(fake.alice, "this will fail", mention_bot=True)
        replies = await fake.wait_until(
            lambda: [m for m in fake.replies_to(int(sent["id"])) if "Generation failed" in m["content"]],
            what="the error reply",
        )
        assert replies[0]["content"].startswith("Sorry")
        # The half-written reply lost its Stop button, and nothing half-made was stored as the bot's answer.
        assert not any(m.get("components") for m in fake.bot_messages(fake.general_id))
        history = await bot.store.load_history(fake.general_id, 10)
        assert [m.role for m in history] == [Role.USER]
        assert replies_counted(bot) == {"failed": 1} and errors_counted(bot) == {"generation": 1}
        engine.failing = False
        again = await fake.send_message(fake.alice, "try again", mention_bot=True)
        await wait_for_reply(fake, bot.store, again)


async def test_stop_button_stops_the_reply_for_the_asker_or_a_moderator_only(
    fake: FakeDiscord, engine: RecordingEngine, tiny_engine: AsyncEngine, tmp_path: Path
) -> None:
    # Greedy decoding of this prompt runs to the 1,500-token limit (seconds on a CPU) unless stopped.
    settings = bot_settings(fake, tmp_path / "bot.sqlite3", temperature=0.0, max_new_tokens=1500)
    async with running_bot(settings, engine) as bot:
        for channel, presser in ((fake.general_id, fake.alice), (fake.random_id, fake.moderator)):
            sent = await fake.send_message(fake.alice, "talk for a long time", channel_id=channel, mention_bot=True)
            denied = await press_stop(fake, sent, fake.bob)
            answer = await fake.wait_for_response(denied)
            assert answer["content"] == STOP_DENIED and answer["flags"] & 64
            stream = engine.streams[-1]
            assert not stream.finished, "the reply ended before Stop was pressed: the test proves nothing"

            await press_stop(fake, sent, presser)
            posted, stored = await wait_for_reply(fake, bot.store, sent)
            assert stream.metrics.finish_reason == FinishReason.CANCELLED
            assert stream.metrics.generated_tokens < 1500
            assert tiny_engine.stats().running == 0, "the stopped request still holds its batch slot"
            assert posted[-1]["content"].endswith("*(stopped)*")
            assert [buttons(m) for m in posted][-1] == ["Retry"], "the Stop button stayed"
            # What was shown is kept as the bot's (partial) answer, so the history matches the channel.
            assert stored.content.strip() and stored.content.strip()[:40] in posted[0]["content"]
        await counts_settle(bot, {"cancelled": 2})


async def test_cooldown_keeps_one_user_from_flooding(
    fake: FakeDiscord, engine: RecordingEngine, tmp_path: Path
) -> None:
    settings = bot_settings(fake, tmp_path / "bot.sqlite3", temperature=0.0, user_cooldown_seconds=60)
    async with running_bot(settings, engine) as bot:
        first = await fake.send_message(fake.alice, "one", mention_bot=True)
        await wait_for_reply(fake, bot.store, first)
        flood = await fake.send_message(fake.alice, "two", mention_bot=True)
        slowed = await fake.wait_until(lambda: fake.replies_to(int(flood["id"])), what="the cooldown answer")
        assert slowed[0]["content"].startswith("Slow down") and "s." in slowed[0]["content"]
        other = await fake.send_message(fake.bob, "three", mention_bot=True)  # others are not slowed down
        await wait_for_reply(fake, bot.store, other)
        history = await bot.store.load_history(fake.general_id, 10)
        assert [m.content for m in history if m.role is Role.USER] == ["one", "three"]


async def test_a_message_cut_to_fit_the_prompt_gets_a_notice(fake: FakeDiscord, bot: RunningBot) -> None:
    # The test engine's MAX_PROMPT_TOKENS is 512: this message alone is three times that for the tiny tokenizer.
    long = " ".join(f"word{i}" for i in range(250))
    sent = await fake.send_message(fake.alice, long, mention_bot=True)
    posted, stored = await wait_for_reply(fake, bot.store, sent)
    assert posted[-1]["content"].endswith(TRUNCATED_NOTE.strip())
    assert TRUNCATED_NOTE.strip() not in stored.content, "the notice is the bot's, not the model's"

    # The long message is now old history that no longer fits: dropping it needs no notice.
    short = await fake.send_message(fake.alice, "and a short one", mention_bot=True)
    posted, _ = await wait_for_reply(fake, bot.store, short)
    assert bot.engine.prompts[-1].dropped_messages > 0 and not bot.engine.prompts[-1].truncated
    assert TRUNCATED_NOTE.strip() not in posted[-1]["content"]


async def test_the_fake_refuses_messages_over_discords_limits(fake: FakeDiscord, bot: RunningBot) -> None:
    channel = bot.client.get_channel(fake.general_id)
    assert isinstance(channel, discord.TextChannel)
    too_big: list[dict[str, Any]] = [
        {"content": "x" * (DISCORD_LIMIT + 1)},
        {"embed": discord.Embed(title="x" * 257)},
        {"embed": discord.Embed(description="x" * 4097)},
        {"embed": discord.Embed().add_field(name="name", value="x" * 1025)},
        {"embeds": [discord.Embed(description="x" * 4000), discord.Embed(description="x" * 2001)]},
    ]
    for options in too_big:
        with pytest.raises(discord.HTTPException) as refused:
            await channel.send(**options)
        assert (refused.value.status, refused.value.code) == (400, INVALID_FORM_BODY)
    assert len(fake.rejected) == len(too_big)
    assert (await channel.send("x" * DISCORD_LIMIT)).content == "x" * DISCORD_LIMIT


async def test_a_stop_button_left_from_an_earlier_run_says_the_reply_has_ended(
    fake: FakeDiscord, bot: RunningBot
) -> None:
    # What a reply cut off by a crash leaves on Discord: a message with a live-looking Stop button.
    button = {"type": 2, "style": 4, "label": "Stop", "custom_id": f"{STOP_PREFIX}123456789"}
    left = fake._bot_message(
        fake.general_id, {"content": "Half an ans", "components": [{"type": 1, "components": [button]}]}
    )
    pressed = await fake.press_button(int(left["id"]), button["custom_id"], user=fake.alice)
    answer = await fake.wait_for_response(pressed)
    assert answer["content"] == REPLY_ENDED and answer["flags"] & 64
