"""End to end: the slash commands, with the real bot and discord.py client against the fake Discord and the tiny Llama.

Permissions are checked in the bot's code, so each refusal here comes from a member whose `permissions` field
(computed by the fake from its roles) lacks the one the command needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bot.client import COMMAND_FAILED
from bot.engine.local.executor import AsyncEngine
from bot.settings import DEFAULT_SYSTEM_PROMPT
from storage import ReplyMode
from tests.support.bot_harness import (
    RecordingEngine,
    RunningBot,
    bot_settings,
    has_no_pings,
    message_bodies,
    running_bot,
    wait_for_reply,
)
from tests.support.fake_discord import (
    CALLBACK_DEFERRED_MESSAGE,
    CALLBACK_MESSAGE,
    CONTENT_LIMIT,
    EPHEMERAL_FLAG,
    FakeDiscord,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


def ephemeral(answer: dict[str, Any]) -> bool:
    return bool(int(answer.get("flags") or 0) & EPHEMERAL_FLAG)


def embed_fields(answer: dict[str, Any]) -> dict[str, str]:
    return {field["name"]: field["value"] for field in answer["embeds"][0].get("fields", [])}


async def test_commands_are_synced_at_start_up(fake: FakeDiscord, bot: RunningBot) -> None:
    names = {command["name"] for command in fake.commands[None]}
    assert names == {"reset", "system", "config", "info", "tokenize", "forget"}
    config = fake.command("config")
    options = {option["name"]: option for option in config["options"]}
    assert [choice["value"] for choice in options["reply_mode"]["choices"]] == ["mention", "all"]
    assert (options["temperature"]["min_value"], options["temperature"]["max_value"]) == (0.0, 2.0)
    assert config["default_member_permissions"] == str(1 << 5)  # Manage Server, as a hint; the code checks too


async def test_commands_sync_to_the_dev_guild_when_set(
    fake: FakeDiscord, engine: RecordingEngine, database: Path
) -> None:
    async with running_bot(bot_settings(fake, database, dev_guild_id=fake.guild_id), engine):
        assert {command["name"] for command in fake.commands[fake.guild_id]} >= {"reset", "system", "info"}
        interaction = await fake.slash("info", user=fake.alice)
        assert (await fake.wait_for_response(interaction))["embeds"]


async def test_reset_needs_manage_messages_in_a_guild_and_clears_the_channel(
    fake: FakeDiscord, bot: RunningBot
) -> None:
    sent = await fake.send_message(fake.alice, "remember the word giraffe", mention_bot=True)
    await wait_for_reply(fake, bot.store, sent)

    refused = await fake.wait_for_response(await fake.slash("reset", user=fake.alice))
    assert ephemeral(refused) and "Manage Messages" in refused["content"]
    assert len(await bot.store.load_history(fake.general_id, 10)) == 2

    done = await fake.wait_for_response(await fake.slash("reset", user=fake.moderator))
    assert not ephemeral(done) and "cleared (2 messages)" in done["content"]
    assert await bot.store.load_history(fake.general_id, 10) == []

    again = await fake.send_message(fake.alice, "what was the word?", mention_bot=True)
    await wait_for_reply(fake, bot.store, again)
    asked = bot.engine.prompt_with("what was the word?")
    assert [m["role"] for m in asked] == ["system", "user"]
    assert "giraffe" not in " ".join(m["content"] for m in asked)


async def test_reset_denials_are_ephemeral_and_errors_after_the_defer_are_short_and_public(
    fake: FakeDiscord, bot: RunningBot
) -> None:
    denied = await fake.slash("reset", user=fake.alice)
    refused = await fake.wait_for_response(denied)
    assert int(refused["flags"]) == EPHEMERAL_FLAG and "Manage Messages" in refused["content"]
    callbacks = [c.json["type"] for c in fake.interaction_calls(denied) if c.path.endswith("/callback")]
    assert callbacks == [CALLBACK_MESSAGE], "a denial must come before the public defer, or it shows publicly"

    await bot.store.close()  # the reset itself fails from now on
    allowed = await fake.slash("reset", user=fake.moderator)
    failed = await fake.wait_for_response(allowed)
    assert fake.interaction_calls(allowed)[0].json["type"] == CALLBACK_DEFERRED_MESSAGE
    # After the public "thinking…" the error takes its place, in public (Discord ignores `ephemeral` there).
    assert not ephemeral(failed) and failed["content"] == COMMAND_FAILED


async def test_anyone_may_reset_their_dm(fake: FakeDiscord, bot: RunningBot) -> None:
    sent = await fake.send_message(fake.bob, "a private note", channel_id=fake.dm_id)
    await wait_for_reply(fake, bot.store, sent)
    done = await fake.wait_for_response(await fake.slash("reset", user=fake.bob, channel_id=fake.dm_id))
    assert "cleared (2 messages)" in done["content"]
    assert await bot.store.load_history(fake.dm_id, 10) == []


async def test_system_prompt_is_refused_without_permission_stored_with_it_and_survives_a_restart(
    fake: FakeDiscord, engine: RecordingEngine, database: Path
) -> None:
    pirate = "You are a pirate named Zed. Answer like one."
    settings = bot_settings(fake, database, temperature=0.0)
    async with running_bot(settings, engine) as bot:
        refused = await fake.wait_for_response(await fake.slash("system", {"prompt": pirate}, user=fake.alice))
        assert ephemeral(refused) and "Manage Server" in refused["content"]
        assert (await bot.store.get_channel_settings(fake.general_id)).system_prompt is None

        done = await fake.wait_for_response(await fake.slash("system", {"prompt": pirate}, user=fake.moderator))
        assert not ephemeral(done) and pirate in done["content"]
        assert (await bot.store.get_channel_settings(fake.general_id)).system_prompt == pirate
        # Only this channel changed.
        assert (await bot.store.get_channel_settings(fake.random_id)).system_prompt is None

    # A new bot on the same database file: the prompt is still there, and it is what the model is told.
    async with running_bot(settings, engine) as bot:
        await fake.wait_for_ready(2)
        shown = await fake.wait_for_response(await fake.slash("system", user=fake.alice))
        assert ephemeral(shown) and pirate in shown["content"] and "this channel's own" in shown["content"]
        sent = await fake.send_message(fake.alice, "who are you?", mention_bot=True)
        await wait_for_reply(fake, bot.store, sent)
        assert engine.prompt_with("who are you?")[0] == {"role": "system", "content": pirate}

        both = await fake.wait_for_response(
            await fake.slash("system", {"prompt": "x", "reset": True}, user=fake.moderator)
        )
        assert ephemeral(both) and "not both" in both["content"]
        back = await fake.wait_for_response(await fake.slash("system", {"reset": True}, user=fake.moderator))
        assert "default" in back["content"]
        assert (await bot.store.get_channel_settings(fake.general_id)).system_prompt is None
        shown = await fake.wait_for_response(await fake.slash("system", user=fake.alice))
        assert "the default" in shown["content"] and DEFAULT_SYSTEM_PROMPT[:40] in shown["content"]
    assert all(has_no_pings(body) for _, body in message_bodies(fake))


async def test_system_prompt_replies_fit_in_one_message_whatever_the_prompt_looks_like(
    fake: FakeDiscord, bot: RunningBot
) -> None:
    # Quoting puts "> " before every line: a prompt of one-character lines triples, of any line separator too.
    for prompt, line in (("x\n" * 2000, "> x"), ("y\u2028" * 2000, "> y"), ("z" * 4000, "> zzz")):
        done = await fake.wait_for_response(await fake.slash("system", {"prompt": prompt}, user=fake.moderator))
        assert done["content"].startswith(f"System prompt for this channel set:\n{line}")
        shown = await fake.wait_for_response(await fake.slash("system", user=fake.alice))
        assert shown["content"].startswith(f"System prompt (this channel's own):\n{line}")
        assert len(done["content"]) == len(shown["content"]) == CONTENT_LIMIT and shown["content"].endswith("…")
    assert fake.rejected == []


async def test_info_shows_the_model_and_the_queue(fake: FakeDiscord, bot: RunningBot, tiny_engine: AsyncEngine) -> None:
    answer = await fake.wait_for_response(await fake.slash("info", user=fake.alice))
    embed = answer["embeds"][0]
    assert tiny_engine.info.source in embed["description"]
    assert "/" + tiny_engine.info.source not in embed["description"], "the model's path on the host is shown"
    assert f"vocab size:     {tiny_engine.info.vocab_size}" in embed["description"]
    fields = embed_fields(answer)
    assert fields["Waiting"] == "0"
    assert fields["Running"] == "0 of 4"
    assert fields["Queue limit"] == "4"


async def test_config_needs_manage_server_shows_validates_and_changes(fake: FakeDiscord, bot: RunningBot) -> None:
    refused = await fake.wait_for_response(await fake.slash("config", user=fake.alice))
    assert ephemeral(refused) and "Manage Server" in refused["content"]

    shown = await fake.wait_for_response(await fake.slash("config", user=fake.moderator))
    assert ephemeral(shown)
    assert embed_fields(shown) == {
        "reply_mode": "`mention` (default)",
        "temperature": "`0` (default)",
        "top_p": "`0.9` (default)",
        "max_new_tokens": "`24` (default)",
        "role": "anyone (default)",
    }

    for bad, named in (({"top_p": 0.0}, "top_p"), ({"temperature": 5.0, "max_new_tokens": 10}, "temperature")):
        refused = await fake.wait_for_response(await fake.slash("config", bad, user=fake.moderator))
        assert ephemeral(refused) and "Nothing changed" in refused["content"] and named in refused["content"]
    unchanged = await bot.store.get_channel_settings(fake.general_id)
    assert (unchanged.top_p, unchanged.temperature, unchanged.max_new_tokens) == (None, None, None)

    changes = {"reply_mode": "all", "temperature": 0.5, "max_new_tokens": 8}
    done = await fake.wait_for_response(await fake.slash("config", changes, user=fake.moderator))
    assert not ephemeral(done)
    assert embed_fields(done)["reply_mode"] == "`all` (set here)"
    stored = await bot.store.get_channel_settings(fake.general_id)
    assert (stored.reply_mode, stored.temperature, stored.max_new_tokens) == (ReplyMode.ALL, 0.5, 8)

    # Reply mode "all": a message that does not mention the bot is answered, with the channel's token budget.
    sent = await fake.send_message(fake.bob, "anyone around?")
    await wait_for_reply(fake, bot.store, sent)
    assert bot.engine.max_new_tokens[-1] == 8
    assert bot.engine.streams[-1].metrics.generated_tokens <= 8

    await fake.wait_for_response(await fake.slash("config", {"reset": True}, user=fake.moderator))
    reset = await bot.store.get_channel_settings(fake.general_id)
    assert (reset.reply_mode, reset.temperature, reset.max_new_tokens) == (None, None, None)


async def test_tokenize_is_ephemeral_and_shows_the_tokens(
    fake: FakeDiscord, bot: RunningBot, tiny_engine: AsyncEngine
) -> None:
    text = "Hello there! The capital of France is Paris."
    answer = await fake.wait_for_response(await fake.slash("tokenize", {"text": text}, user=fake.alice))
    tokens = tiny_engine.tokenize(text)
    assert ephemeral(answer)
    assert f"**{len(tokens)} tokens**" in answer["content"]
    for token_id, token_text in tokens[:20]:
        assert f"{token_id:>7}  {token_text!r}" in answer["content"]
    assert len(tokens) <= 20 or f"{tokens[20][0]:>7}  " not in answer["content"]


async def test_a_failing_command_gets_an_ephemeral_error_and_the_bot_goes_on(
    fake: FakeDiscord, bot: RunningBot
) -> None:
    await bot.store.close()  # every store call fails from now on
    failed = await fake.wait_for_response(await fake.slash("system", user=fake.alice))
    assert ephemeral(failed) and "went wrong" in failed["content"]
    answer = await fake.wait_for_response(await fake.slash("tokenize", {"text": "still here"}, user=fake.alice))
    assert "tokens" in answer["content"]
