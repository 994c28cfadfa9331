"""Chatting on Discord: should I answer this message? → the turn pipeline → the reply streamed into Discord.

One path per message, in `on_message`. Each channel (a thread and a DM are channels too) has one lock, taken before
the first await for every message that could be answered, so a channel's messages are decided and answered in the
order they arrived and the history stays user, assistant, user, assistant. At most MAX_WAITING_PER_CHANNEL
messages wait for a channel's lock; past that, a message that would be answered is told at once that the bot is
busy. Different channels never wait for each other: their prompts meet in the engine's queue, which batches them.

The rules of a turn (prompt, storing, notes, metrics) are the pipeline's (`bot.chat.pipeline`); this cog shows the
reply: typing while the prompt is processed, the first message as soon as the first token arrives, then at most
one edit per EDIT_INTERVAL_SECONDS. Past 2,000 characters it continues in new messages (see `bot/replies.py`). The
newest message carries a Stop button until the reply is done.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress

import discord
from discord.ext import commands

from bot.chat.locks import ChannelLocks
from bot.chat.pipeline import Reply, Speaker, TurnPipeline, UserTurn
from bot.engine.errors import BUSY_MESSAGE, EngineBusyError, EngineError
from bot.metrics import ErrorKind, ReplyOutcome
from bot.replies import EditThrottle, plan_messages, split_message
from storage import ReplyMode

log = logging.getLogger(__name__)

# Messages that may wait for one channel's lock while it is being answered; past this, a message that would be
# answered is told at once that the bot is busy, instead of queueing behind a flood.
MAX_WAITING_PER_CHANNEL = 10
NO_PINGS = discord.AllowedMentions.none()
STOP_BUTTON_ID = "llamacord:stop"
ERROR_TEXT = "Sorry, something went wrong while answering. Please try again."
EMPTY_REPLY = "*(no reply)*"
STOP_DENIED = "Only the person who asked, or a moderator with Manage Messages, can stop this reply."
COOLDOWN_TEXT = "Slow down a little: you can ask me again in {seconds:.0f} s."
# Prune the cooldown table when it grows past this many users.
COOLDOWN_TABLE_SIZE = 1024
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


def prompt_text(message: discord.Message, me: discord.abc.User) -> str:
    """The message as the model should read it: the bot's own mention removed, other mentions as @names."""
    text = re.sub(rf"<@!?{me.id}>", "", message.content)
    for user in message.mentions:
        text = text.replace(f"<@{user.id}>", f"@{user.display_name}").replace(f"<@!{user.id}>", f"@{user.display_name}")
    return text.strip()


def is_conversation(message: discord.Message, me: discord.abc.User) -> bool:
    """The checks that need no I/O: a human's ordinary message with something to answer once the bot's mention is
    removed. Bots (this one included), webhooks and system messages (joins, pins, boosts, ...) are not."""
    return (
        not message.author.bot
        and message.webhook_id is None
        and message.type in CONVERSATION_TYPES
        and bool(prompt_text(message, me))
    )


class StopButton(discord.ui.View):
    """The Stop button on the newest message of a streaming reply. Only the asker or a moderator (Manage
    Messages in the channel) may press it; pressing it aborts the generation at once, freeing its batch slot."""

    def __init__(self, asker_id: int, on_stop: Callable[[], Awaitable[None]]) -> None:
        super().__init__(timeout=None)  # the reply removes it when done; a timeout would leave a dead button
        self.asker_id = asker_id
        self.on_stop = on_stop

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        if interaction.user.id == self.asker_id or (
            interaction.guild_id is not None and interaction.permissions.manage_messages
        ):
            return True
        await interaction.response.send_message(STOP_DENIED, ephemeral=True)
        return False

    @discord.ui.button(label="Stop", style=discord.ButtonStyle.danger, custom_id=STOP_BUTTON_ID)
    async def stop_reply(self, interaction: discord.Interaction, button: discord.ui.Button[StopButton]) -> None:
        await interaction.response.defer()  # the reply's final edit removes the button
        await self.on_stop()


