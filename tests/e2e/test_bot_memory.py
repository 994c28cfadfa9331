"""End to end: what the bot keeps of members' words follows what they do (issue 14): deletions (one message, a
bulk delete, a moderator deleting the bot's reply), edits, /forget, the retention purge, and who may talk to the bot
(ALLOW_DMS, BLOCKED_USER_IDS, a channel's required role).

Row counts come from the database file itself, with archived rows included, so "gone" means deleted, not hidden.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from bot.chat.access import ACCESS_DENIED
from bot.cogs.memory import FORGOTTEN_EVERYWHERE, FORGOTTEN_HERE, MemoryCog
from storage import ReplyMode, Role
from tests.support.bot_harness import RecordingEngine, RunningBot, bot_settings, eventually, running_bot, wait_for_reply
from tests.support.fake_discord import EPHEMERAL_FLAG, FakeDiscord, FakeUser

pytestmark = pytest.mark.asyncio(loop_scope="session")


def rows(database: Path, where: str = "1 = 1", *parameters: Any) -> int:
    """Stored messages matching `where`, archived ones included, read from the file directly."""
    with sqlite3.connect(database) as connection:
        return connection.execute(f"SELECT count(*) FROM messages WHERE {where}", parameters).fetchone()[0]


def containing(database: Path, text: str) -> int:
    return rows(database, "instr(content, ?) > 0", text)


async def say(fake: FakeDiscord, bot: RunningBot, user: FakeUser, text: str, **where: Any) -> tuple[int, int]:
    """`user` says `text` to the bot and waits for the stored reply: (the message's id, the reply's first id)."""
    sent = await fake.send_message(user, text, mention_bot=True, **where)
    posted, _ = await wait_for_reply(fake, bot.store, sent)
    return int(sent["id"]), int(posted[0]["id"])


async def settled(predicate: Any, what: str) -> None:
    async def check() -> bool:
        return bool(predicate())

    await eventually(check, what=what)


async def test_a_deleted_message_takes_its_turn_and_the_reply_out_of_the_database(
    fake: FakeDiscord, bot: RunningBot, database: Path
) -> None:
    fact, _ = await say(fake, bot, fake.alice, "my locker code is 4417")
    await say(fake, bot, fake.bob, "what is the weather like")
    assert containing(database, "4417") == 1 and rows(database) == 4

    await fake.delete_message(fact)
    await settled(lambda: rows(database) == 2, "the turn and its reply to be deleted")
    assert containing(database, "4417") == 0
    history = await bot.store.load_history(fake.general_id, 10)
    assert [m.content for m in history if m.role is Role.USER] == ["what is the weather like"]
    # The next prompt no longer carries it.
    await say(fake, bot, fake.alice, "what did I tell you?")
    assert not any("4417" in message["content"] for message in bot.engine.prepared[-1])


async def test_a_moderator_deleting_the_bots_reply_removes_only_that_turn(
    fake: FakeDiscord, bot: RunningBot, database: Path
) -> None:
    question, reply = await say(fake, bot, fake.alice, "tell me a story")
    await fake.delete_message(reply)
    await settled(lambda: rows(database) == 1, "the reply's turn to be deleted")
    history = await bot.store.load_history(fake.general_id, 10)
    assert [(m.role, m.message_id) for m in history] == [(Role.USER, question)]


async def test_a_bulk_delete_removes_every_stored_turn_it_names(
    fake: FakeDiscord, bot: RunningBot, database: Path
) -> None:
    first = await say(fake, bot, fake.alice, "one")
    second = await say(fake, bot, fake.bob, "two")
    kept = await say(fake, bot, fake.alice, "three")
    # A bulk delete of one question, another's answer, and a message the bot never stored.
    await fake.bulk_delete(fake.general_id, [first[0], second[1], fake.snowflake()])
    await settled(lambda: rows(database) == 3, "the named turns to be deleted")
    history = await bot.store.load_history(fake.general_id, 10)
    assert [(m.role, m.content) for m in history if m.role is Role.USER] == [(Role.USER, "two"), (Role.USER, "three")]
    assert kept[1] in {m.message_id for m in history}


async def test_an_edit_replaces_the_stored_text_and_gets_no_new_answer(
    fake: FakeDiscord, bot: RunningBot, database: Path
) -> None:
    question, _ = await say(fake, bot, fake.alice, "my favourite colour is red")
    replies_before = len(fake.bot_messages(fake.general_id))
    await fake.edit_message(question, f"<@{fake.bot_user.id}> my favourite colour is blue")
    await settled(lambda: containing(database, "blue") == 1, "the edit to be stored")
    assert containing(database, "red") == 0
    history = await bot.store.load_history(fake.general_id, 10)
    assert history[0].content == "my favourite colour is blue"
    await say(fake, bot, fake.bob, "hello")  # a later turn is answered; the edit was not
    assert len(fake.bot_messages(fake.general_id)) == replies_before + 1
    assert bot.engine.prepared[-1][1]["content"] == "Alice: my favourite colour is blue"


async def test_forget_removes_the_members_turns_here_or_everywhere_and_says_how_many(
    fake: FakeDiscord, bot: RunningBot, database: Path
) -> None:
    await say(fake, bot, fake.alice, "secret one")
    await say(fake, bot, fake.bob, "bob was here")
    await say(fake, bot, fake.alice, "secret two", channel_id=fake.random_id)
    await say(fake, bot, fake.alice, "secret three", channel_id=fake.dm_id)

    here = await fake.wait_for_response(await fake.slash("forget", user=fake.alice))
    assert here["content"] == FORGOTTEN_HERE.format(count=2) and here["flags"] & EPHEMERAL_FLAG
    assert containing(database, "secret one") == 0 and containing(database, "secret two") == 1
    assert containing(database, "bob was here") == 1

    everywhere = await fake.wait_for_response(await fake.slash("forget", {"everywhere": True}, user=fake.alice))
    assert everywhere["content"] == FORGOTTEN_EVERYWHERE.format(count=4) and everywhere["flags"] & EPHEMERAL_FLAG
    assert containing(database, "secret") == 0
    assert rows(database, "author_id = ?", fake.alice.id) == 0
    assert rows(database) == 2  # Bob's turn and its reply


async def test_retention_purges_old_and_archived_rows_and_keeps_recent_ones(
    fake: FakeDiscord, engine: RecordingEngine, database: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_bot(bot_settings(fake, database, retention_days=30), engine) as bot:
        cog = bot.client.get_cog(MemoryCog.__cog_name__)
        assert isinstance(cog, MemoryCog) and cog.purging.is_running()
        with monkeypatch.context() as past:  # turns stored 40 days ago, one channel's archived by /reset
            past.setattr("storage.base.now", lambda: datetime.now(UTC) - timedelta(days=40))
            await say(fake, bot, fake.alice, "old and archived")
            await fake.wait_for_response(await fake.slash("reset", user=fake.moderator))
            await say(fake, bot, fake.alice, "old and current", channel_id=fake.random_id)
        await say(fake, bot, fake.alice, "recent")
        assert rows(database) == 6

        assert await cog.purge_expired() == 4
        assert containing(database, "old") == 0 and containing(database, "recent") == 1
        cog.clock = lambda: datetime.now(UTC) + timedelta(days=31)  # a month on, the recent turns expire too
        assert await cog.purge_expired() == 2 and rows(database) == 0


async def test_with_dms_off_a_dm_is_ignored_and_commands_are_refused_except_forget(
    fake: FakeDiscord, engine: RecordingEngine, database: Path
) -> None:
    async with running_bot(bot_settings(fake, database, allow_dms=False), engine) as bot:
        ignored = await fake.send_message(fake.alice, "hello?", channel_id=fake.dm_id)
        refused = await fake.wait_for_response(await fake.slash("info", user=fake.alice, channel_id=fake.dm_id))
        assert refused["content"] == ACCESS_DENIED and refused["flags"] & EPHEMERAL_FLAG
        forgot = await fake.slash("forget", user=fake.alice, channel_id=fake.dm_id)
        assert (await fake.wait_for_response(forgot))["content"] == FORGOTTEN_HERE.format(count=0)
        await say(fake, bot, fake.alice, "in the server then")  # answered; the DM before it was not
        assert fake.replies_to(int(ignored["id"])) == [] and rows(database) == 2


async def test_a_blocked_user_is_ignored_and_refused_everywhere(
    fake: FakeDiscord, engine: RecordingEngine, database: Path
) -> None:
    settings = bot_settings(fake, database, blocked_user_ids=f"{fake.bob.id},1234")
    async with running_bot(settings, engine) as bot:
        ignored = [
            await fake.send_message(fake.bob, "hi", mention_bot=True),
            await fake.send_message(fake.bob, "hi there", channel_id=fake.dm_id),
        ]
        refused = await fake.wait_for_response(await fake.slash("system", user=fake.bob))
        assert refused["content"] == ACCESS_DENIED
        await say(fake, bot, fake.alice, "and me?")
        await say(fake, bot, fake.alice, "and in the DM?", channel_id=fake.dm_id)
        assert all(fake.replies_to(int(m["id"])) == [] for m in ignored)
        assert rows(database, "author_id = ?", fake.bob.id) == 0


async def test_a_channel_role_lets_only_its_members_and_moderators_talk(
    fake: FakeDiscord, engine: RecordingEngine, database: Path
) -> None:
    friends = fake.add_role("Llama friends")
    fake.bob.role_ids.append(friends)
    async with running_bot(bot_settings(fake, database), engine) as bot:
        refused = await fake.wait_for_response(await fake.slash("config", {"role": friends}, user=fake.alice))
        assert "Manage Server" in refused["content"]
        done = await fake.wait_for_response(await fake.slash("config", {"role": friends}, user=fake.moderator))
        assert done["embeds"][0]["fields"][-1]["value"] == f"<@&{friends}> (set here)"
        assert (await bot.store.get_channel_settings(fake.general_id)).required_role_id == friends

        ignored = await fake.send_message(fake.alice, "may I?", mention_bot=True)
        await say(fake, bot, fake.bob, "a friend asks")
        await say(fake, bot, fake.moderator, "a moderator asks")
        assert fake.replies_to(int(ignored["id"])) == []
        await say(fake, bot, fake.alice, "elsewhere", channel_id=fake.random_id)  # only this channel needs it

        everyone = {"role": fake.guild_id}  # @everyone's id is the guild's: anyone may talk again
        await fake.wait_for_response(await fake.slash("config", everyone, user=fake.moderator))
        await say(fake, bot, fake.alice, "now may I?")
        settings = await bot.store.get_channel_settings(fake.general_id)
        assert settings.required_role_id is None and settings.effective_reply_mode is ReplyMode.MENTION
