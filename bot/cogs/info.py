"""/info and /tokenize: what model answers here, how busy it is, and how its tokenizer reads a text."""

from __future__ import annotations

import discord
from discord import app_commands
from discord.ext import commands

from bot.cogs.common import check_access, respond
from bot.engine.api import Engine
from bot.settings import Settings

EMBED_DESCRIPTION_LIMIT = 4096
TOKENS_SHOWN = 20  # /tokenize lists this many tokens
TOKEN_TEXT_SHOWN = 40  # characters of one token's text (a token can be a long run of spaces)
MAX_TOKENIZE_TEXT = 2000


def _code_block(lines: list[str], limit: int) -> str:
    """Lines in a code block of at most `limit` characters, dropping whole lines at the end if needed."""
    kept: list[str] = []
    size = len("```\n```")
    for line in lines:
        line = line.replace("```", "`\u200b``")  # a line must not close the block
        if size + len(line) + 1 > limit - 2:
            kept.append("…")
            break
        kept.append(line)
        size += len(line) + 1
    return "```\n" + "\n".join(kept) + "\n```"


class InfoCog(commands.Cog):
    """Read-only commands anyone may use."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings

    async def interaction_check(self, interaction: discord.Interaction, /) -> bool:
        check_access(interaction, self.settings)
        return True

    @app_commands.command(name="info", description="The model and tokenizer behind the bot, and its queue")
    async def info(self, interaction: discord.Interaction) -> None:
        engine = self.engine
        stats = engine.stats()
        embed = discord.Embed(title="Model info", description=_code_block(engine.info.lines(), EMBED_DESCRIPTION_LIMIT))
        embed.add_field(name="Waiting", value=str(stats.waiting))
        embed.add_field(name="Running", value=f"{stats.running} of {stats.max_batch_size}")
        embed.add_field(name="Queue limit", value=str(stats.max_queued_requests))
        await respond(interaction, embed=embed)

    @app_commands.command(name="tokenize", description="Show how the model's tokenizer splits a text")
    @app_commands.describe(text="The text to split into tokens")
    async def tokenize(
        self, interaction: discord.Interaction, text: app_commands.Range[str, 1, MAX_TOKENIZE_TEXT]
    ) -> None:
        tokens = self.engine.tokenize(text)
        rows = [f"{token_id:>7}  {token_text[:TOKEN_TEXT_SHOWN]!r}" for token_id, token_text in tokens[:TOKENS_SHOWN]]
        shown = f"the first {TOKENS_SHOWN}" if len(tokens) > TOKENS_SHOWN else "all of them"
        header = f"**{len(tokens)} tokens** ({shown}, as `id  text`):"
        await respond(interaction, header + "\n" + _code_block(rows, 1800), ephemeral=True)
