"""`LlamacordBot`: the discord.py client. It holds the settings, store and engine (passed in, so tests can hand it
a tiny engine and a temporary store) and the per-channel locks, loads the cogs and syncs the slash commands."""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import TYPE_CHECKING, Any

import discord
import yarl
from discord import app_commands
from discord.ext import commands

from bot.cogs import Denied, respond
from bot.cogs.admin import AdminCog
from bot.cogs.chat import ChatCog
from bot.cogs.info import InfoCog
from bot.engine.errors import EngineError
from bot.settings import Settings
from storage import Store

if TYPE_CHECKING:
    from bot.engine.backend import Engine

log = logging.getLogger(__name__)

COMMAND_FAILED = "Something went wrong running that command. It has been logged; please try again."


def use_discord_endpoints(api_base_url: str, gateway_url: str) -> None:
    """Point discord.py's REST calls at `api_base_url` and its gateway connection at `gateway_url`.

    discord.py has no per-client option for either. Every REST route, the interaction webhooks included, is built
    from the class attribute `Route.BASE` (discord.py itself rewrites it to change the API version), and a
    non-sharded client opens `DiscordWebSocket.DEFAULT_GATEWAY` (READY then supplies the URL for resuming). Both
    are process-wide, so one process serves one Discord endpoint: the bot sets them when it is created.
    """
    discord.http.Route.BASE = api_base_url.rstrip("/")
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway_url)


class LlamacordBot(commands.Bot):
    """Slash commands and chat over one engine and one store. `options` go to `commands.Bot` (tests lower
    `guild_ready_timeout`, which otherwise delays `on_ready` by two seconds)."""

    def __init__(self, settings: Settings, store: Store, engine: Engine, **options: Any) -> None:
        intents = discord.Intents.none()
        intents.guilds = True
        intents.guild_messages = True
        intents.dm_messages = True
        intents.message_content = True
        super().__init__(
            command_prefix=[],
            intents=intents,
            help_command=None,
            # The default for every send and edit, on top of the explicit one on each reply: never ping anyone.
            allowed_mentions=discord.AllowedMentions.none(),
            **options,
        )
        use_discord_endpoints(settings.discord_api_base_url, settings.discord_gateway_url)
        self.settings = settings
        self.store = store
        self.engine = engine
        self._channel_locks: weakref.WeakValueDictionary[int, asyncio.Lock] = weakref.WeakValueDictionary()
        self.tree.error(self._on_app_command_error)

    def channel_lock(self, channel_id: int) -> asyncio.Lock:
        """The lock that orders every write to one channel's history (a reply, a /reset), so a message that
        arrives while the channel is being answered waits its turn. Held only while in use: unused locks are
        dropped with their last reference."""
        lock = self._channel_locks.get(channel_id)
        if lock is None:
            lock = self._channel_locks[channel_id] = asyncio.Lock()
        return lock

    async def setup_hook(self) -> None:
        await self.add_cog(ChatCog(self))
        await self.add_cog(AdminCog(self))
        await self.add_cog(InfoCog(self))
        if self.settings.dev_guild_id is None:
            synced = await self.tree.sync()
            log.info("synced %d slash commands globally (Discord may take a while to show them)", len(synced))
        else:
            guild = discord.Object(id=self.settings.dev_guild_id)
            self.tree.copy_global_to(guild=guild)
            synced = await self.tree.sync(guild=guild)
            log.info("synced %d slash commands to guild %s", len(synced), guild.id)

    async def on_ready(self) -> None:
        log.info(
            "connected to Discord as %s (id %s) in %d guilds", self.user, self.user and self.user.id, len(self.guilds)
        )

    async def on_message(self, message: discord.Message, /) -> None:
        """Replace `commands.Bot`'s prefix-command parsing: this bot has slash commands only, and every message
        goes to the chat cog's listener."""

    async def _on_app_command_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        name = interaction.command.qualified_name if interaction.command else "?"
        original = getattr(error, "original", error)  # CommandInvokeError wraps what the command raised
        if isinstance(error, Denied):
            log.info("/%s denied for user %s: %s", name, interaction.user.id, error)
            text = str(error)
        elif isinstance(original, EngineError) and str(original):
            log.warning("/%s failed for user %s: %s", name, interaction.user.id, original)
            text = f"Sorry: {original}"  # engine errors are worded for users
        else:
            log.error("/%s failed for user %s", name, interaction.user.id, exc_info=error)
            text = COMMAND_FAILED
        try:
            await respond(interaction, text, ephemeral=True)
        except discord.HTTPException:
            log.warning("could not tell user %s that /%s failed", interaction.user.id, name, exc_info=True)
