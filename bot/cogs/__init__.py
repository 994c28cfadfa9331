"""The Discord adapter's cogs, one per concern: chat, memory (deletions, edits, /forget, retention), admin
(moderation) and info. Each is handed what it uses."""

from __future__ import annotations

from discord.ext import commands

from bot.chat.locks import ChannelLocks
from bot.chat.pipeline import TurnPipeline
from bot.cogs.admin import AdminCog
from bot.cogs.chat import ChatCog
from bot.cogs.info import InfoCog
from bot.cogs.memory import MemoryCog
from bot.cogs.replying import LiveReplies


def build_cogs(bot: commands.Bot, pipeline: TurnPipeline, locks: ChannelLocks) -> list[commands.Cog]:
    """The bot's cogs over one turn pipeline (its store, engine, settings and metrics) and one set of channel locks."""
    live = LiveReplies()  # the replies being written: the chat cog's, which deletions and /forget also reach
    return [
        ChatCog(bot, pipeline, locks, live),
        MemoryCog(bot, pipeline, live),
        AdminCog(pipeline, locks),
        InfoCog(pipeline.engine, pipeline.settings),
    ]
