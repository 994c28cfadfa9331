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
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from typing import Any

import discord
from discord.ext import commands

from bot.chat.locks import ChannelLocks
from bot.chat.pipeline import Reply, Speaker, TurnPipeline, UserTurn, waiting_text
from bot.engine.errors import BUSY_MESSAGE, EngineBusyError, EngineError
from bot.metrics import ErrorKind, ReplyOutcome
from bot.replies import EditThrottle, plan_messages, split_message
from storage import ReplyMode

log = logging.getLogger(__name__)

# Messages that may wait for one channel's lock while it is being answered; past this, a message that would be
# answered is told at once that the bot is busy, instead of queueing behind a flood.
MAX_WAITING_PER_CHANNEL = 10
NO_PINGS = discord.AllowedMentions.none()
STOP_PREFIX = "llamacord:stop:"  # + the id of the message the reply answers
STOP_TEMPLATE = STOP_PREFIX + r"(?P<source>[0-9]+)"
REPLY_ENDED = "This reply has already ended."
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


class LiveReplies:
    """The replies being written, by the id of the message each answers: where a Stop press finds its reply."""

    def __init__(self) -> None:
        self._replies: dict[int, tuple[Reply, int]] = {}  # answered message id -> (reply, asker id)

    def add(self, source_id: int, reply: Reply, asker_id: int) -> None:
        self._replies[source_id] = (reply, asker_id)

    def remove(self, source_id: int) -> None:
        self._replies.pop(source_id, None)

    def get(self, source_id: int) -> tuple[Reply, int] | None:
        return self._replies.get(source_id)


def stop_button_type(live: LiveReplies) -> type[discord.ui.DynamicItem[discord.ui.Button[discord.ui.View]]]:
    """The Stop button, as a persistent item whose custom id names the message the reply answers: a press on any
    message that carries it (the button moves to a long reply's newest message), or one left from before a restart,
    finds its reply here or is told the reply has ended, instead of failing."""

    class StopButton(discord.ui.DynamicItem[discord.ui.Button[discord.ui.View]], template=STOP_TEMPLATE):
        def __init__(self, source_id: int) -> None:
            button: discord.ui.Button[discord.ui.View] = discord.ui.Button(
                label="Stop", style=discord.ButtonStyle.danger, custom_id=f"{STOP_PREFIX}{source_id}"
            )
            super().__init__(button)
            self.source_id = source_id

        @classmethod
        async def from_custom_id(
            cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str]
        ) -> StopButton:
            return cls(int(match["source"]))

        async def callback(self, interaction: discord.Interaction) -> None:
            found = live.get(self.source_id)
            if found is None:
                await interaction.response.send_message(REPLY_ENDED, ephemeral=True)
                return
            reply, asker_id = found
            moderator = interaction.guild_id is not None and interaction.permissions.manage_messages
            if interaction.user.id != asker_id and not moderator:
                await interaction.response.send_message(STOP_DENIED, ephemeral=True)
                return
            await interaction.response.defer()  # the reply's final edit removes the button
            await reply.stop()

    return StopButton


