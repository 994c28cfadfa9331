"""Chatting on Discord: should I answer this message? → the turn pipeline → the reply streamed into Discord.

One path per message, in `on_message`. A message that surely is not addressed to the bot (decided from the message
and the channel's kept configuration, without I/O) is dropped at once. Every other message takes its channel's lock
(a thread and a DM are channels too) before its first await, so a channel's messages are decided and answered in
the order they arrived and the history stays user, assistant, user, assistant. At most MAX_WAITING_PER_CHANNEL
messages wait for a channel's lock; past that, a message that would be answered is told that the bot is busy.
Different channels never wait for each other: their prompts meet in the fair line and the engine's queue.

Notices (busy, slow down) are posted at most once per user per channel per minute (`bot.chat.notices`); past that,
the message gets a reaction. A channel where the bot may not post is not answered at all.

The rules of a turn (prompt, storing, notes, metrics) are the pipeline's (`bot.chat.pipeline`); the reply is shown
by `bot.cogs.replying`. A Retry press on the channel's newest reply answers its question again, under the same lock.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import discord
from discord.ext import commands

from bot.chat.access import ACCESS_DENIED, may_talk, may_use
from bot.chat.config import ChannelConfig
from bot.chat.locks import ChannelLocks
from bot.chat.notices import Notices
from bot.chat.pipeline import Exchange, Reply, Speaker, TurnPipeline, UserTurn, fair_line
from bot.cogs.reading import prompt_text, read_turn
from bot.cogs.replying import (
    NO_PINGS,
    REPLY_ENDED,
    RETRY_DENIED,
    RETRY_STALE,
    DiscordReplyView,
    LiveReplies,
    retry_button_type,
    stop_button_type,
)
from bot.engine.errors import BUSY_MESSAGE, EngineBusyError, EngineError
from bot.metrics import ErrorKind, ReplyOutcome
from storage import ReplyMode

log = logging.getLogger(__name__)

# Messages that may wait for one channel's lock while it is being answered; past this, a message that would be
# answered is told at once that the bot is busy, instead of queueing behind a flood.
MAX_WAITING_PER_CHANNEL = 10
ERROR_TEXT = "Sorry, something went wrong while answering. Please try again."
# At shutdown, after the grace period: how long interrupted replies get to show their note and be stored.
INTERRUPT_SECONDS = 5.0
COOLDOWN_TEXT = "Slow down a little: you can ask me again in {seconds:.0f} s."
# Prune the cooldown table when it grows past this many users.
COOLDOWN_TABLE_SIZE = 1024
# Channels whose newest reply (the one with the Retry button) is remembered, to take the button off when a newer
# reply comes; past this, the least recently answered are forgotten (their button then says it is stale).
OFFERED_TABLE_SIZE = 10_000
# What a message past a limit gets instead of a notice, when its author was told within the last minute.
QUIET_NOTICE = "\N{HOURGLASS WITH FLOWING SAND}"
# Only ordinary messages and replies are conversation; joins, pins, boosts and the like are not.
CONVERSATION_TYPES = (discord.MessageType.default, discord.MessageType.reply)


def error_kind(error: Exception) -> ErrorKind:
    """The `kind` label an error is counted under."""
    if isinstance(error, EngineBusyError):
        return ErrorKind.BUSY
    if isinstance(error, EngineError):
        return ErrorKind.GENERATION
    if isinstance(error, discord.HTTPException):
        return ErrorKind.DISCORD
    return ErrorKind.INTERNAL


def is_conversation(message: discord.Message, me: discord.abc.User) -> bool:
    """The checks that need no I/O: a human's ordinary message with something to answer once the bot's mention is
    removed (text, or a file). Bots (this one included), webhooks and system messages (joins, pins, boosts, ...)
    are not."""
    return (
        not message.author.bot
        and message.webhook_id is None
        and message.type in CONVERSATION_TYPES
        and bool(prompt_text(message, me) or message.attachments)
    )


def can_post(message: discord.Message) -> bool:
    """Whether the bot may post in the message's channel (Send Messages; in a thread, Send Messages in Threads),
    as discord.py computes it from the cached roles and overwrites. A DM is always open."""
    if message.guild is None:
        return True
    permissions = message.channel.permissions_for(message.guild.me)
    if isinstance(message.channel, discord.Thread):
        return permissions.send_messages_in_threads
    return permissions.send_messages


class ChatCog(commands.Cog):
    """Answers messages: mentions and replies to the bot in guild channels and threads, every message in DMs,
    and every message in channels whose reply mode is "all"."""

    def __init__(self, bot: commands.Bot, pipeline: TurnPipeline, locks: ChannelLocks, live: LiveReplies) -> None:
        self.bot = bot
        self.pipeline = pipeline
        self.locks = locks
        self.settings = pipeline.settings
        self.metrics = pipeline.metrics
        self._last_prompt: dict[int, float] = {}  # user id → time.monotonic() of their last accepted prompt
        self._waiting: Counter[int] = Counter()  # channel id → messages waiting for its lock
        self.notices = Notices()
        self.closing = False  # shutting down: no new message is answered
        self.live = live
        self.stop_button = stop_button_type(self.live)
        self.retry_button = retry_button_type(self._on_retry)
        self._offered: OrderedDict[int, discord.Message | discord.PartialMessage] = OrderedDict()  # channel → Retry

    async def cog_load(self) -> None:
        # Presses are routed by custom id, also after a restart.
        self.bot.add_dynamic_items(self.stop_button, self.retry_button)

    async def cog_unload(self) -> None:
        self.bot.remove_dynamic_items(self.stop_button, self.retry_button)

    async def wind_down(self, grace_s: float) -> None:
        """Shutdown: answer no new message, let the replies in progress finish for up to `grace_s`, then interrupt
        the rest, each of which ends with a note and without its button, and is stored as far as it got."""
        self.closing = True
        if await self.live.wait_done(grace_s):
            return
        count = await self.live.interrupt_all()
        log.info("shutting down: interrupted %d replies still in progress after %g s", count, grace_s)
        if not await self.live.wait_done(INTERRUPT_SECONDS):
            log.warning("shutting down: %d interrupted replies did not end in time", len(self.live))

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        me = self.bot.user
        if me is None or self.closing or not is_conversation(message, me):
            return
        if not may_use(self.settings, user_id=message.author.id, in_dm=message.guild is None):
            return  # refused silently: a blocked user, or a DM when DMs are off
        channel_id = message.channel.id
        config = self.pipeline.configs.cached(channel_id)
        if config is not None and not self._may_talk(message, config):
            return
        addressed = self._addressed_at_once(message, me)
        if addressed is False:
            return  # chatter: not answered, so it does not wait for the channel either
        try:
            if self._waiting[channel_id] >= MAX_WAITING_PER_CHANNEL:
                # Decided out of turn, which cannot reorder the history: this message is only told to retry.
                if addressed or await self._should_answer(message, me):
                    self.metrics.observe_reply(ReplyOutcome.BUSY)
                    await self._tell_busy(message, "channel queue full")
                return
            async with self._turn(channel_id):
                if self.closing:  # it waited for the channel while the bot began to shut down
                    return
                if not (addressed or await self._should_answer(message, me)):
                    return
                if self._may_talk(message, await self.pipeline.config(channel_id)) and self._may_post(message):
                    await self._answer(message, me)
        except Exception as error:
            if self._closed_under(f"answering message {message.id}"):
                return
            self.metrics.count_error(error_kind(error))
            log.exception("answering message %s in channel %s failed", message.id, channel_id)
            text = f"Sorry: {error}" if isinstance(error, EngineError) and str(error) else ERROR_TEXT
            with suppress(discord.HTTPException):
                await self._reply_short(message, text)

    def _closed_under(self, what: str) -> bool:
        """Whether the connection closed under a handler that failed (a hard stop): then nobody is left to tell and
        nothing failed, so it is logged at DEBUG only."""
        if not self.bot.is_closed():
            return False
        log.debug("%s: the bot closed meanwhile", what, exc_info=True)
        return True

    @asynccontextmanager
    async def _turn(self, channel_id: int) -> AsyncIterator[None]:
        """Hold the channel's lock; messages get it in arrival order (asyncio locks are FIFO), and each counts as
        waiting until it has it. Taken before deciding, because deciding may await (the store, a fetch of the
        replied-to message): a plain message in an "all" channel must not be overtaken by a mention after it."""
        lock = self.locks(channel_id)
        self._waiting[channel_id] += 1
        try:
            await lock.acquire()
        finally:
            self._waiting[channel_id] -= 1
            if not self._waiting[channel_id]:
                del self._waiting[channel_id]
        try:
            yield
        finally:
            lock.release()

    def _addressed_at_once(self, message: discord.Message, me: discord.abc.User) -> bool | None:
        """Whether the message is addressed to the bot, decided without I/O where the message and the channel's
        kept configuration tell: True, False, or None when it takes `_should_answer` to know."""
        if isinstance(message.channel, discord.DMChannel) or any(user.id == me.id for user in message.mentions):
            return True
        config = self.pipeline.configs.cached(message.channel.id)
        if config is None:
            return None
        if config.reply_mode is ReplyMode.ALL:
            return True
        if message.reference is None:
            return False
        replied_to = message.reference.resolved
        return replied_to.author.id == me.id if isinstance(replied_to, discord.Message) else None

    async def _should_answer(self, message: discord.Message, me: discord.abc.User) -> bool:
        """For a message `is_conversation` let through: is it addressed to the bot here?"""
        if isinstance(message.channel, discord.DMChannel) or any(user.id == me.id for user in message.mentions):
            return True
        if (await self.pipeline.config(message.channel.id)).reply_mode is ReplyMode.ALL:
            return True
        replied_to = await self._replied_message(message)
        return replied_to is not None and replied_to.author.id == me.id

    def _may_talk(self, message: discord.Message, config: ChannelConfig) -> bool:
        """The access rules (`bot.chat.access`) for this message's author here; refusals are silent."""
        return self._allowed(message.author, message.channel, config)

    def _allowed(self, user: discord.abc.User, channel: object, config: ChannelConfig) -> bool:
        member = isinstance(user, discord.Member)
        return may_talk(
            self.settings,
            config,
            user_id=user.id,
            in_dm=not member,
            role_ids=[role.id for role in user.roles] if member else [],
            moderator=member and channel.permissions_for(user).manage_messages,  # type: ignore[attr-defined]
        )

    def _may_post(self, message: discord.Message) -> bool:
        if can_post(message):
            return True
        log.info("not answering in channel %s: the bot may not post there", message.channel.id)
        return False

    async def _replied_message(self, message: discord.Message) -> discord.Message | None:
        reference = message.reference
        if reference is None or reference.message_id is None:
            return None
        if isinstance(reference.resolved, discord.Message):
            return reference.resolved
        if reference.cached_message is not None:
            return reference.cached_message
        try:
            return await message.channel.fetch_message(reference.message_id)
        except discord.HTTPException:
            return None  # deleted, or not ours to read

    def _cooldown_left(self, user_id: int) -> float:
        """Seconds the user must still wait (0 when they may ask); accepting a prompt starts a new wait."""
        cooldown = self.settings.user_cooldown_seconds
        if cooldown <= 0:
            return 0.0
        now = time.monotonic()
        left = self._last_prompt.get(user_id, -cooldown) + cooldown - now
        if left > 0:
            return left
        if len(self._last_prompt) >= COOLDOWN_TABLE_SIZE:
            self._last_prompt = {user: t for user, t in self._last_prompt.items() if now - t < cooldown}
        self._last_prompt[user_id] = now
        return 0.0

    async def _answer(self, message: discord.Message, me: discord.abc.User) -> None:
        """Answer (the channel's lock held) through the turn pipeline; errors propagate to `on_message`."""
        wait = self._cooldown_left(message.author.id)
        if wait > 0:
            await self._notice(message, COOLDOWN_TEXT.format(seconds=max(wait, 1)))
            return
        turn = UserTurn(
            channel_id=message.channel.id,
            content=await read_turn(message, me, self.settings),
            speaker=Speaker(message.author.id, message.author.display_name),
            message_id=message.id,
            server=message.guild.id if message.guild is not None else None,
        )
        views: list[DiscordReplyView] = []

        def view(reply: Reply) -> DiscordReplyView:
            views.append(self._view(message, reply, message.author.id))
            return views[-1]

        try:
            await self.pipeline.answer(turn, view, assistant=Speaker(me.id, me.display_name))
        except EngineBusyError as busy:
            await self._tell_busy(message, "engine busy", str(busy))
        finally:
            await self._settle(message.id, message.channel.id, views)

    def _view(
        self,
        source: discord.Message | discord.PartialMessage,
        reply: Reply,
        asker_id: int,
        replacing: list[discord.PartialMessage] | None = None,
    ) -> DiscordReplyView:
        """The view of a reply to `source`, known to the live replies (Stop, deletions) while it runs."""
        shown = DiscordReplyView(
            source,
            self.stop_button,
            self.settings.edit_interval_seconds,
            retry_button=self.retry_button,
            replacing=replacing or [],
        )
        self.live.add(source.id, reply, asker_id, shown)
        return shown

    async def _settle(self, source_id: int, channel_id: int, views: list[DiscordReplyView]) -> None:
        """A reply's last touches: messages a retry no longer needs go, Retry moves to it. It counts as live until
        they are done, so a graceful shutdown waits for these requests too."""
        try:
            for shown in views:
                await shown.delete_surplus()
                await self._offer_retry(channel_id, shown)
        finally:
            self.live.remove(source_id)

    async def _offer_retry(self, channel_id: int, view: DiscordReplyView) -> None:
        """A reply ended with the Retry button: take it off the channel's previous newest reply."""
        offered = view.offered_retry
        if offered is None:
            return
        previous = self._offered.pop(channel_id, None)
        self._offered[channel_id] = offered
        if len(self._offered) > OFFERED_TABLE_SIZE:
            self._offered.popitem(last=False)
        if previous is not None and previous.id != offered.id:
            try:
                await previous.edit(view=None)
            except discord.HTTPException:  # deleted meanwhile, or no longer ours to edit: nothing left to take off
                log.debug("could not take the Retry button off message %s", previous.id, exc_info=True)

    async def _on_retry(self, interaction: discord.Interaction, source_id: int) -> None:
        """A Retry press: under the channel's lock, answer the newest user turn again in the same messages, if it is
        still the newest and the presser asked it or moderates here."""
        channel, me = interaction.channel, self.bot.user
        if not may_use(self.settings, user_id=interaction.user.id, in_dm=interaction.guild_id is None):
            await interaction.response.send_message(ACCESS_DENIED, ephemeral=True)
            return
        if channel is None or me is None or self.closing:
            await interaction.response.send_message(REPLY_ENDED, ephemeral=True)
            return
        await interaction.response.defer()  # the reply's own messages show what happens
        try:
            async with self._turn(channel.id):
                exchange = await self.pipeline.newest_exchange(channel.id)
                if exchange is None or exchange.question.message_id != source_id:
                    await interaction.followup.send(RETRY_STALE, ephemeral=True)
                    if interaction.message is not None:
                        with suppress(discord.HTTPException):
                            await interaction.message.edit(view=None)
                    return
                moderator = interaction.guild_id is not None and interaction.permissions.manage_messages
                allowed = self._allowed(interaction.user, channel, await self.pipeline.config(channel.id))
                if not allowed or (interaction.user.id != exchange.question.author_id and not moderator):
                    await interaction.followup.send(RETRY_DENIED, ephemeral=True)
                    return
                await self._answer_again(interaction, channel, exchange, me)
        except Exception as error:
            if self._closed_under(f"retrying the reply to message {source_id}"):
                return
            self.metrics.count_error(error_kind(error))
            log.exception("retrying the reply to message %s in channel %s failed", source_id, channel.id)
            text = f"Sorry: {error}" if isinstance(error, EngineError) and str(error) else ERROR_TEXT
            with suppress(discord.HTTPException):
                await interaction.followup.send(text, ephemeral=True)

    async def _answer_again(
        self, interaction: discord.Interaction, channel: Any, exchange: Exchange, me: discord.abc.User
    ) -> None:
        """The retry itself: the new reply replaces the old one in its messages and in the store."""
        question = exchange.question
        shown_by = await self.pipeline.store.discord_message_ids(exchange.reply.id) if exchange.reply else []
        if not shown_by and interaction.message is not None:
            shown_by = [interaction.message.id]  # a reply with no text is not stored, but it is on Discord
        source = channel.get_partial_message(question.message_id)
        replacing = [channel.get_partial_message(message_id) for message_id in shown_by]
        views: list[DiscordReplyView] = []

        def view(reply: Reply) -> DiscordReplyView:
            views.append(self._view(source, reply, question.author_id or interaction.user.id, replacing))
            return views[-1]

        line = fair_line(interaction.guild_id, interaction.user.id)
        try:
            await self.pipeline.retry(exchange, line, view, assistant=Speaker(me.id, me.display_name))
        except EngineBusyError as busy:
            await interaction.followup.send(str(busy), ephemeral=True)
        finally:
            await self._settle(source.id, channel.id, views)

    async def _tell_busy(self, message: discord.Message, why: str, text: str = BUSY_MESSAGE) -> None:
        self.metrics.count_error(ErrorKind.BUSY)
        log.info("%s: told user %s in channel %s to retry", why, message.author.id, message.channel.id)
        await self._notice(message, text)

    async def _notice(self, message: discord.Message, text: str) -> None:
        """Tell the author `text`, unless they were told something here within the minute: then only react."""
        if self.notices.should_post(message.channel.id, message.author.id):
            await self._reply_short(message, text)
            return
        try:
            await message.add_reaction(QUIET_NOTICE)
        except discord.HTTPException:  # no Add Reactions permission, or the message is gone: nothing more to say
            log.debug("could not react to message %s", message.id, exc_info=True)

    async def _reply_short(self, message: discord.Message, text: str) -> None:
        await message.channel.send(
            text, reference=message.to_reference(fail_if_not_exists=False), allowed_mentions=NO_PINGS
        )
