"""Chatting: should I answer this message? → store it → build the prompt → stream the reply into Discord.

One path per message, in `on_message`. Each channel (a thread and a DM are channels too) has one lock, held from
storing the user's message to storing the reply, so a message that arrives while the channel is being answered
waits its turn and the history stays in order. Different channels never wait for each other: their prompts meet
in the engine's queue, which batches them together.

A reply streams: typing while the prompt is processed, the first message as soon as the first token arrives, then
at most one edit per EDIT_INTERVAL_SECONDS. Past 2,000 characters it continues in new messages (see
`bot/replies.py`). The newest message carries a Stop button until the reply is done.

Every message the bot sets out to answer is counted once in the metrics by how its reply ended, every failure
once by its kind, and each request the engine accepted logs one line (`bot.logs.log_reply`: ids and numbers,
never text).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING

import discord
from discord.ext import commands

from bot.cogs import ChannelConfig
from bot.conversation import build_chat
from bot.engine.errors import EngineBusyError, EngineError
from bot.engine.sampling import SamplingParams
from bot.logs import log_reply
from bot.metrics import ErrorKind, ReplyOutcome
from bot.replies import EditThrottle, plan_messages, split_message
from storage import ReplyMode, Role

if TYPE_CHECKING:
    from bot.client import LlamacordBot
    from bot.engine.backend import TextStream

log = logging.getLogger(__name__)

NO_PINGS = discord.AllowedMentions.none()
STOP_BUTTON_ID = "llamacord:stop"
BUSY_TEXT = "I'm busy right now. Try again shortly."
ERROR_TEXT = "Sorry, something went wrong while answering. Please try again."
EMPTY_REPLY = "*(no reply)*"
STOPPED_NOTE = "\n\n*(stopped)*"
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


class ReplyWriter:
    """The Discord side of one reply: the messages posted so far, what they show, and where the Stop button is."""

    def __init__(self, source: discord.Message, new_button: Callable[[], StopButton], interval: float) -> None:
        self.source = source
        self.new_button = new_button
        self.throttle = EditThrottle(interval)
        self.messages: list[discord.Message] = []
        self.shown: list[str] = []
        self.button: tuple[int, StopButton] | None = None  # (message index, view)

    async def show(self, text: str, *, final: bool) -> None:
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
        view = self.new_button()
        self.button = (index, view)
        return view

    def stop_button(self) -> None:
        if self.button is not None:
            self.button[1].stop()
            self.button = None


@dataclass(slots=True)
class _ReplyRecord:
    """How one reply is going: its stream once the engine accepted it, and its outcome (failed until it ends)."""

    stream: TextStream | None = None
    outcome: ReplyOutcome = ReplyOutcome.FAILED


class ChatCog(commands.Cog):
    """Answers messages: mentions and replies to the bot in guild channels and threads, every message in DMs,
    and every message in channels whose reply mode is "all"."""

    def __init__(self, bot: LlamacordBot) -> None:
        self.bot = bot
        self._last_prompt: dict[int, float] = {}  # user id → time.monotonic() of their last accepted prompt

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        try:
            if not await self._should_answer(message):
                return
            wait = self._cooldown_left(message.author.id)
            if wait > 0:
                await self._reply_short(message, COOLDOWN_TEXT.format(seconds=max(wait, 1)))
                return
            await self._answer(message)
        except Exception as error:
            self.bot.metrics.count_error(error_kind(error))
            log.exception("answering message %s in channel %s failed", message.id, message.channel.id)
            text = f"Sorry: {error}" if isinstance(error, EngineError) and str(error) else ERROR_TEXT
            with suppress(discord.HTTPException):
                await self._reply_short(message, text)

    async def _should_answer(self, message: discord.Message) -> bool:
        me = self.bot.user
        if me is None or message.author.bot or message.webhook_id is not None:
            return False  # bots (this one included) and webhooks
        if message.type not in CONVERSATION_TYPES or not prompt_text(message, me):
            return False  # system messages, and messages with nothing to answer
        if isinstance(message.channel, discord.DMChannel) or any(user.id == me.id for user in message.mentions):
            return True
        overrides = await self.bot.store.get_channel_settings(message.channel.id)
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
        cooldown = self.bot.settings.user_cooldown_seconds
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

    async def _answer(self, message: discord.Message) -> None:
        """Answer under the channel's lock, and record how the reply ended, whatever happens (errors propagate)."""
        async with self.bot.channel_lock(message.channel.id):
            reply = _ReplyRecord()
            try:
                await self._answer_locked(message, reply)
            finally:
                self._record(message.channel.id, reply)

    async def _answer_locked(self, message: discord.Message, reply: _ReplyRecord) -> None:
        bot, store, channel_id = self.bot, self.bot.store, message.channel.id
        assert bot.user is not None
        config = ChannelConfig.resolve(bot.settings, await store.get_channel_settings(channel_id))
        await store.append_message(
            channel_id,
            Role.USER,
            prompt_text(message, bot.user),
            author_id=message.author.id,
            author_name=message.author.display_name,
            message_id=message.id,
        )
        history = await store.load_history(channel_id, bot.settings.history_limit)
        sampling = SamplingParams(
            temperature=config.temperature, top_p=config.top_p, max_new_tokens=config.max_new_tokens
        )
        async with message.channel.typing():  # while the prompt is processed, until the first token
            prompt = await bot.engine.prepare(build_chat(config.system_prompt, history), config.max_new_tokens)
            try:
                stream = reply.stream = bot.engine.generate(prompt, sampling)
            except EngineBusyError:
                reply.outcome = ReplyOutcome.BUSY
                bot.metrics.count_error(ErrorKind.BUSY)
                log.info("engine busy: told user %s in channel %s to retry", message.author.id, channel_id)
                await self._reply_short(message, BUSY_TEXT)
                return
            deltas = aiter(stream)
            first = await anext(deltas, None)

        stopped = False

        async def stop() -> None:
            nonlocal stopped
            stopped = True
            await stream.cancel()

        writer = ReplyWriter(message, lambda: StopButton(message.author.id, stop), bot.settings.edit_interval_seconds)
        text = first or ""
        try:
            if first is not None:
                await writer.show(text, final=False)
                async for delta in deltas:
                    if stopped:  # tokens generated before the abort may still be queued: drop them
                        break
                    text += delta
                    if writer.throttle.ready():
                        await writer.show(text, final=False)
            cut_short = stopped  # a press after the last token changes nothing
            await asyncio.sleep(writer.throttle.delay())
            await writer.show(text + STOPPED_NOTE if cut_short else text, final=True)
        except Exception:
            with suppress(discord.HTTPException):  # take the Stop button off what was posted
                await writer.show(text, final=True)
            raise
        finally:
            writer.stop_button()
            await stream.cancel()  # a no-op after a finished generation; frees the slot after a failure
        reply.outcome = ReplyOutcome.CANCELLED if cut_short else ReplyOutcome.COMPLETED
        if text.strip():
            await store.append_message(
                channel_id,
                Role.ASSISTANT,
                text,
                author_id=bot.user.id,
                author_name=bot.user.display_name,
                message_id=writer.messages[0].id,
            )

    def _record(self, channel_id: int, reply: _ReplyRecord) -> None:
        request = reply.stream.metrics if reply.stream is not None else None
        self.bot.metrics.observe_reply(reply.outcome, request)
        if request is not None:
            log_reply(channel_id, request, reply.outcome)

    async def _reply_short(self, message: discord.Message, text: str) -> None:
        await message.channel.send(
            text, reference=message.to_reference(fail_if_not_exists=False), allowed_mentions=NO_PINGS
        )
