"""`llamacord run`: open the store, load the engine, connect to Discord, and close all three on the way out.

Every failure a user can fix at start-up (no token, a rejected token, the Message Content intent not enabled, a
bad database file, a model that cannot load) ends the process with a message that says what to do, not a
traceback. SIGTERM (docker stop, systemd) shuts down as cleanly as Ctrl-C: the engine and the store are closed.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from contextlib import suppress

import discord

from bot.client import LlamacordBot
from bot.engine.backend import create_engine
from bot.engine.errors import ModelLoadError
from bot.logs import configure_logging
from bot.settings import Settings
from storage import Store, StoreError

log = logging.getLogger(__name__)

NO_TOKEN = (
    "DISCORD_TOKEN is not set. Create a bot at https://discord.com/developers/applications, open Bot, press "
    "Reset Token and put the token in .env as DISCORD_TOKEN=... On the same page, turn on the Message Content "
    "intent (Privileged Gateway Intents): the bot reads messages to answer them."
)
BAD_TOKEN = (
    "Discord rejected DISCORD_TOKEN. Reset the token in the Developer Portal (Bot > Reset Token) and update .env."
)
NO_INTENT = (
    "Discord refused the Message Content intent. Enable it in the Developer Portal: your application > Bot > "
    "Privileged Gateway Intents > Message Content Intent."
)


def run_bot(settings: Settings) -> None:
    """Run the bot until Ctrl-C or SIGTERM; exit with a clear message on a start-up problem."""
    if settings.discord_token is None or not settings.discord_token.get_secret_value().strip():
        sys.exit(NO_TOKEN)
    configure_logging(settings.log_level)
    # SIGTERM (docker stop, systemd) as Ctrl-C: asyncio.run then cancels `serve`, whose cleanup runs.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with suppress(KeyboardInterrupt):
        asyncio.run(serve(settings))


async def serve(settings: Settings) -> None:
    """Store, engine and bot, opened in that order and closed in reverse, whatever happens in between."""
    assert settings.discord_token is not None
    try:
        store = await Store.open(settings.database_path)
    except StoreError as error:
        raise SystemExit(f"Cannot use the database: {error}") from None
    try:
        try:
            engine = await create_engine(settings)
        except ModelLoadError as error:
            raise SystemExit(f"Cannot load the model: {error}") from None
        try:
            async with LlamacordBot(settings, store, engine) as bot:
                await bot.start(settings.discord_token.get_secret_value())
        except discord.LoginFailure:
            raise SystemExit(BAD_TOKEN) from None
        except discord.PrivilegedIntentsRequired:
            raise SystemExit(NO_INTENT) from None
        finally:
            await engine.shutdown()
    finally:
        await store.close()
        log.info("stopped")
