"""The bot on PostgreSQL, end to end on the fake Discord: two shard processes (`python -m bot run`, as on two hosts)
share one database, one is killed with SIGKILL mid-reply and restarted, and no stored turn is lost; and a bot whose
database connections are cut keeps answering."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from bot.engine.local.executor import AsyncEngine
from storage import Role, StoredMessage, open_store
from tests.support import REPO
from tests.support.bot_harness import (
    RecordingEngine,
    bot_settings,
    eventually,
    reply_done,
    running_bot,
    save_lively_llama,
    wait_for_reply,
)
from tests.support.databases import cut_store_connections
from tests.support.fake_discord import BOT_TOKEN, FakeDiscord

pytestmark = pytest.mark.asyncio(loop_scope="session")  # the fake Discord serves on the session's loop

START_TIMEOUT_S = 180  # a bot process imports torch and loads the model first (two at once on two CPUs)
REPLY_TIMEOUT_S = 60
STOP_TIMEOUT_S = 30


@pytest.fixture(scope="module")
def lively_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with weights that give non-blank replies (blank ones are not stored)."""
    return save_lively_llama(tiny_model_dir, tmp_path_factory.mktemp("lively-llama"))


@asynccontextmanager
async def shard_process(
    fake: FakeDiscord, database_url: str, model: Path, shard_id: int, log: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    """`python -m bot run` for one of two shards, configured only through its environment, as on its own host."""
    environment = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "DISCORD_TOKEN": BOT_TOKEN,
        "DISCORD_API_BASE_URL": fake.api_base_url,
        "DISCORD_GATEWAY_URL": fake.gateway_url,
        "SHARD_COUNT": "2",
        "SHARD_IDS": str(shard_id),
        "DATABASE_URL": database_url,
        "MODEL": str(model),
        "DEVICE": "cpu",
        "MAX_NEW_TOKENS": "160",
        "MAX_PROMPT_TOKENS": "512",
        "MAX_BATCH_SIZE": "2",
        "EDIT_INTERVAL_SECONDS": "0.05",
    }
    with log.open("ab") as output:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", "run", cwd=log.parent, env=environment, stdout=output, stderr=output
        )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                process.kill()
                await process.wait()


async def converse(fake: FakeDiscord, channel_id: int, text: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Say `text` to the bot in the channel and wait for its finished reply: (the message, the reply's messages)."""
    sent = await fake.send_message(fake.alice, text, channel_id=channel_id, mention_bot=True)
    posted = await fake.wait_until(
        lambda: reply_done(fake, int(sent["id"])), timeout_s=REPLY_TIMEOUT_S, what=f"the reply to {text!r}"
    )
    return sent, posted


async def stored_turns(database_url: str, channel_id: int) -> list[StoredMessage]:
    """Every stored turn of the channel, the ones its prompt window has moved past included."""
    async with open_store(database_url) as store:
        await store.set_window_start(channel_id, 0)
        return await store.load_history(channel_id, 1000)


async def test_two_shard_processes_share_one_database_and_survive_sigkill(
    fake: FakeDiscord, postgres_url: str, lively_model_dir: Path, tmp_path: Path
) -> None:
    guilds = [fake.add_guild(f"guild on shard {shard_id}", shard=(shard_id, 2)) for shard_id in (0, 1)]
    channels = [channel_id for _, channel_id in guilds]
    answered: dict[int, list[tuple[int, int]]] = {channel: [] for channel in channels}  # (user message, reply)

    async def exchange(channel_id: int, text: str) -> None:
        sent, posted = await converse(fake, channel_id, text)
        answered[channel_id].append((int(sent["id"]), int(posted[0]["id"])))

    logs = [tmp_path / f"shard-{shard_id}.log" for shard_id in (0, 1)]
    async with (
        shard_process(fake, postgres_url, lively_model_dir, 0, logs[0]),
        shard_process(fake, postgres_url, lively_model_dir, 1, logs[1]) as second,
    ):
        await fake.wait_for_ready(2, timeout_s=START_TIMEOUT_S)
        for round_ in range(2):  # both processes answer their own guild, writing the one database
            for shard_id, channel_id in enumerate(channels):
                await exchange(channel_id, f"round {round_}, shard {shard_id}")

        # Kill shard 1's process while its next reply streams, once the question is stored (after the first post).
        interrupted = await fake.send_message(fake.alice, "interrupted", channel_id=channels[1], mention_bot=True)
        await fake.wait_until(
            lambda: fake.replies_to(int(interrupted["id"])), timeout_s=REPLY_TIMEOUT_S, what="the reply to start"
        )

        async def question_stored() -> bool:
            return any(m.message_id == int(interrupted["id"]) for m in await stored_turns(postgres_url, channels[1]))

        await eventually(question_stored, timeout_s=REPLY_TIMEOUT_S, what="the interrupted question to be stored")
        second.send_signal(signal.SIGKILL)
        assert await asyncio.wait_for(second.wait(), STOP_TIMEOUT_S) == -signal.SIGKILL

        await exchange(channels[0], "shard 0 goes on alone")  # the other process is untouched
        async with shard_process(fake, postgres_url, lively_model_dir, 1, logs[1]):
            await fake.wait_for_ready(3, timeout_s=START_TIMEOUT_S)
            await exchange(channels[1], "back again")
            await exchange(channels[0], "and shard 0 too")

    # Every answered turn is stored, each user turn before its reply, nothing lost across the kill.
    for channel_id in channels:
        history = await stored_turns(postgres_url, channel_id)
        by_discord_id = {m.message_id: m for m in history}
        for question_id, reply_id in answered[channel_id]:
            question, reply = by_discord_id[question_id], by_discord_id[reply_id]
            assert (question.role, reply.role) == (Role.USER, Role.ASSISTANT)
            assert question.id < reply.id and reply.content.strip()
        ids = [m.id for m in history]
        assert ids == sorted(ids)
    assert len(answered[channels[0]]) == 4 and len(answered[channels[1]]) == 3
    # The interrupted question was stored before the kill and stays (its half reply is not stored).
    killed_channel = await stored_turns(postgres_url, channels[1])
    assert [m.content for m in killed_channel if m.role is Role.USER].count("interrupted") == 1


async def test_the_bot_keeps_answering_when_its_database_connections_are_cut(
    fake: FakeDiscord, tiny_engine: AsyncEngine, postgres_url: str, tmp_path: Path
) -> None:
    settings = bot_settings(fake, tmp_path / "unused.sqlite3", database_url=postgres_url)
    async with running_bot(settings, RecordingEngine(tiny_engine)) as bot:
        first = await fake.send_message(fake.alice, "before the cut", mention_bot=True)
        await wait_for_reply(fake, bot.store, first)
        admin = await asyncpg.connect(postgres_url)
        try:
            cut = await cut_store_connections(admin)
        finally:
            await admin.close()
        assert cut >= 1
        second = await fake.send_message(fake.alice, "after the cut", mention_bot=True)
        await wait_for_reply(fake, bot.store, second)
        history = await bot.store.load_history(fake.general_id, 100)
    assert [m.content for m in history if m.role is Role.USER] == ["before the cut", "after the cut"]
    assert not (tmp_path / "unused.sqlite3").exists(), "DATABASE_URL wins over DATABASE_PATH"
