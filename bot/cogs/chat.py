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
by `bot.cogs.replying`.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import discord
from discord.ext import commands

from bot.chat.locks import ChannelLocks
from bot.chat.notices import Notices
from bot.chat.pipeline import Reply, Speaker, TurnPipeline, UserTurn
from bot.cogs.reading import prompt_text, read_turn
from bot.cogs.replying import NO_PINGS, DiscordReplyView, LiveReplies, stop_button_type
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

    def __init__(self, bot: commands.Bot, pipeline: TurnPipeline, locks: ChannelLocks) -> None:
        self.bot = bot
        self.pipeline = pipeline
        self.locks = locks
        self.settings = pipeline.settings
        self.metrics = pipeline.metrics
        self._last_prompt: dict[int, float] = {}  # user id → time.monotonic() of their last accepted prompt
        self._waiting: Counter[int] = Counter()  # channel id → messages waiting for its lock
        self.notices = Notices()
        self.closing = False  # shutting down: no new message is answered
        self.live = LiveReplies()
        self.stop_button = stop_button_type(self.live)

    async def cog_load(self) -> None:
        self.bot.add_dynamic_items(self.stop_button)  # presses are routed by custom id, also after a restart

    async def cog_unload(self) -> None:
        self.bot.remove_dynamic_items(self.stop_button)

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
        addressed = self._addressed_at_once(message, me)
        if addressed is False:
            return  # chatter: not answered, so it does not wait for the channel either
        channel_id = message.channel.id
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
                if (addressed or await self._should_answer(message, me)) and self._may_post(message):
                    await self._answer(message, me)
        except Exception as error:
            self.metrics.count_error(error_kind(error))
            log.exception("answering message %s in channel %s failed", message.id, channel_id)
            text = f"Sorry: {error}" if isinstance(error, EngineError) and str(error) else ERROR_TEXT
            with suppress(discord.HTTPException):
                await self._reply_short(message, text)

    @commands.Cog.listener()
    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        await self.live.deleted({payload.message_id})

    @commands.Cog.listener()
    async def on_raw_bulk_message_delete(self, payload: discord.RawBulkMessageDeleteEvent) -> None:
        await self.live.deleted(set(payload.message_ids))

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
        interval = self.settings.edit_interval_seconds

        def view(reply: Reply) -> DiscordReplyView:
            shown = DiscordReplyView(message, self.stop_button, interval)
            self.live.add(message.id, reply, message.author.id, shown)
            return shown

        try:
            await self.pipeline.answer(turn, view, assistant=Speaker(me.id, me.display_name))
        except EngineBusyError as busy:
            await self._tell_busy(message, "engine busy", str(busy))
        finally:
            self.live.remove(message.id)

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
