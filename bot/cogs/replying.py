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
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, suppress
from typing import Any

import discord

from bot.chat.pipeline import Reply, ReplyGone, waiting_text
from bot.replies import EditThrottle, plan_messages, split_message

log = logging.getLogger(__name__)

NO_PINGS = discord.AllowedMentions.none()
STOP_PREFIX = "llamacord:stop:"  # + the id of the message the reply answers
REPLY_ENDED = "This reply has already ended."
EMPTY_REPLY = "*(no reply)*"
STOP_DENIED = "Only the person who asked, or a moderator with Manage Messages, can stop this reply."
RETRY_PREFIX = "llamacord:retry:"  # + the id of the message the reply answers
RETRY_DENIED = "Only the person who asked, or a moderator with Manage Messages, can retry this reply."
RETRY_STALE = "Only the newest reply in a channel can be retried."
RETRY_PLACEHOLDER = "…"  # what a retried reply's surplus messages show until they are deleted

ButtonFactory = Callable[[int], discord.ui.Item[Any]]  # the id of the answered message -> the button
ButtonHandler = Callable[[discord.Interaction, int], Awaitable[None]]  # a press, with the answered message's id


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


PersistentButton = type[discord.ui.DynamicItem[discord.ui.Button[discord.ui.View]]]


def persistent_button(label: str, style: discord.ButtonStyle, prefix: str, handler: ButtonHandler) -> PersistentButton:
    """A button whose custom id names the message a reply answers (`prefix` + its id), routed by discord.py's dynamic
    items: a press on any message that carries it (a button moves to a long reply's newest message), also one left
    from before a restart, reaches `handler` with that id instead of failing."""

    class Button(discord.ui.DynamicItem[discord.ui.Button[discord.ui.View]], template=prefix + r"(?P<source>[0-9]+)"):
        def __init__(self, source_id: int) -> None:
            button: discord.ui.Button[discord.ui.View] = discord.ui.Button(
                label=label, style=style, custom_id=f"{prefix}{source_id}"
            )
            super().__init__(button)
            self.source_id = source_id

        @classmethod
        async def from_custom_id(
            cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str]
        ) -> Button:
            return cls(int(match["source"]))

        async def callback(self, interaction: discord.Interaction) -> None:
            await handler(interaction, self.source_id)

    return Button


def stop_button_type(live: LiveReplies) -> PersistentButton:
    """Stop: finds its reply among the live ones (or says it has ended) and stops it, for the asker or a moderator."""

    async def stop(interaction: discord.Interaction, source_id: int) -> None:
        found = live.get(source_id)
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

    return persistent_button("Stop", discord.ButtonStyle.danger, STOP_PREFIX, stop)


def retry_button_type(handler: ButtonHandler) -> PersistentButton:
    """Retry, on the newest reply of a channel: `handler` (the chat cog) decides and answers again."""
    return persistent_button("Retry", discord.ButtonStyle.secondary, RETRY_PREFIX, handler)


class DiscordReplyView:
    """The Discord side of one reply (`bot.chat.pipeline.ReplyView`): the messages posted so far, what they show,
    and where its button is (Stop while it runs; Retry, if offered, once it is done).

    A retry shows the new reply in the old reply's messages (`replacing`): the first is edited, the others are reused
    as the text grows, and those left over are deleted (`delete_surplus`) once the store no longer maps them."""

    def __init__(
        self,
        source: discord.Message | discord.PartialMessage,
        stop_button: ButtonFactory,
        interval: float,
        *,
        retry_button: ButtonFactory | None = None,
        replacing: Sequence[discord.PartialMessage] = (),
    ) -> None:
        self.source = source
        self.stop_button = stop_button
        self.retry_button = retry_button
        self.throttle = EditThrottle(interval)
        self.messages: list[discord.Message | discord.PartialMessage] = list(replacing)
        self.shown: list[str] = [""] * len(self.messages)  # unknown: each is edited the first time
        self.button_at: int | None = None  # the index of the message that carries the button
        self.button: ButtonFactory | None = None  # which button that is
        self.offered_retry: discord.Message | discord.PartialMessage | None = None  # the message with Retry, at the end
        self.surplus: list[discord.Message | discord.PartialMessage] = []  # a retry's messages no longer needed
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

    async def finish(self, text: str, *, retry: bool) -> list[int]:
        await self._stop_placing()
        await asyncio.sleep(self.throttle.delay())
        button = self.retry_button if retry else None
        await self._render(text, final=True, button=button)
        if button is not None and self.messages:
            self.offered_retry = self.messages[-1]
        return [message.id for message in self.messages]

    async def abandon(self, text: str) -> None:
        await self._stop_placing()
        if self.messages:
            with suppress(discord.HTTPException):  # take the Stop button off what was posted (and still exists)
                await self._render_parts(text, final=True, button=None)

    async def delete_surplus(self) -> None:
        """Delete what a retry no longer needs of the old reply's messages (once the store maps the new ones)."""
        surplus, self.surplus = self.surplus, []
        for message in surplus:
            try:
                await message.delete()
            except discord.HTTPException:  # gone already, or no longer ours to delete: the new reply stands
                log.debug("could not delete message %s left over by a retry", message.id, exc_info=True)

    async def _render(self, text: str, *, final: bool, button: ButtonFactory | None = None) -> None:
        """Make Discord show `text`: edit the messages whose part changed, post new ones past 2,000 characters,
        and keep the Stop button on the newest message (once `final`, `button` or none). Raises `ReplyGone` when a
        message of the reply, or the channel, was deleted."""
        if self.gone:
            raise ReplyGone
        try:
            await self._render_parts(text, final=final, button=button)
        except discord.NotFound as error:
            self.gone = True
            raise ReplyGone from error

    async def _render_parts(self, text: str, *, final: bool, button: ButtonFactory | None = None) -> None:
        wanted = split_message(text) or [EMPTY_REPLY]
        if final:  # a retry's old messages beyond the new text go (see `delete_surplus`)
            self.surplus += self.messages[len(wanted) :]
            del self.messages[len(wanted) :], self.shown[len(wanted) :]
            if self.button_at is not None and self.button_at >= len(wanted):
                self.button_at, self.button = None, None  # its message goes
        else:  # until then, they wait with a placeholder below the new text
            wanted += [RETRY_PLACEHOLDER] * (len(self.messages) - len(wanted))
        button = button if final else self.stop_button
        button_at = len(wanted) - 1 if button is not None else None
        plan = plan_messages(self.shown, wanted)
        edits = dict(plan.edits)
        if (self.button_at, self.button) != (button_at, button):  # messages edited only to change their button
            for index in (self.button_at, button_at):
                if index is not None and index < len(self.shown):
                    edits.setdefault(index, self.shown[index])
        for index, content in sorted(edits.items()):
            view = self._view_for(index, button_at, button)
            self.messages[index] = await self.messages[index].edit(
                content=content, view=view, allowed_mentions=NO_PINGS
            )
            self.shown[index] = content
        for content in plan.sends:
            view = self._view_for(len(self.messages), button_at, button)
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

    def _view_for(self, index: int, button_at: int | None, button: ButtonFactory | None) -> discord.ui.View | None:
        """The view message `index` should carry: `button` on the newest message (Stop while the reply runs)."""
        if index != button_at or button is None:
            if self.button_at == index:
                self.button_at, self.button = None, None
            return None
        self.button_at, self.button = index, button
        view = discord.ui.View(timeout=None)  # a timeout would leave a dead button behind
        view.add_item(button(self.source.id))
        return view
