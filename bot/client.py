"""`LlamacordBot`: the discord.py client. It is handed its settings and the factory of its cogs (which are handed the
store, engine and pipeline they use, so tests can give them a tiny engine and a temporary store), adds the cogs and
syncs the slash commands.

`create_bot` picks the class from SHARD_COUNT: `LlamacordBot` (one gateway connection) or `ShardedLlamacordBot`,
the same bot on discord.py's `AutoShardedBot`, which runs several shards over one connection each in this process.

Every REST request of the bot takes its turn in one `Pacer` (DISCORD_REQUESTS_PER_SECOND) before discord.py sends
it, all shards of the process together: `pace_requests` says which request is which.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import discord
import yarl
from discord import app_commands
from discord.ext import commands

from bot.cogs.chat import ChatCog
from bot.cogs.common import Denied, respond
from bot.cogs.replying import STOP_PREFIX
from bot.engine.errors import EngineError
from bot.pacing import Pacer, Priority
from bot.settings import Settings

log = logging.getLogger(__name__)

COMMAND_FAILED = "Something went wrong running that command. It has been logged; please try again."

CogFactory = Callable[[commands.Bot], Iterable[commands.Cog]]

# discord.py's route templates (`Route.path`) of the requests paced apart from the rest.
EDIT_ROUTE = "/channels/{channel_id}/messages/{message_id}"
TYPING_ROUTE = "/channels/{channel_id}/typing"


def use_discord_endpoints(api_base_url: str, gateway_url: str) -> None:
    """Point discord.py's REST calls at `api_base_url` and its gateway connection at `gateway_url`.

    discord.py has no per-client option for either. Every REST route, the interaction webhooks included, is built
    from the class attribute `Route.BASE` (discord.py itself rewrites it to change the API version), and a
    client opens `DiscordWebSocket.DEFAULT_GATEWAY` (READY then supplies the URL for resuming; a sharded one would
    ask `GET /gateway/bot` for a URL, which `ShardedLlamacordBot` prevents). Both are process-wide, so one process
    serves one Discord endpoint: the bot sets them when it is created.
    """
    discord.http.Route.BASE = api_base_url.rstrip("/")
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway_url)


def ends_streaming(request: dict[str, Any]) -> bool:
    """Whether an edit's JSON body sets the message's components without the Stop button: the edit that ends a reply
    (it takes Stop off, or puts Retry in its place). Streaming edits keep Stop, or leave the components alone."""
    body = request.get("json")
    if not isinstance(body, dict) or "components" not in body:
        return False
    buttons = [item for row in body["components"] or [] for item in row.get("components", [])]
    return not any(str(button.get("custom_id", "")).startswith(STOP_PREFIX) for button in buttons)


def pace_requests(http: discord.http.HTTPClient, pacer: Pacer) -> None:
    """Make every REST request through `http` wait for its turn in `pacer` before discord.py sends it.

    `HTTPClient.request` is the one path of every call made with the bot token, which is what Discord's global
    limit counts. discord.py's own rate limiting stays: its per-route buckets and its handling of 429s run after
    the turn (a retry inside it takes no new turn; the room left under Discord's limit covers those). An edit of a
    message that keeps its components (a reply's growing text or its place in line, under the Stop button) is a
    streaming edit, paced by channel, where one reply streams at a time; a typing indicator goes only when no other
    request waits, since a late one would show after the reply; everything else goes first: a reply's first
    message, the edit that takes its Stop button off (the reply is done, with Retry or no button: its end need not
    wait a round of the others' edits), notices, reads, command sync. Interaction responses and follow-ups never
    pass here: discord.py sends them through its webhook adapter, and Discord does not count them toward the global
    limit, so a command's answer never waits.
    """
    send = http.request

    async def request(route: discord.http.Route, **kwargs: Any) -> Any:
        if route.path == TYPING_ROUTE:
            if not await pacer.turn_if_idle():
                return None  # skipped: the reply it announces is what the budget is for
        elif route.method == "PATCH" and route.path == EDIT_ROUTE and not ends_streaming(kwargs):
            await pacer.turn(Priority.EDIT, route.channel_id)
        else:
            await pacer.turn(Priority.FIRST)
        return await send(route, **kwargs)

    http.request = request  # type: ignore[method-assign]


class LlamacordBot(commands.Bot):
    """The client that runs the cogs `cogs` makes for it. `options` go to `commands.Bot` (tests lower
    `guild_ready_timeout`, which otherwise delays `on_ready` by two seconds)."""

    def __init__(self, settings: Settings, *, cogs: CogFactory, **options: Any) -> None:
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
            # Every command works in servers and in the bot's own DMs; not in group DMs, where its members share
            # one conversation with no permissions to check. Installed to servers only.
            allowed_contexts=app_commands.AppCommandContext(guild=True, dm_channel=True, private_channel=False),
            allowed_installs=app_commands.AppInstallationType(guild=True, user=False),
            **options,
        )
        use_discord_endpoints(settings.discord_api_base_url, settings.discord_gateway_url)
        self.settings = settings
        self.pacer: Pacer | None = None
        if settings.discord_requests_per_second > 0:
            self.pacer = Pacer(settings.discord_requests_per_second)
            pace_requests(self.http, self.pacer)
        self._make_cogs = cogs
        self.tree.error(self._on_app_command_error)

    async def setup_hook(self) -> None:
        for cog in self._make_cogs(self):
            await self.add_cog(cog)
        if self.settings.dev_guild_id is None:
            synced = await self.tree.sync()
            log.info("synced %d slash commands globally (Discord may take a while to show them)", len(synced))
        else:
            guild = discord.Object(id=self.settings.dev_guild_id)
            self.tree.copy_global_to(guild=guild)
            synced = await self.tree.sync(guild=guild)
            log.info("synced %d slash commands to guild %s", len(synced), guild.id)

    async def shut_down(self, grace_s: float) -> None:
        """Close gracefully (SIGTERM, Ctrl-C): the chat cog lets its replies finish for up to `grace_s` and
        interrupts the rest while the connection is still open, then the bot closes."""
        chat = self.get_cog(ChatCog.__cog_name__)
        if isinstance(chat, ChatCog):
            await chat.wind_down(grace_s)
        await self.close()

    def gateway_connected(self) -> bool:
        """Ready and the gateway websocket open (false while it reconnects): /healthz reports it."""
        return self.is_ready() and not self.is_closed() and self.ws is not None and self.ws.open

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


class ShardedLlamacordBot(LlamacordBot, commands.AutoShardedBot):
    """The same bot on `AutoShardedBot` (a drop-in subclass of `Bot`): SHARD_COUNT shards, or the count Discord
    recommends for SHARD_COUNT=auto, of which this process runs SHARD_IDS (default: all)."""

    def __init__(self, settings: Settings, *, cogs: CogFactory, **options: Any) -> None:
        count = settings.shard_count if isinstance(settings.shard_count, int) else None  # None: ask Discord
        super().__init__(settings, cogs=cogs, shard_count=count, shard_ids=settings.shard_ids, **options)

    async def launch_shards(self) -> None:
        # Without a count, discord.py takes both the count and the URL from GET /gateway/bot. Take the count only,
        # so that DISCORD_GATEWAY_URL (set as DEFAULT_GATEWAY) applies as it does to one connection.
        if self.shard_count is None:
            self.shard_count, _, _ = await self.http.get_bot_gateway()
            log.info("Discord recommends %d shards", self.shard_count)
        await super().launch_shards()

    def gateway_connected(self) -> bool:
        """Ready and every shard of this process connected."""
        shards = self.shards.values()
        return self.is_ready() and not self.is_closed() and bool(shards) and not any(s.is_closed() for s in shards)

    async def on_ready(self) -> None:
        await super().on_ready()
        log.info("running shards %s of %s", sorted(self.shards), self.shard_count)


def create_bot(settings: Settings, *, cogs: CogFactory, **options: Any) -> LlamacordBot:
    """The bot SHARD_COUNT asks for: one gateway connection when it is unset, else sharded."""
    bot_class = LlamacordBot if settings.shard_count is None else ShardedLlamacordBot
    return bot_class(settings, cogs=cogs, **options)
