"""Sharding end to end: the bot on discord.py's AutoShardedBot against the fake Discord, which routes each guild's
events to its shard as Discord does. Two shards in one process answer in a guild of each; SHARD_IDS runs a subset;
SHARD_COUNT=auto takes the count from GET /gateway/bot but keeps DISCORD_GATEWAY_URL."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.client import LlamacordBot, ShardedLlamacordBot
from bot.engine.local.executor import AsyncEngine
from storage import Role
from tests.support.bot_harness import RecordingEngine, bot_settings, running_bot, wait_for_reply
from tests.support.fake_discord import OP_IDENTIFY, FakeDiscord

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture(autouse=True)
def no_identify_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    """discord.py waits 5 s before each IDENTIFY after the first (Discord's identify rate limit); the fake has no
    such limit, so the tests skip the wait."""

    async def identify_at_once(self: LlamacordBot, shard_id: int | None, *, initial: bool = False) -> None:
        return None

    monkeypatch.setattr(ShardedLlamacordBot, "before_identify_hook", identify_at_once)


def identified_shards(fake: FakeDiscord) -> list[list[int]]:
    return sorted(event["d"]["shard"] for event in fake.gateway_events if event["op"] == OP_IDENTIFY)


async def test_two_shards_in_one_process_answer_in_a_guild_of_each(
    fake: FakeDiscord, tiny_engine: AsyncEngine, tmp_path: Path
) -> None:
    guilds = [fake.add_guild(f"guild on shard {shard_id}", shard=(shard_id, 2)) for shard_id in (0, 1)]
    settings = bot_settings(fake, tmp_path / "bot.sqlite3", shard_count=2, temperature=0.0)
    async with running_bot(settings, RecordingEngine(tiny_engine)) as bot:
        assert isinstance(bot.client, ShardedLlamacordBot)
        assert identified_shards(fake) == [[0, 2], [1, 2]]
        assert sorted(bot.client.shards) == [0, 1] and bot.client.gateway_connected()
        for shard_id, (guild_id, channel_id) in enumerate(guilds):
            guild = bot.client.get_guild(guild_id)
            assert guild is not None and guild.shard_id == shard_id
            sent = await fake.send_message(
                fake.alice, f"hello from shard {shard_id}", channel_id=channel_id, mention_bot=True
            )
            posted, stored = await wait_for_reply(fake, bot.store, sent)
            assert posted[0]["content"].strip() and stored.role is Role.ASSISTANT
            assert all(int(message["channel_id"]) == channel_id for message in posted)
    assert bot.metrics.registry.get_sample_value("llamacord_replies_total", {"outcome": "completed"}) == 2


async def test_shard_ids_run_a_subset_of_the_shards(
    fake: FakeDiscord, tiny_engine: AsyncEngine, tmp_path: Path
) -> None:
    (elsewhere, _), (here, channel_id) = (fake.add_guild(f"shard {i}", shard=(i, 2)) for i in (0, 1))
    settings = bot_settings(fake, tmp_path / "bot.sqlite3", shard_count=2, shard_ids=[1])
    async with running_bot(settings, RecordingEngine(tiny_engine)) as bot:
        assert identified_shards(fake) == [[1, 2]]
        assert sorted(bot.client.shards) == [1] and bot.client.gateway_connected()
        assert bot.client.get_guild(here) is not None
        assert bot.client.get_guild(elsewhere) is None, "shard 0's guild belongs to another process"
        sent = await fake.send_message(fake.alice, "anyone on shard 1?", channel_id=channel_id, mention_bot=True)
        await wait_for_reply(fake, bot.store, sent)


async def test_auto_takes_discords_shard_count_and_keeps_our_gateway_url(
    fake: FakeDiscord, tiny_engine: AsyncEngine, tmp_path: Path
) -> None:
    fake.recommended_shards = 2
    # Were the advertised URL used, every shard would fail to connect and the bot would never be ready.
    fake.advertised_gateway_url = f"ws://127.0.0.1:{fake.port}/not-the-gateway"
    settings = bot_settings(fake, tmp_path / "bot.sqlite3", shard_count="auto")
    async with running_bot(settings, RecordingEngine(tiny_engine)) as bot:
        assert fake.find_calls("GET", "/gateway/bot"), "the shard count should come from Discord"
        assert bot.client.shard_count == 2 and identified_shards(fake) == [[0, 2], [1, 2]]
        sent = await fake.send_message(fake.alice, "hello", mention_bot=True)
        await wait_for_reply(fake, bot.store, sent)
