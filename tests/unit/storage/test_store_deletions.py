"""The store's deletions, edits, retried replies and prompt window, on both backends: what Discord's message events,
a Retry button, data-removal requests and a retention policy need from the store."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from storage import Role, Store, StoredMessage, StoreError
from tests.support.databases import Database

CHANNEL = 1_100_000_000_000_000_001
OTHER = 1_100_000_000_000_000_002
ALICE = 900_000_000_000_000_001
BOB = 900_000_000_000_000_002
BOT = 900_000_000_000_000_100


def discord_id(n: int) -> int:
    return 1_300_000_000_000_000_000 + n


async def exchange(
    store: Store, channel: int, author: int, n: int, *, parts: int = 0
) -> tuple[StoredMessage, StoredMessage]:
    """A user turn shown by Discord message `n` and the bot's reply to it, shown by `n + 1` and `parts` more."""
    question = await store.append_message(
        channel, Role.USER, f"question {n}", author_id=author, author_name="someone", message_id=discord_id(n)
    )
    answer = await store.append_message(
        channel,
        Role.ASSISTANT,
        f"answer {n}",
        author_id=BOT,
        message_id=discord_id(n + 1),
        reply_to_id=question.id,
        part_ids=[discord_id(n + 2 + i) for i in range(parts)],
    )
    return question, answer


async def contents(store: Store, channel: int = CHANNEL) -> list[str]:
    return [m.content for m in await store.load_history(channel, 1000)]


async def test_reply_to_and_discord_ids_round_trip(store: Store, database: Database) -> None:
    question, answer = await exchange(store, CHANNEL, ALICE, 10, parts=2)
    assert (question.reply_to_id, answer.reply_to_id) == (None, question.id)
    assert answer.message_id == discord_id(11)
    assert await store.load_history(CHANNEL, 10) == [question, answer]
    mapped = await database.fetch("SELECT discord_message_id, turn_id FROM discord_messages ORDER BY 1")
    assert mapped == [
        (discord_id(10), question.id),
        (discord_id(11), answer.id),
        (discord_id(12), answer.id),
        (discord_id(13), answer.id),
    ]


async def test_a_reply_to_a_turn_that_is_gone_is_refused(store: Store, database: Database) -> None:
    question, _ = await exchange(store, CHANNEL, ALICE, 10)
    assert await store.delete_discord_messages([discord_id(10)]) == 2
    with pytest.raises(StoreError):
        await store.append_message(CHANNEL, Role.ASSISTANT, "too late", reply_to_id=question.id)
    assert await database.count("messages") == 0


# --- delete_discord_messages ----------------------------------------------------------------------------------------


async def test_deleting_a_user_message_deletes_its_turn_and_the_replies_to_it(store: Store, database: Database) -> None:
    await exchange(store, CHANNEL, ALICE, 10, parts=1)
    await exchange(store, CHANNEL, BOB, 20)
    assert await store.delete_discord_messages([discord_id(10)]) == 2
    assert await contents(store) == ["question 20", "answer 20"]
    # Deleted, not archived, and the Discord ids of both turns went with them.
    assert await database.count("messages") == 2
    remaining = {row[0] for row in await database.fetch("SELECT discord_message_id FROM discord_messages")}
    assert remaining == {discord_id(20), discord_id(21)}


@pytest.mark.parametrize("shown_by", [11, 12, 13], ids=["first-message", "second-part", "third-part"])
async def test_deleting_any_message_of_a_reply_deletes_the_reply_only(shown_by: int, store: Store) -> None:
    await exchange(store, CHANNEL, ALICE, 10, parts=2)
    assert await store.delete_discord_messages([discord_id(shown_by)]) == 1
    assert await contents(store) == ["question 10"]
    assert await store.delete_discord_messages([discord_id(11), discord_id(12), discord_id(13)]) == 0


async def test_a_bulk_delete_counts_each_turn_once(store: Store) -> None:
    await exchange(store, CHANNEL, ALICE, 10, parts=2)
    await exchange(store, CHANNEL, BOB, 20)
    await exchange(store, OTHER, BOB, 30)
    # Both messages of the first reply, its question, the second question and an unknown id: four turns.
    deleted = await store.delete_discord_messages([discord_id(i) for i in (12, 13, 10, 20, 999)])
    assert deleted == 4
    assert await contents(store) == []
    assert await contents(store, OTHER) == ["question 30", "answer 30"]


async def test_archived_turns_are_deleted_too(store: Store, database: Database) -> None:
    await exchange(store, CHANNEL, ALICE, 10)
    await store.reset(CHANNEL)
    assert await store.delete_discord_messages([discord_id(10)]) == 2
    assert await database.count("messages") == 0


@pytest.mark.parametrize("ids", [[], [discord_id(999)], (discord_id(998), discord_id(999))])
async def test_deleting_nothing_known_deletes_nothing(ids: list[int], store: Store) -> None:
    await exchange(store, CHANNEL, ALICE, 10)
    assert await store.delete_discord_messages(ids) == 0
    assert await contents(store) == ["question 10", "answer 10"]


# --- edit_discord_message ----------------------------------------------------------------------------------------


