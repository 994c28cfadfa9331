"""The Discord side of one reply: the messages it is shown in, paced edits, and the Stop button that finds it.

`DiscordReplyView` is the pipeline's `ReplyView` on Discord: typing while the prompt is processed, a placeholder with
the place in line while it waits, the first message as soon as the first token arrives, then at most one edit per
EDIT_INTERVAL_SECONDS. Past 2,000 characters it continues in new messages (see `bot/replies.py`). The newest message
carries a Stop button until the reply is done. A message of the reply deleted meanwhile ends it quietly
(`ReplyGone`).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, suppress
from typing import Any

import discord

from bot.chat.pipeline import Reply, ReplyGone, waiting_text
from bot.replies import EditThrottle, plan_messages, split_message

log = logging.getLogger(__name__)

NO_PINGS = discord.AllowedMentions.none()
STOP_PREFIX = "llamacord:stop:"  # + the id of the message the reply answers
STOP_TEMPLATE = STOP_PREFIX + r"(?P<source>[0-9]+)"
REPLY_ENDED = "This reply has already ended."
EMPTY_REPLY = "*(no reply)*"
STOP_DENIED = "Only the person who asked, or a moderator with Manage Messages, can stop this reply."


class LiveReplies:
    """The replies being written, by the id of the message each answers: where a Stop press, or the deletion of a
    message, finds its reply."""

    def __init__(self) -> None:
        self._replies: dict[int, tuple[Reply, int, DiscordReplyView]] = {}  # answered message id -> reply, asker, view
        self._none = asyncio.Event()  # set while no reply is live
        self._none.set()

    def __len__(self) -> int:
        return len(self._replies)

    def add(self, source_id: int, reply: Reply, asker_id: int, view: DiscordReplyView) -> None:
        self._replies[source_id] = (reply, asker_id, view)
        self._none.clear()

    def remove(self, source_id: int) -> None:
        self._replies.pop(source_id, None)
        if not self._replies:
            self._none.set()

    async def wait_done(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for every live reply to end; True if they all did."""
        try:
            await asyncio.wait_for(self._none.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def forget(self, asker_id: int, channel_id: int | None) -> None:
        """/forget: the asker's replies in progress (in one channel, or everywhere with None) end and keep nothing."""
        for reply, asker, view in list(self._replies.values()):
            if asker == asker_id and channel_id in (None, view.source.channel.id):
                await reply.drop(question=True)

    async def interrupt_all(self) -> int:
        """Interrupt every live reply (shutdown); returns how many there were."""
        replies = [reply for reply, _, _ in self._replies.values()]
        for reply in replies:
            await reply.interrupt()
        return len(replies)

    def get(self, source_id: int) -> tuple[Reply, int] | None:
        found = self._replies.get(source_id)
        return None if found is None else found[:2]

    async def deleted(self, message_ids: set[int]) -> None:
        """Messages were deleted on Discord: a reply that answers one of them, or is shown in one, ends and keeps
        nothing of what was deleted."""
        for source_id, (reply, _, view) in list(self._replies.items()):
            if source_id in message_ids:
                await reply.drop(question=True)
            elif message_ids.intersection(message.id for message in view.messages):
                view.gone = True
                await reply.drop()


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
        self.gone = False  # a message of the reply was deleted: there is nothing left to show it in

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
        except ReplyGone:
            pass  # the placeholder was deleted: the next `show` ends the reply
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
        if self.gone or not self.messages or self.throttle.ready():
            await self._render(text, final=False)

    async def finish(self, text: str) -> list[int]:
        await self._stop_placing()
        await asyncio.sleep(self.throttle.delay())
        await self._render(text, final=True)
        return [message.id for message in self.messages]

    async def abandon(self, text: str) -> None:
        await self._stop_placing()
        if self.messages:
            with suppress(discord.HTTPException):  # take the Stop button off what was posted (and still exists)
                await self._render_parts(text, final=True)

    async def _render(self, text: str, *, final: bool) -> None:
        """Make Discord show `text`: edit the messages whose part changed, post new ones past 2,000 characters,
        and keep the Stop button on the newest message (none once `final`). Raises `ReplyGone` when a message of
        the reply, or the channel, was deleted."""
        if self.gone:
            raise ReplyGone
        try:
            await self._render_parts(text, final=final)
        except discord.NotFound as error:
            self.gone = True
            raise ReplyGone from error

    async def _render_parts(self, text: str, *, final: bool) -> None:
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
