"""The bot most end-to-end tests talk to: the tiny Llama behind the real bot, on the fake Discord and a fresh SQLite
file."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.bot_harness import RecordingEngine, RunningBot, bot_settings, running_bot
from tests.support.fake_discord import FakeDiscord


@pytest.fixture
def database(tmp_path: Path) -> Path:
    return tmp_path / "bot.sqlite3"


@pytest.fixture
async def bot(fake: FakeDiscord, engine: RecordingEngine, database: Path) -> AsyncIterator[RunningBot]:
    # Greedy decoding: the tiny model's replies are then the same on every run.
    async with running_bot(bot_settings(fake, database, temperature=0.0), engine) as bot:
        yield bot
