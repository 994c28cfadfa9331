"""End to end: files attached to a message, fetched from the fake Discord's CDN by the real bot.

Text files join the user turn (cut with the notice when too long for the prompt); images and other files are only
named, never fetched; a CDN that is slow or fails costs a message at most ATTACHMENT_TIMEOUT_SECONDS, never its
answer, and the channel goes on. One test on SmolLM2 shows a model answering from a file.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.chat.pipeline import TRUNCATED_NOTE
from bot.engine.templating import TRUNCATION_MARKER
from storage import Role, StoredMessage
from tests.support.bot_harness import (
    RecordingEngine,
    RunningBot,
    bot_settings,
    eventually,
    running_bot,
    smollm2_engine,
    wait_for_reply,
)
from tests.support.fake_discord import FakeDiscord, FakeFile

pytestmark = pytest.mark.asyncio(loop_scope="session")

TIMEOUT_S = 1.0  # ATTACHMENT_TIMEOUT_SECONDS in these tests
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"


@pytest.fixture
async def bot(fake: FakeDiscord, engine: RecordingEngine, tmp_path: Path) -> AsyncIterator[RunningBot]:
    settings = bot_settings(fake, tmp_path / "bot.sqlite3", temperature=0.0, attachment_timeout_seconds=TIMEOUT_S)
    async with running_bot(settings, engine) as bot:
        yield bot


async def ask(fake: FakeDiscord, bot: RunningBot, text: str, *files: FakeFile) -> tuple[StoredMessage, str]:
    """Alice mentions the bot with `files`; once answered: her stored turn, and the final text of the reply."""
    sent = await fake.send_message(fake.alice, text, mention_bot=True, attachments=files)
    posted, _ = await wait_for_reply(fake, bot.store, sent)
    history = await bot.store.load_history(fake.general_id, 100)
    question = next(m for m in history if m.message_id == int(sent["id"]))
    assert question.role is Role.USER
    return question, posted[-1]["content"]


def fetched(fake: FakeDiscord) -> list[str]:
    """The names of the files the CDN served, in order."""
    return [fake.cdn[attachment_id].filename for attachment_id in fake.cdn_fetches]


async def test_a_text_file_joins_the_turn_with_its_name(fake: FakeDiscord, bot: RunningBot) -> None:
    notes = FakeFile("notes.txt", b"The barn door is painted green.\nKey: under the mat\n", "text/plain; charset=utf-8")
    question, _ = await ask(fake, bot, "what does my file say?", notes)
    turn = (
        "what does my file say?\n\nnotes.txt (attached):\n```\nThe barn door is painted green.\nKey: under the mat\n```"
    )
    assert question.content == turn
    # The model reads it under Alice's name, the file's lines as written (not quoted as a speaker's).
    assert bot.engine.prepared[-1][-1] == {"role": "user", "content": f"Alice: {turn}"}
    assert fetched(fake) == ["notes.txt"]


async def test_an_edited_message_keeps_its_file_in_the_stored_turn(fake: FakeDiscord, bot: RunningBot) -> None:
    notes = FakeFile("notes.txt", b"The barn door is painted green.\n", "text/plain")
    question, _ = await ask(fake, bot, "what colour is the door?", notes)
    await fake.edit_message(question.message_id, f"<@{fake.bot_user.id}> what colour is the barn door?")

    async def edited() -> StoredMessage | None:
        history = await bot.store.load_history(fake.general_id, 10)
        return next(
            (
                m
                for m in history
                if m.message_id == question.message_id and m.content.startswith("what colour is the barn")
            ),
            None,
        )

    stored = await eventually(edited, what="the edit to be stored")
    assert fetched(fake) == ["notes.txt"]  # read once, when the message came: an edit fetches nothing again
    assert (
        stored.content
        == "what colour is the barn door?\n\nnotes.txt (attached):\n```\nThe barn door is painted green.\n```"
    )


async def test_files_are_fetched_at_once_within_one_timeout(fake: FakeDiscord, bot: RunningBot) -> None:
    # One after another they would need 1.8 s, past the 1 s the message has.
    files = [FakeFile(f"part{i}.md", f"part {i}".encode(), "text/markdown", delay_s=0.6) for i in range(3)]
    question, _ = await ask(fake, bot, "three parts", *files)
    assert all(f"part{i}.md (attached):\n```\npart {i}\n```" in question.content for i in range(3))


async def test_a_file_over_the_size_limit_is_named_and_not_fetched(fake: FakeDiscord, bot: RunningBot) -> None:
    big = FakeFile("big.log", b"x" * 70_000, "text/plain")  # over the default ATTACHMENT_MAX_BYTES (64 KiB)
    question, _ = await ask(fake, bot, "anything odd in this log?", big)
    turn = "anything odd in this log?\n\nbig.log (attached): too large to read (68.4 KB; I read text files up to 64 KB)"
    assert question.content == turn
    assert fetched(fake) == []


async def test_a_file_too_long_for_the_prompt_is_cut_with_the_notice(fake: FakeDiscord, bot: RunningBot) -> None:
    # 3 KB: well within the size limit, but three times the 512-token prompt for the tiny tokenizer.
    words = [f"word{i}" for i in range(400)]
    question, shown = await ask(fake, bot, "summarize please", FakeFile("long.txt", " ".join(words).encode()))
    assert shown.endswith(TRUNCATED_NOTE.strip())
    prompt = bot.engine.prompts[-1]
    read = prompt.messages[-1]["content"]  # as rendered, after the cut
    assert prompt.truncated and TRUNCATION_MARKER.strip() in read
    # The start (the question, the file's name and first words) and the end (its last words) are what it read.
    assert read.startswith("Alice: summarize please\n\nlong.txt (attached):\n```\nword0 word1")
    assert read.endswith("word398 word399\n```") and "word200 " not in read
    # The whole file is stored, without the notice (the bot's, not the model's).
    assert " ".join(words) in question.content and TRUNCATED_NOTE.strip() not in question.content


async def test_a_mention_with_only_an_image_is_answered_without_fetching_it(fake: FakeDiscord, bot: RunningBot) -> None:
    question, shown = await ask(fake, bot, "", FakeFile("photo.png", PNG, "image/png"))
    assert question.content == "photo.png (attached): an image I can't see"
    assert shown.strip()
    assert fetched(fake) == []


@pytest.mark.parametrize(
    "broken",
    [
        FakeFile("late.txt", b"secret words", "text/plain", delay_s=60),
        FakeFile("gone.txt", b"secret words", "text/plain", status=404),
        FakeFile("broken.txt", b"secret words", "text/plain", status=500),
    ],
    ids=["slow", "not found", "server error"],
)
async def test_a_slow_or_failing_cdn_costs_at_most_the_timeout_and_the_channel_goes_on(
    fake: FakeDiscord, bot: RunningBot, broken: FakeFile, caplog: pytest.LogCaptureFixture
) -> None:
    fine = FakeFile("fine.txt", b"all good", "text/plain")
    caplog.set_level(logging.WARNING, logger="bot.cogs.reading")
    asked = time.monotonic()
    question, _ = await ask(fake, bot, "two files", broken, fine)
    # The answer began (the typing indicator) once the files were read or given up on, within the timeout.
    typing = fake.find_calls("POST", f"/channels/{fake.general_id}/typing")[0]
    assert typing.time - asked < TIMEOUT_S + 2.0
    if broken.delay_s:
        assert typing.time - asked >= TIMEOUT_S, "the slow file was not waited for"
    unread = f"{broken.filename} (attached): could not be downloaded"
    assert question.content == f"two files\n\nfine.txt (attached):\n```\nall good\n```\n\n{unread}"
    assert sorted(fetched(fake)) == sorted([broken.filename, "fine.txt"])
    # Logged as a warning, by ids: neither the file's name nor its content.
    (record,) = [r for r in caplog.records if r.name == "bot.cogs.reading"]
    assert record.levelno == logging.WARNING and "could not be downloaded" in record.getMessage()
    assert broken.filename not in record.getMessage() and "secret" not in record.getMessage()

    later, _ = await ask(fake, bot, "still there?")
    assert later.content == "still there?"


@pytest.mark.smollm2
async def test_smollm2_answers_from_an_attached_file(
    fake: FakeDiscord, smollm2_cache_dir: Path, tmp_path: Path
) -> None:
    async with smollm2_engine(smollm2_cache_dir) as smollm2:
        engine = RecordingEngine(smollm2)
        settings = bot_settings(fake, tmp_path / "bot.sqlite3", temperature=0.0, max_new_tokens=40)
        async with running_bot(settings, engine) as bot:
            secret = FakeFile("secret.txt", b"The secret password is PLUM-42.\n", "text/plain; charset=utf-8")
            sent = await fake.send_message(
                fake.alice,
                "According to my attached file, what is the secret password?",
                mention_bot=True,
                attachments=[secret],
            )
            _, answer = await wait_for_reply(fake, bot.store, sent, timeout_s=120)
    assert "PLUM-42" in answer.content, f"the bot did not read the file: {answer.content!r}"
