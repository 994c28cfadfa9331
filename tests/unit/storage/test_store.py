"""Store behaviour on both backends (a real SQLite file, a real PostgreSQL database): round trips, ordering, limits,
reset, settings, awkward content. The deletions, edits and the window start are in test_store_deletions.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from storage import ChannelSettings, ReplyMode, Role, Store, StoredMessage, StoreError
from tests.support.databases import Database

CHANNEL = 1_100_000_000_000_000_001  # snowflake-sized ids
OTHER = 1_100_000_000_000_000_002
ALICE = 900_000_000_000_000_001
MOD = 900_000_000_000_000_009


async def test_round_trip_keeps_every_field(store: Store, database: Database) -> None:
    before = datetime.now(UTC)
    written = await store.append_message(
        CHANNEL, "user", "hello there", author_id=ALICE, author_name="Alice", message_id=1_200_000_000_000_000_000
    )
    assert written.id > 0
    assert written.role is Role.USER
    assert before - timedelta(seconds=1) <= written.created_at <= datetime.now(UTC)
    assert written.created_at.tzinfo is not None

    assert await store.load_history(CHANNEL, 10) == [written]
    await store.close()
    async with database.open() as reopened:
        assert await reopened.load_history(CHANNEL, 10) == [written]


async def test_assistant_and_system_messages_without_author(store: Store) -> None:
    system = await store.append_message(CHANNEL, Role.SYSTEM, "be brief")
    reply = await store.append_message(CHANNEL, Role.ASSISTANT, "ok", message_id=5)
    loaded = await store.load_history(CHANNEL, 10)
    assert loaded == [system, reply]
    assert (loaded[0].author_id, loaded[0].author_name, loaded[0].message_id) == (None, None, None)
    assert loaded[1].role == "assistant"


async def test_history_is_chronological_and_limited_to_the_newest(store: Store) -> None:
    written = [await store.append_message(CHANNEL, "user", f"message {i}") for i in range(30)]
    assert [m.content for m in await store.load_history(CHANNEL, 30)] == [f"message {i}" for i in range(30)]
    assert await store.load_history(CHANNEL, 5) == written[-5:]
    assert await store.load_history(CHANNEL, 1) == written[-1:]
    assert await store.load_history(CHANNEL, 1000) == written
    assert await store.load_history(CHANNEL, 0) == []
    ids = [m.id for m in written]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


async def test_channels_do_not_mix(store: Store) -> None:
    for i in range(10):
        await store.append_message(CHANNEL, "user", f"a{i}")
        await store.append_message(OTHER, "user", f"b{i}")
    assert [m.content for m in await store.load_history(CHANNEL, 100)] == [f"a{i}" for i in range(10)]
    assert [m.content for m in await store.load_history(OTHER, 100)] == [f"b{i}" for i in range(10)]
    assert {m.channel_id for m in await store.load_history(OTHER, 100)} == {OTHER}


async def test_unknown_channel_has_empty_history_and_default_settings(store: Store) -> None:
    assert await store.load_history(424242, 50) == []
    assert await store.reset(424242) == 0
    assert await store.get_channel_settings(424242) == ChannelSettings(channel_id=424242)


AWKWARD = {
    "emoji": "🦙🔥 👩‍👩‍👧‍👦 🏳️‍🌈 🇯🇵 👍🏽",
    "rtl": "שלום עולם — مرحبا بالعالم \u202eevil\u202c \u200f",
    "combining": "e\u0301 n\u0303 Z\u0351\u0307\u0310a\u0344\u0352\u0307l\u0350\u0352g\u0352o\u0301 \u1100\u1161\u11a8",
    "nul_inside": "before\x00after",
    "nul_edges": "\x00starts and ends\x00",
    "only_nul": "\x00\x00\x00",
    "controls": "\t\r\n\x01\x1b[31mred\x7f\u2028\u2029\ufeff",
    "non_bmp": "\U0001d54f\U00010348\U0010fffd",
    "empty": "",
    "whitespace": "   \n\n  ",
    "long": "🦙" + "x" * 99_998 + "\x00",
    "long_mixed": ("ab\x00çé😀שׁ" * 12_500)[:100_000],
}


@pytest.mark.parametrize("name", list(AWKWARD))
async def test_any_unicode_round_trips_exactly(name: str, store: Store, database: Database) -> None:
    content = AWKWARD[name]
    written = await store.append_message(CHANNEL, "user", content, author_id=ALICE, author_name=content[:64])
    await store.close()
    async with database.open() as reopened:
        [loaded] = await reopened.load_history(CHANNEL, 1)
    assert loaded.content == content
    assert len(loaded.content) == len(content)
    assert loaded.author_name == content[:64]
    assert loaded == written


async def test_hundred_thousand_characters_exactly(store: Store) -> None:
    content = "".join(chr(0x4E00 + i % 2000) for i in range(100_000))
    await store.append_message(CHANNEL, "user", content)
    [loaded] = await store.load_history(CHANNEL, 1)
    assert loaded.content == content and len(loaded.content) == 100_000


SQL_LOOKING = [
    "'); DROP TABLE messages; --",
    "Robert'); DROP TABLE channels;--",
    '" OR 1=1 --',
    "%; _ \\ ' \" ` ?1 :name @x $y",
    "SELECT * FROM messages WHERE 1=1; DELETE FROM channels;",
    "?",
]


@pytest.mark.parametrize("text", SQL_LOOKING)
async def test_sql_looking_text_is_stored_verbatim(text: str, store: Store, database: Database) -> None:
    await store.append_message(CHANNEL, "user", text, author_name=text)
    await store.append_message(OTHER, "user", "bystander")
    await store.update_channel_settings(CHANNEL, changed_by=MOD, system_prompt=text)
    [loaded] = await store.load_history(CHANNEL, 5)
    assert (loaded.content, loaded.author_name) == (text, text)
    assert (await store.get_channel_settings(CHANNEL)).system_prompt == text
    assert [m.content for m in await store.load_history(OTHER, 5)] == ["bystander"]
    assert await database.count("messages") == 2  # both tables still there, and nothing else written
    assert await database.count("channels") == 2


async def test_reset_archives_the_conversation(store: Store, database: Database) -> None:
    for i in range(3):
        await store.append_message(CHANNEL, "user", f"old {i}")
    await store.append_message(OTHER, "user", "untouched")

    assert await store.reset(CHANNEL, reset_by=MOD) == 3
    assert await store.load_history(CHANNEL, 50) == []
    assert await store.reset(CHANNEL) == 0  # nothing new since
    assert [m.content for m in await store.load_history(OTHER, 50)] == ["untouched"]

    new = await store.append_message(CHANNEL, "user", "fresh start")
    assert await store.load_history(CHANNEL, 50) == [new]
    assert await store.reset(CHANNEL) == 1

    # Archived, not deleted: the rows are still there for moderation and audit, and the reset is recorded.
    kept = await database.fetch(f"SELECT content FROM messages WHERE channel_id = {CHANNEL} ORDER BY id")
    [(start, reset_at)] = await database.fetch(
        f"SELECT history_start_id, reset_at FROM channels WHERE channel_id = {CHANNEL}"
    )
    assert [content for (content,) in kept] == ["old 0", "old 1", "old 2", "fresh start"]
    assert start == new.id and reset_at is not None

    await store.close()
    async with database.open() as reopened:
        assert await reopened.load_history(CHANNEL, 50) == []
        after = await reopened.append_message(CHANNEL, "user", "after reopen")
        assert await reopened.load_history(CHANNEL, 50) == [after]


async def test_reset_keeps_channel_settings(store: Store) -> None:
    await store.update_channel_settings(CHANNEL, changed_by=MOD, system_prompt="pirate", reply_mode="all")
    await store.append_message(CHANNEL, "user", "arr")
    assert await store.reset(CHANNEL) == 1
    settings = await store.get_channel_settings(CHANNEL)
    assert (settings.system_prompt, settings.reply_mode) == ("pirate", ReplyMode.ALL)


async def test_settings_persist_across_reopen_and_none_restores_default(store: Store, database: Database) -> None:
    assert await store.get_channel_settings(CHANNEL) == ChannelSettings(channel_id=CHANNEL)
    assert (await store.get_channel_settings(CHANNEL)).effective_reply_mode is ReplyMode.MENTION

    before = datetime.now(UTC)
    updated = await store.update_channel_settings(
        CHANNEL, changed_by=MOD, system_prompt="You are a pirate.", temperature=0.2, top_p=0.5, max_new_tokens=64
    )
    assert (updated.system_prompt, updated.temperature, updated.top_p, updated.max_new_tokens) == (
        "You are a pirate.",
        0.2,
        0.5,
        64,
    )
    assert updated.reply_mode is None
    assert updated.updated_by == MOD
    assert updated.updated_at is not None and updated.updated_at >= before - timedelta(seconds=1)

    # Omitted fields stay; only reply_mode changes, and the changer is recorded.
    second = await store.update_channel_settings(CHANNEL, changed_by=ALICE, reply_mode=ReplyMode.ALL)
    assert second.system_prompt == "You are a pirate." and second.temperature == 0.2
    assert second.reply_mode is ReplyMode.ALL and second.effective_reply_mode is ReplyMode.ALL
    assert second.updated_by == ALICE

    await store.close()
    async with database.open() as reopened:
        assert await reopened.get_channel_settings(CHANNEL) == second
        assert await reopened.get_channel_settings(OTHER) == ChannelSettings(channel_id=OTHER)

        # None means "back to the global default".
        third = await reopened.update_channel_settings(CHANNEL, changed_by=MOD, temperature=None, system_prompt=None)
        assert (third.temperature, third.system_prompt) == (None, None)
        assert (third.top_p, third.max_new_tokens, third.reply_mode) == (0.5, 64, ReplyMode.ALL)
        # A required role (a Discord snowflake, past 2**53) is kept exactly.
        role = await reopened.update_channel_settings(CHANNEL, changed_by=MOD, required_role_id=2**62 + 3)
        assert role.required_role_id == 2**62 + 3 and role.top_p == 0.5
        third = await reopened.update_channel_settings(CHANNEL, changed_by=MOD, required_role_id=None)
        assert third.required_role_id is None

    async with database.open() as again:
        assert await again.get_channel_settings(CHANNEL) == third


async def test_settings_edge_values_and_terminal_changer(store: Store) -> None:
    settings = await store.update_channel_settings(
        CHANNEL, changed_by=None, temperature=0, top_p=1, max_new_tokens=8192, system_prompt=""
    )
    assert settings.temperature == 0.0 and settings.top_p == 1.0
    assert settings.max_new_tokens == 8192 and settings.system_prompt == ""
    assert settings.updated_by is None and settings.updated_at is not None
    assert isinstance(settings.temperature, float)
    # No changes: nothing written, current settings returned.
    assert await store.update_channel_settings(CHANNEL, changed_by=MOD) == settings


@pytest.mark.parametrize(
    ("changes", "error", "words"),
    [
        ({"temprature": 0.5}, ValueError, "temprature"),
        ({"history_start_id": 5}, ValueError, "history_start_id"),
        ({"updated_by": 5}, ValueError, "updated_by"),
        ({"temperature": 2.5}, ValueError, "temperature"),
        ({"temperature": -0.1}, ValueError, "temperature"),
        ({"temperature": float("nan")}, ValueError, "temperature"),
        ({"top_p": 0}, ValueError, "top_p"),
        ({"top_p": 1.01}, ValueError, "top_p"),
        ({"max_new_tokens": 0}, ValueError, "max_new_tokens"),
        ({"max_new_tokens": 1.5}, TypeError, "max_new_tokens"),
        ({"reply_mode": "sometimes"}, ValueError, "reply_mode"),
        ({"system_prompt": 7}, TypeError, "system_prompt"),
        ({"temperature": "hot"}, TypeError, "temperature"),
        ({"required_role_id": -1}, ValueError, "required_role_id"),
        ({"required_role_id": "123"}, TypeError, "required_role_id"),
    ],
)
async def test_bad_settings_are_rejected_before_anything_is_written(
    changes: dict[str, object], error: type[Exception], words: str, store: Store
) -> None:
    await store.update_channel_settings(CHANNEL, changed_by=MOD, temperature=1.0, system_prompt="keep me")
    before = await store.get_channel_settings(CHANNEL)
    with pytest.raises(error, match=words):
        await store.update_channel_settings(CHANNEL, changed_by=ALICE, system_prompt="not this", **changes)
    assert await store.get_channel_settings(CHANNEL) == before


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda s: s.append_message(CHANNEL, "moderator", "x"), ValueError),
        (lambda s: s.append_message(-1, "user", "x"), ValueError),
        (lambda s: s.append_message(2**64, "user", "x"), ValueError),
        (lambda s: s.append_message("123", "user", "x"), TypeError),
        (lambda s: s.append_message(True, "user", "x"), TypeError),
        (lambda s: s.append_message(CHANNEL, "user", b"bytes"), TypeError),
        (lambda s: s.append_message(CHANNEL, "user", None), TypeError),
        (lambda s: s.append_message(CHANNEL, "user", "x", author_id="alice"), TypeError),
        (lambda s: s.load_history(CHANNEL, -1), ValueError),
        (lambda s: s.load_history(CHANNEL, 2.0), TypeError),
        (lambda s: s.update_channel_settings(CHANNEL, changed_by="mod", temperature=1.0), TypeError),
    ],
)
async def test_bad_arguments_raise_and_write_nothing(
    call, error: type[Exception], store: Store, database: Database
) -> None:
    with pytest.raises(error):
        await call(store)
    assert await database.count("messages") == 0
    assert await database.count("channels") == 0


async def test_ids_keep_increasing_across_reopen(database: Database) -> None:
    async with database.open() as first:
        a = await first.append_message(CHANNEL, "user", "a")
    store = await database.open()
    try:
        b = await store.append_message(CHANNEL, "user", "b")
    finally:
        await store.close()
    assert b.id > a.id


async def test_closed_store_raises_store_error(database: Database) -> None:
    store = await database.open()
    await store.close()
    await store.close()  # twice is fine
    assert store.closed
    with pytest.raises(StoreError, match="closed"):
        await store.load_history(CHANNEL, 1)
    with pytest.raises(StoreError, match="closed"):
        await store.append_message(CHANNEL, "user", "x")


async def test_store_is_its_own_async_context_manager(database: Database) -> None:
    store = await database.open()
    async with store:
        message = await store.append_message(CHANNEL, "user", "x")
    assert store.closed
    assert isinstance(message, StoredMessage)