class DiscordReplyView:
    """The Discord side of one reply (`bot.chat.pipeline.ReplyView`): the messages posted so far, what they show,
    and where the Stop button is."""

    def __init__(
        self, source: discord.Message, stop_button: Callable[[int], discord.ui.Item[Any]], interval: float
    ) -> None:
        self.source = source
        self.stop_button = stop_button
        self.throttle = EditThrottle(interval)
        self.messages: list[discord.Message] = []
        self.shown: list[str] = []
        self.button_at: int | None = None  # the index of the message that carries the Stop button
        self._place = ""  # the newest place in line to show
        self._placing: asyncio.Task[None] | None = None  # shows it, paced by the throttle

    def preparing(self) -> AbstractAsyncContextManager[object]:
        return self.source.channel.typing()

    async def waiting(self, ahead: int) -> None:
        """A placeholder with the place in line (and the Stop button, which takes the request out of the line); the
        reply takes its place when generation starts. Edits are paced in the background, so a move that comes too
        soon after the last edit is shown once the interval has passed, without holding up the reply."""
        self._place = waiting_text(ahead)
        if self._placing is None or self._placing.done():
            self._placing = asyncio.create_task(self._show_place())

    async def _show_place(self) -> None:
        shown = None
        try:
            while self._place != shown:
                await asyncio.sleep(self.throttle.delay())
                shown = self._place
                await self._render(shown, final=False)
        except discord.HTTPException:  # the place in line is a courtesy: the reply itself is what must arrive
            log.warning("could not show the place in line in channel %s", self.source.channel.id, exc_info=True)

    async def _stop_placing(self) -> None:
        """The reply starts (or ends): no placeholder edit may come after it."""
        placing, self._placing = self._placing, None
        if placing is not None:
            placing.cancel()
            with suppress(asyncio.CancelledError, discord.HTTPException):
                await placing

    async def show(self, text: str) -> None:
        await self._stop_placing()
        if not self.messages or self.throttle.ready():
            await self._render(text, final=False)

    async def finish(self, text: str) -> list[int]:
        await self._stop_placing()
        await asyncio.sleep(self.throttle.delay())
        await self._render(text, final=True)
        return [message.id for message in self.messages]

    async def abandon(self, text: str) -> None:
        await self._stop_placing()
        if self.messages:
            with suppress(discord.HTTPException):  # take the Stop button off what was posted
                await self._render(text, final=True)

    async def _render(self, text: str, *, final: bool) -> None:
        """Make Discord show `text`: edit the messages whose part changed, post new ones past 2,000 characters,
        and keep the Stop button on the newest message (none once `final`)."""
        wanted = split_message(text) or [EMPTY_REPLY]
        button_at = None if final else len(wanted) - 1
        plan = plan_messages(self.shown, wanted)
        edits = dict(plan.edits)
        if self.button_at is not None and self.button_at != button_at:
            edits.setdefault(self.button_at, self.shown[self.button_at])  # edited only to drop the button
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

    def _view_for(self, index: int, button_at: int | None) -> discord.ui.View | None:
        """The view message `index` should carry: the Stop button on the newest message while the reply runs."""
        if index != button_at:
            if self.button_at == index:
                self.button_at = None
            return None
        self.button_at = index
        view = discord.ui.View(timeout=None)  # the reply removes the button when done; a timeout would leave it dead
        view.add_item(self.stop_button(self.source.id))
        return view


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
        self.live = LiveReplies()
        self.stop_button = stop_button_type(self.live)

    async def cog_load(self) -> None:
        self.bot.add_dynamic_items(self.stop_button)  # presses are routed by custom id, also after a restart

    async def cog_unload(self) -> None:
        self.bot.remove_dynamic_items(self.stop_button)

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
            server=message.guild.id if message.guild is not None else None,
        )
        interval = self.settings.edit_interval_seconds

        def view(reply: Reply) -> DiscordReplyView:
            self.live.add(message.id, reply, message.author.id)
            return DiscordReplyView(message, self.stop_button, interval)

        try:
            await self.pipeline.answer(turn, view, assistant=Speaker(me.id, me.display_name))
        except EngineBusyError as busy:
            await self._tell_busy(message, "engine busy", str(busy))
        finally:
            self.live.remove(message.id)

    async def _tell_busy(self, message: discord.Message, why: str, text: str = BUSY_MESSAGE) -> None:
        self.metrics.count_error(ErrorKind.BUSY)
        log.info("%s: told user %s in channel %s to retry", why, message.author.id, message.channel.id)
        await self._reply_short(message, text)

    async def _reply_short(self, message: discord.Message, text: str) -> None:
        await message.channel.send(
            text, reference=message.to_reference(fail_if_not_exists=False), allowed_mentions=NO_PINGS
        )
