"""What the bot keeps of members' words follows what they do: deletions and edits on Discord, `/forget`, and the
retention period.

- A deleted message (one, or a bulk delete) takes the stored turn it shows with it, and a deleted user turn takes
  the bot's reply to it: from the prompts and from the database. The raw events are used, so messages older than
  discord.py's cache are covered. A reply still being written to a deleted message stops and keeps nothing.
- An edited message replaces the stored text of its turn; the bot does not answer again on its own.
- `/forget` removes the member's messages (here, or everywhere) and the bot's replies to them, at once.
- With RETENTION_DAYS set, stored messages older than that (archived ones too) are deleted every hour.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import discord
from discord import app_commands
from discord.ext import commands, tasks

from bot.chat.attachments import with_text
from bot.chat.pipeline import TurnPipeline
from bot.cogs.common import channel_id_of, respond
from bot.cogs.reading import prompt_text
from bot.cogs.replying import LiveReplies

log = logging.getLogger(__name__)

RETENTION_CHECK_SECONDS = 3600.0  # how often the retention purge runs
FORGOTTEN_HERE = "Done: I removed {count} messages (yours, and my replies to them) from my memory of this channel."
FORGOTTEN_EVERYWHERE = (
    "Done: I removed {count} messages (yours, and my replies to them) from my memory of every channel and DM."
)


class MemoryCog(commands.Cog):
    """Deletions, edits, /forget and retention, over the pipeline's store and the live replies."""

    def __init__(
        self,
        bot: commands.Bot,
        pipeline: TurnPipeline,
        live: LiveReplies,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.bot = bot
        self.store = pipeline.store
        self.settings = pipeline.settings
        self.live = live
        self.clock = clock  # the retention purge's idea of now

    async def cog_load(self) -> None:
        if self.settings.retention_days:
            self.purging.start()

    async def cog_unload(self) -> None:
        self.purging.cancel()

    @commands.Cog.listener()
    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        await self._deleted({payload.message_id})

    @commands.Cog.listener()
    async def on_raw_bulk_message_delete(self, payload: discord.RawBulkMessageDeleteEvent) -> None:
        await self._deleted(set(payload.message_ids))

    async def _deleted(self, message_ids: set[int]) -> None:
        # The live replies first, so a reply being written stores nothing of what is being deleted.
        await self.live.deleted(message_ids)
        removed = await self.store.delete_discord_messages(sorted(message_ids))
        if removed:
            log.info("deleted %d stored turns after %d Discord messages were deleted", removed, len(message_ids))

    @commands.Cog.listener()
    async def on_raw_message_edit(self, payload: discord.RawMessageUpdateEvent) -> None:
        message, me = payload.message, self.bot.user
        if me is None or message.author.bot or "content" not in payload.data:
            return  # the bot's own streaming edits, and embed unfurls, change nothing stored
        text, names = prompt_text(message, me), [attachment.filename for attachment in message.attachments]
        if await self.store.edit_discord_message(message.id, lambda turn: with_text(turn, text, names)):
            log.info("stored the edited text of message %s in channel %s", message.id, message.channel.id)

    @app_commands.command(name="forget", description="Remove your messages, and my replies to them, from my memory")
    @app_commands.describe(everywhere="In every channel and DM, not only this one")
    async def forget(self, interaction: discord.Interaction, everywhere: bool = False) -> None:
        channel_id = None if everywhere else channel_id_of(interaction)
        await interaction.response.defer(ephemeral=True, thinking=True)
        await self.live.forget(interaction.user.id, channel_id)
        removed = await self.store.forget_author(interaction.user.id, channel_id)
        log.info("forgot %d stored turns of user %s (%s)", removed, interaction.user.id, channel_id or "everywhere")
        text = FORGOTTEN_EVERYWHERE if everywhere else FORGOTTEN_HERE
        await respond(interaction, text.format(count=removed), ephemeral=True)

    async def purge_expired(self) -> int:
        """Delete every stored message older than RETENTION_DAYS (archived ones too); return how many."""
        cutoff = self.clock() - timedelta(days=self.settings.retention_days)
        removed = await self.store.purge_older_than(cutoff)
        if removed:
            log.info("retention: deleted %d stored messages older than %d days", removed, self.settings.retention_days)
        return removed

    @tasks.loop(seconds=RETENTION_CHECK_SECONDS)
    async def purging(self) -> None:
        try:
            await self.purge_expired()
        except Exception:  # the next run tries again; the loop must not die
            log.exception("the retention purge failed")
