"""`llamacord run` (`bot.app`): start-up problems end with a message that says what to do, and a normal run opens
the store and the engine from the settings, serves the fake Discord, and closes everything when cancelled."""

from __future__ import annotations

import asyncio
from pathlib import Path

import discord
import pytest

from bot.app import BAD_TOKEN, NO_TOKEN, run_bot, serve
from bot.client import use_discord_endpoints
from storage import Role, open_store
from tests.support.bot_harness import bot_settings
from tests.support.fake_discord import FakeDiscord
from tests.support.postgres import free_port


def test_no_token_exits_saying_how_to_get_one(tmp_path: Path) -> None:
    settings = bot_settings(FakeDiscord(), tmp_path / "bot.sqlite3", discord_token=None)
    with pytest.raises(SystemExit) as exited:
        run_bot(settings)
    assert exited.value.code == NO_TOKEN
    assert "discord.com/developers/applications" in NO_TOKEN and "Message Content" in NO_TOKEN
    assert not (tmp_path / "bot.sqlite3").exists(), "nothing should be opened without a token"


async def test_an_unusable_database_exits_cleanly(tmp_path: Path) -> None:
    settings = bot_settings(FakeDiscord(), tmp_path / "missing-directory" / "bot.sqlite3")
    with pytest.raises(SystemExit) as exited:
        await serve(settings)
    assert str(exited.value.code).startswith("Cannot use the database:")
    assert "missing-directory" in str(exited.value.code)


async def test_an_unreachable_database_url_exits_naming_it_without_its_password(tmp_path: Path) -> None:
    url = f"postgresql://llamacord:hunter2-secret@127.0.0.1:{free_port()}/llamacord"
    settings = bot_settings(FakeDiscord(), tmp_path / "bot.sqlite3", database_url=url)
    with pytest.raises(SystemExit) as exited:
        await serve(settings)
    message = str(exited.value.code)
    assert message.startswith("Cannot use the database: Cannot connect to the PostgreSQL database at DATABASE_URL=")
    assert "postgresql://llamacord:***@127.0.0.1" in message and "hunter2" not in message
    assert not (tmp_path / "bot.sqlite3").exists(), "DATABASE_URL wins: no SQLite file is made"


def test_discord_endpoints_point_discord_py_at_another_server() -> None:
    base, gateway = discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
    try:
        use_discord_endpoints("http://127.0.0.1:9/proxy/api/v10/", "ws://127.0.0.1:9/gw")
        assert discord.http.Route("GET", "/users/@me").url == "http://127.0.0.1:9/proxy/api/v10/users/@me"
        assert str(discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY) == "ws://127.0.0.1:9/gw"
    finally:
        discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = base, gateway


async def test_serve_runs_the_bot_from_settings_and_closes_everything(tiny_model_dir: Path, tmp_path: Path) -> None:
    database = tmp_path / "bot.sqlite3"
    async with FakeDiscord() as fake:
        settings = bot_settings(fake, database, model=str(tiny_model_dir))
        task = asyncio.create_task(serve(settings))
        try:
            await fake.wait_for_ready(timeout_s=60)  # loads the tiny model first
            sent = await fake.send_message(fake.alice, "are you up?", mention_bot=True)
            await fake.wait_until(lambda: fake.replies_to(int(sent["id"])), what="a reply")
        finally:
            task.cancel()  # what SIGTERM and Ctrl-C do
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, 30)
        assert fake.commands[None], "no slash commands were synced"
    async with open_store(database) as store:  # the store was closed cleanly and holds the conversation
        history = await store.load_history(fake.general_id, 10)
    assert [m.content for m in history if m.role is Role.USER] == ["are you up?"]


async def test_a_rejected_token_exits_with_a_message(tiny_model_dir: Path, tmp_path: Path) -> None:
    async with FakeDiscord() as fake:
        settings = bot_settings(fake, tmp_path / "bot.sqlite3", model=str(tiny_model_dir), discord_token="wrong")
        # Awaited directly: asyncio lets a SystemExit escape from a task straight out of the event loop.
        with pytest.raises(SystemExit) as exited:
            async with asyncio.timeout(60):
                await serve(settings)
    assert exited.value.code == BAD_TOKEN