async def test_editing_a_user_message_replaces_the_stored_text(store: Store) -> None:
    question, answer = await exchange(store, CHANNEL, ALICE, 10)
    seen: list[str] = []

    def edit(stored: str) -> str:
        seen.append(stored)
        return "edited \x00 🦙 question"

    assert await store.edit_discord_message(discord_id(10), edit) is True
    assert seen == ["question 10"]  # the edit is a function of the stored text
    [edited, unchanged] = await store.load_history(CHANNEL, 10)
    assert edited.content == "edited \x00 🦙 question"
    assert (edited.id, edited.author_id, edited.created_at) == (question.id, question.author_id, question.created_at)
    assert unchanged == answer


async def test_editing_an_unknown_message_or_a_bot_reply_changes_nothing(store: Store) -> None:
    await exchange(store, CHANNEL, ALICE, 10)
    assert await store.edit_discord_message(discord_id(999), lambda stored: "x") is False
    assert await store.edit_discord_message(discord_id(11), lambda stored: "not the bot's words") is False
    assert await contents(store) == ["question 10", "answer 10"]


# --- forget_author -------------------------------------------------------------------------------------------------


async def test_forgetting_an_author_in_one_channel(store: Store) -> None:
    await exchange(store, CHANNEL, ALICE, 10)
    await exchange(store, CHANNEL, BOB, 20)
    await exchange(store, CHANNEL, ALICE, 30)
    await exchange(store, OTHER, ALICE, 40)
    assert await store.forget_author(ALICE, CHANNEL) == 4
    assert await contents(store) == ["question 20", "answer 20"]
    assert await contents(store, OTHER) == ["question 40", "answer 40"]


async def test_forgetting_an_author_everywhere(store: Store, database: Database) -> None:
    await exchange(store, CHANNEL, ALICE, 10)
    await exchange(store, OTHER, ALICE, 20)
    await exchange(store, OTHER, BOB, 30)
    await store.reset(OTHER)
    assert await store.forget_author(ALICE) == 4
    assert await database.count("messages") == 2
    assert await store.forget_author(ALICE) == 0
    assert await store.forget_author(BOT) == 0, "the bot's replies are not user turns; only deleted as replies"


# --- purge_older_than ----------------------------------------------------------------------------------------------


async def test_purging_deletes_every_older_message_archived_ones_included(store: Store, database: Database) -> None:
    await exchange(store, CHANNEL, ALICE, 10)
    await store.reset(CHANNEL)
    await exchange(store, OTHER, BOB, 20)
    cutoff = datetime.now(UTC)
    newer = await store.append_message(CHANNEL, Role.USER, "after the cutoff", message_id=discord_id(30))
    assert await store.purge_older_than(cutoff) == 4
    assert await database.count("messages") == 1
    assert await store.load_history(CHANNEL, 10) == [newer]
    assert await database.fetch("SELECT discord_message_id FROM discord_messages") == [(discord_id(30),)]
    assert await store.purge_older_than(cutoff) == 0


async def test_purging_takes_any_time_zone_and_keeps_a_newer_reply_to_a_purged_question(store: Store) -> None:
    question = await store.append_message(CHANNEL, Role.USER, "old question", message_id=discord_id(10))
    cutoff = datetime.now(UTC)
    answer = await store.append_message(CHANNEL, Role.ASSISTANT, "new answer", reply_to_id=question.id)
    assert await store.purge_older_than(cutoff.astimezone(timezone(timedelta(hours=-5)))) == 1
    [kept] = await store.load_history(CHANNEL, 10)
    assert (kept.id, kept.content, kept.reply_to_id) == (answer.id, "new answer", None)


# --- update_reply ----------------------------------------------------------------------------------------------------


async def test_a_retried_reply_replaces_the_text_and_the_discord_messages(store: Store) -> None:
    question, answer = await exchange(store, CHANNEL, ALICE, 10, parts=2)
    assert await store.discord_message_ids(answer.id) == [discord_id(11), discord_id(12), discord_id(13)]
    await store.update_reply(answer.id, "a better answer", message_id=discord_id(50), part_ids=[discord_id(51)])
    assert await store.discord_message_ids(answer.id) == [discord_id(50), discord_id(51)]
    assert await store.discord_message_ids(answer.id + 1000) == []
    [_, retried] = await store.load_history(CHANNEL, 10)
    assert (retried.id, retried.content, retried.message_id) == (answer.id, "a better answer", discord_id(50))
    assert (retried.reply_to_id, retried.created_at) == (question.id, answer.created_at)
    # The old messages no longer show it; the new ones do.
    assert await store.delete_discord_messages([discord_id(11), discord_id(12), discord_id(13)]) == 0
    assert await store.delete_discord_messages([discord_id(51)]) == 1
    assert await contents(store) == ["question 10"]


async def test_a_retried_reply_may_keep_its_first_message(store: Store) -> None:
    _, answer = await exchange(store, CHANNEL, ALICE, 10, parts=1)
    await store.update_reply(answer.id, "shorter", message_id=discord_id(11))
    assert await store.delete_discord_messages([discord_id(12)]) == 0
    assert await store.delete_discord_messages([discord_id(11)]) == 1


