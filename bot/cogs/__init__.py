"""The Discord adapter's cogs, one per concern: chat, admin (moderation) and info. Each is handed what it uses."""

from __future__ import annotations

from discord.ext import commands

from bot.chat.locks import ChannelLocks
from bot.chat.pipeline import TurnPipeline
from bot.cogs.admin import AdminCog
from bot.cogs.chat import ChatCog
from bot.cogs.info import InfoCog


def build_cogs(bot: commands.Bot, pipeline: TurnPipeline, locks: ChannelLocks) -> list[commands.Cog]:
    """The bot's cogs over one turn pipeline (its store, engine, settings and metrics) and one set of channel locks."""
    return [
        ChatCog(bot, pipeline, locks),
        AdminCog(pipeline, locks),
        InfoCog(pipeline.engine),
    ]
