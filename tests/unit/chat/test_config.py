"""Channel configurations: kept in memory, changed through one place, and a reply length that leaves a prompt room."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.chat.config import MIN_PROMPT_TOKENS, ChannelConfigs, prompt_room_problem
from bot.settings import Settings
from storage import ReplyMode, Store, open_store


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with open_store(tmp_path / "config.sqlite3") as store:
        yield store


def settings() -> Settings:
    return Settings(_env_file=None, temperature=0.5)  # type: ignore[call-arg]


async def test_a_channel_is_read_once_then_kept_and_updates_keep_the_copy_true(store: Store) -> None:
    configs = ChannelConfigs(store, settings())
    assert configs.cached(1) is None
    assert (await configs.get(1)).reply_mode is ReplyMode.MENTION
    await store.update_channel_settings(1, changed_by=None, temperature=1.5)  # behind its back: not seen
    assert (await configs.get(1)).temperature == 0.5
    updated = await configs.update(1, changed_by=7, reply_mode="all")
    assert updated.reply_mode is ReplyMode.ALL and updated.temperature == 1.5  # the store's row, with both
    cached = configs.cached(1)
    assert cached is not None and cached.reply_mode is ReplyMode.ALL
    with pytest.raises(ValueError):
        await configs.update(1, changed_by=7, top_p=0.0)
    assert (await configs.get(1)).top_p == settings().top_p


async def test_the_least_recently_used_channels_are_dropped_past_the_size(store: Store) -> None:
    configs = ChannelConfigs(store, settings(), size=2)
    await configs.get(1)
    await configs.get(2)
    await configs.get(1)  # 2 is now the least recently used
    await configs.get(3)
    assert [configs.cached(c) is not None for c in (1, 2, 3)] == [True, False, True]


def test_a_reply_length_must_leave_room_for_a_prompt() -> None:
    assert prompt_room_problem(1000, 1000 + MIN_PROMPT_TOKENS) is None
    problem = prompt_room_problem(1001, 1000 + MIN_PROMPT_TOKENS)
    assert problem is not None and "the most is 1000" in problem
    assert "too few" in (prompt_room_problem(1, MIN_PROMPT_TOKENS) or "")