class DiscordReplyView:
    """The Discord side of one reply (`bot.chat.pipeline.ReplyView`): the messages posted so far, what they show,
    and where the Stop button is."""

    def __init__(self, source: discord.Message, reply: Reply, asker_id: int, interval: float) -> None:
        self.source = source
        self.reply = reply
        self.asker_id = asker_id
        self.throttle = EditThrottle(interval)
        self.messages: list[discord.Message] = []
        self.shown: list[str] = []
        self.button: tuple[int, StopButton] | None = None  # (message index, view)

    def preparing(self) -> AbstractAsyncContextManager[object]:
        return self.source.channel.typing()

    async def show(self, text: str) -> None:
        if not self.messages or self.throttle.ready():
            await self._render(text, final=False)

    async def finish(self, text: str) -> int | None:
        await asyncio.sleep(self.throttle.delay())
        try:
            await self._render(text, final=True)
        finally:
            self._stop_button()
        return self.messages[0].id if self.messages else None

    async def abandon(self, text: str) -> None:
        if self.messages:
            with suppress(discord.HTTPException):  # take the Stop button off what was posted
                await self._render(text, final=True)
        self._stop_button()

    async def _render(self, text: str, *, final: bool) -> None:
        """Make Discord show `text`: edit the messages whose part changed, post new ones past 2,000 characters,
        and keep the Stop button on the newest message (none once `final`)."""
        wanted = split_message(text) or [EMPTY_REPLY]
        button_at = None if final else len(wanted) - 1
        plan = plan_messages(self.shown, wanted)
        edits = dict(plan.edits)
        if self.button is not None and self.button[0] != button_at:
            edits.setdefault(self.button[0], self.shown[self.button[0]])  # edited only to drop the button
        for index, content in sorted(edits.items()):
            view = self._view_for(index, button_at)
            self.messages[index] = await self.messages[index].edit(
                content=content, view=view, allowed_mentions=NO_PINGS
            )
            self.shown[index] = content
        for content in plan.sends:
            view = self._view_for(len(self.messages), button_at)
            if self.messages:
                message = await self.source.channel.send(content, view=view, allowed_mentions=NO_PINGS)
            else:
                reference = self.source.to_reference(fail_if_not_exists=False)
                message = await self.source.channel.send(
                    content, view=view, reference=reference, allowed_mentions=NO_PINGS
                )
            self.messages.append(message)
            self.shown.append(content)
        if edits or plan.sends:
            self.throttle.flushed()

    def _view_for(self, index: int, button_at: int | None) -> StopButton | None:
        """The view message `index` should carry; a button that moves is stopped, so discord.py forgets it."""
        if self.button is not None and self.button[0] == index:
            if index == button_at:
                return self.button[1]
            self.button[1].stop()
            self.button = None
        if index != button_at:
            return None
        if self.button is not None:
            self.button[1].stop()
        view = StopButton(self.asker_id, self.reply.stop)
        self.button = (index, view)
        return view

    def _stop_button(self) -> None:
        if self.button is not None:
            self.button[1].stop()
            self.button = None


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

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        me = self.bot.user
        if me is None or not is_conversation(message, me):
            return
        channel_id = message.channel.id
        try:
            if self._waiting[channel_id] >= MAX_WAITING_PER_CHANNEL:
                # Decided out of turn, which cannot reorder the history: this message is only told to retry.
                if await self._should_answer(message, me):
                    self.metrics.observe_reply(ReplyOutcome.BUSY)
                    await self._tell_busy(message, "channel queue full")
                return
            async with self._turn(channel_id):
                if await self._should_answer(message, me):
                    await self._answer(message, me)
        except Exception as error:
            self.metrics.count_error(error_kind(error))
            log.exception("answering message %s in channel %s failed", message.id, channel_id)
            text = f"Sorry: {error}" if isinstance(error, EngineError) and str(error) else ERROR_TEXT
            with suppress(discord.HTTPException):
                await self._reply_short(message, text)

    @asynccontextmanager
    async def _turn(self, channel_id: int) -> AsyncIterator[None]:
        """Hold the channel's lock; messages get it in arrival order (asyncio locks are FIFO), and each counts as
        waiting until it has it. Taken before deciding, because deciding awaits (the store, a fetch of the
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

    async def _should_answer(self, message: discord.Message, me: discord.abc.User) -> bool:
        """For a message `is_conversation` let through: is it addressed to the bot here?"""
        if isinstance(message.channel, discord.DMChannel) or any(user.id == me.id for user in message.mentions):
            return True
        overrides = await self.pipeline.store.get_channel_settings(message.channel.id)
        if overrides.effective_reply_mode is ReplyMode.ALL:
            return True
        replied_to = await self._replied_message(message)
        return replied_to is not None and replied_to.author.id == me.id

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
            await self._reply_short(message, COOLDOWN_TEXT.format(seconds=max(wait, 1)))
            return
        turn = UserTurn(
            channel_id=message.channel.id,
            content=prompt_text(message, me),
            speaker=Speaker(message.author.id, message.author.display_name),
            message_id=message.id,
        )
        interval = self.settings.edit_interval_seconds

        def view(reply: Reply) -> DiscordReplyView:
            return DiscordReplyView(message, reply, message.author.id, interval)

        try:
            await self.pipeline.answer(turn, view, assistant=Speaker(me.id, me.display_name))
        except EngineBusyError as busy:
            await self._tell_busy(message, "engine busy", str(busy))

    async def _tell_busy(self, message: discord.Message, why: str, text: str = BUSY_MESSAGE) -> None:
        self.metrics.count_error(ErrorKind.BUSY)
        log.info("%s: told user %s in channel %s to retry", why, message.author.id, message.channel.id)
        await self._reply_short(message, text)

    async def _reply_short(self, message: discord.Message, text: str) -> None:
        await message.channel.send(
            text, reference=message.to_reference(fail_if_not_exists=False), allowed_mentions=NO_PINGS
        )
