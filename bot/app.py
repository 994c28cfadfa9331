"""`llamacord run`: open the store, serve metrics, load the engine, connect to Discord, and close them all at exit.

Every failure a user can fix at start-up (no token, a rejected token, the Message Content intent not enabled, a
bad database file, a metrics port in use, a model that cannot load) ends the process with a message that says what
to do, not a traceback.

SIGTERM (docker stop, systemd) and Ctrl-C shut down gracefully: no new message is answered, replies in progress get
SHUTDOWN_GRACE_SECONDS to finish, the rest are interrupted (edited with a note, their button removed, stored as far
as they got), then the bot, the engine and the store close. A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from contextlib import AsyncExitStack, suppress
from typing import Any

import discord

from bot.chat.locks import ChannelLocks
from bot.chat.pipeline import TurnPipeline
from bot.client import LlamacordBot, create_bot
from bot.cogs import build_cogs
from bot.engine.api import Engine
from bot.engine.backend import create_engine
from bot.engine.errors import ModelLoadError
from bot.logs import configure_logging
from bot.metrics import Metrics, MetricsServer
from bot.settings import Settings
from storage import Store, StoreError, open_store

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


def discord_bot(settings: Settings, store: Store, engine: Engine, metrics: Metrics, **options: Any) -> LlamacordBot:
    """The bot SHARD_COUNT asks for, with its cogs over one turn pipeline. `options` go to discord.py's bot."""
    pipeline = TurnPipeline(store, engine, settings, metrics)
    locks = ChannelLocks()
    return create_bot(settings, cogs=lambda bot: build_cogs(bot, pipeline, locks), **options)


def run_bot(settings: Settings) -> None:
    """Run the bot until Ctrl-C or SIGTERM; exit with a clear message on a start-up problem."""
    if settings.discord_token is None or not settings.discord_token.get_secret_value().strip():
        sys.exit(NO_TOKEN)
    # Before anything logs. Ours is the only handler: discord.py installs its own only in `Client.run`, not used here.
    configure_logging(settings.log_level, secrets=settings.secret_values())
    with suppress(KeyboardInterrupt, asyncio.CancelledError):
        asyncio.run(_serve_until_signalled(settings))


async def _serve_until_signalled(settings: Settings) -> None:
    """`serve`, with SIGTERM and SIGINT asking it to stop gracefully; a second signal cancels it at once."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None

    def on_signal(number: int) -> None:
        if stop.is_set():
            log.warning("%s again: stopping at once", signal.Signals(number).name)
            task.cancel()
        else:
            log.info("%s: shutting down gracefully (send it again to stop at once)", signal.Signals(number).name)
            stop.set()

    for number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(number, on_signal, number)
    await serve(settings, stop)


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Store, metrics server, engine and bot, opened in that order and closed in reverse, whatever happens. Runs
    until `stop` is set (then the bot shuts down gracefully) or the task is cancelled (at once).

    The metrics server starts before the model loads, so /healthz answers 503 while it does.
    """
    assert settings.discord_token is not None
    metrics = Metrics()
    engine: Engine | None = None
    bot: LlamacordBot | None = None
    async with AsyncExitStack() as stack:
        try:
            store = await open_store(settings.database)
        except StoreError as error:
            raise SystemExit(f"Cannot use the database: {error}") from None
        stack.callback(log.info, "stopped")
        stack.push_async_callback(store.close)
        if settings.metrics_port is not None:
            server = MetricsServer(
                metrics,
                host=settings.metrics_host,
                port=settings.metrics_port,
                gateway_connected=lambda: bot is not None and bot.gateway_connected(),
                engine_alive=lambda: engine is not None and engine.is_alive,
            )
            try:
                await server.start()
            except OSError as error:
                raise SystemExit(
                    f"Cannot serve metrics on {settings.metrics_host}:{settings.metrics_port}: {error}. "
                    "Free the port or set another METRICS_PORT."
                ) from None
            stack.push_async_callback(server.close)
        try:
            engine = await create_engine(settings)
        except ModelLoadError as error:
            raise SystemExit(f"Cannot load the model: {error}") from None
        stack.push_async_callback(engine.shutdown)
        metrics.watch_engine(engine.stats)
        bot = await stack.enter_async_context(discord_bot(settings, store, engine, metrics))
        running = asyncio.create_task(bot.start(settings.discord_token.get_secret_value()))
        stopping = asyncio.create_task((stop or asyncio.Event()).wait())
        try:
            await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not running.done():
                await bot.shut_down(settings.shutdown_grace_seconds)
            await running
        except discord.LoginFailure:
            raise SystemExit(BAD_TOKEN) from None
        except discord.PrivilegedIntentsRequired:
            raise SystemExit(NO_INTENT) from None
        finally:
            stopping.cancel()
            running.cancel()