async def test_updating_a_missing_or_user_turn_changes_nothing(store: Store) -> None:
    question, answer = await exchange(store, CHANNEL, ALICE, 10)
    await store.update_reply(question.id, "not a reply", message_id=None)
    await store.update_reply(answer.id + 1000, "gone", message_id=discord_id(60))
    assert await store.load_history(CHANNEL, 10) == [question, answer]
    assert await store.delete_discord_messages([discord_id(60)]) == 0


# --- window start ------------------------------------------------------------------------------------------------


async def test_the_window_start_bounds_the_history_and_persists(store: Store, database: Database) -> None:
    written = [await store.append_message(CHANNEL, Role.USER, f"m{i}") for i in range(6)]
    assert await store.get_window_start(CHANNEL) == 0
    await store.set_window_start(CHANNEL, written[3].id)
    assert await store.get_window_start(CHANNEL) == written[3].id
    assert await store.load_history(CHANNEL, 100) == written[3:]
    assert await store.load_history(CHANNEL, 2) == written[4:]
    await store.close()
    async with database.open() as reopened:
        assert await reopened.load_history(CHANNEL, 100) == written[3:]
        await reopened.set_window_start(CHANNEL, 0)  # back to the whole history
        assert await reopened.load_history(CHANNEL, 100) == written
    assert await database.count("messages") == 6, "older messages stay stored"


async def test_reset_and_window_start_both_apply(store: Store) -> None:
    written = [await store.append_message(CHANNEL, Role.USER, f"m{i}") for i in range(4)]
    await store.set_window_start(CHANNEL, written[1].id)
    assert await store.reset(CHANNEL) == 4  # counts what reset archived, whatever the window
    assert await store.load_history(CHANNEL, 100) == []
    later = [await store.append_message(CHANNEL, Role.USER, f"n{i}") for i in range(3)]
    assert await store.load_history(CHANNEL, 100) == later  # a window start before the reset point hides nothing
    await store.set_window_start(CHANNEL, later[2].id)
    assert await store.load_history(CHANNEL, 100) == later[2:]


async def test_a_window_start_on_a_new_channel_keeps_its_default_settings(store: Store) -> None:
    await store.set_window_start(OTHER, 7)
    assert await store.get_window_start(OTHER) == 7
    settings = await store.get_channel_settings(OTHER)
    assert settings.system_prompt is None and settings.updated_at is None
    assert await store.get_window_start(CHANNEL) == 0


# --- bad arguments -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda s: s.append_message(CHANNEL, "user", "x", part_ids=[discord_id(2)]), ValueError),
        (lambda s: s.append_message(CHANNEL, "user", "x", message_id=1, part_ids="12"), TypeError),
        (lambda s: s.append_message(CHANNEL, "user", "x", message_id=1, part_ids=[-2]), ValueError),
        (lambda s: s.append_message(CHANNEL, "user", "x", reply_to_id="1"), TypeError),
        (lambda s: s.delete_discord_messages(discord_id(10)), TypeError),
        (lambda s: s.delete_discord_messages("1234"), TypeError),
        (lambda s: s.delete_discord_messages([discord_id(10), 2**64]), ValueError),
        (lambda s: s.edit_discord_message(discord_id(10), None), TypeError),
        (lambda s: s.edit_discord_message(discord_id(10), "text, not a function"), TypeError),
        (lambda s: s.edit_discord_message(discord_id(10), lambda stored: None), TypeError),
        (lambda s: s.forget_author(None), TypeError),
        (lambda s: s.forget_author(ALICE, channel_id=-1), ValueError),
        (lambda s: s.purge_older_than(datetime.now()), ValueError),  # naive: which zone?
        (lambda s: s.purge_older_than("2025-01-01"), TypeError),
        (lambda s: s.update_reply(1, b"bytes", message_id=None), TypeError),
        (lambda s: s.update_reply(1, "x", message_id=None, part_ids=[discord_id(3)]), ValueError),
        (lambda s: s.set_window_start(CHANNEL, -1), ValueError),
        (lambda s: s.set_window_start(CHANNEL, 1.5), TypeError),
        (lambda s: s.get_window_start("channel"), TypeError),
    ],
)
async def test_bad_arguments_raise_and_change_nothing(call, error: type[Exception], store: Store) -> None:
    before = await exchange(store, CHANNEL, ALICE, 10, parts=1)
    with pytest.raises(error):
        await call(store)
    assert await store.load_history(CHANNEL, 10) == list(before)
    assert await store.get_window_start(CHANNEL) == 0


async def test_repeated_discord_ids_are_mapped_once(store: Store, database: Database) -> None:
    turn = await store.append_message(
        CHANNEL, Role.ASSISTANT, "x", message_id=discord_id(1), part_ids=[discord_id(2), discord_id(1), discord_id(2)]
    )
    assert await database.fetch("SELECT discord_message_id, turn_id FROM discord_messages ORDER BY 1") == [
        (discord_id(1), turn.id),
        (discord_id(2), turn.id),
    ]
