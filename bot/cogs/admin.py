"""Moderation: /reset, /system and /config, with the permission checks made here in code.

`default_permissions` only hides a command from members by default, and server admins can change that, so each
command checks the caller's permissions in this channel itself. In a DM the user may do everything: the
conversation is theirs alone. Changes are answered publicly, so the channel sees what changed; views and denials
are ephemeral.
"""

from __future__ import annotations

from typing import Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot.chat.config import ChannelConfig, prompt_room_problem
from bot.chat.locks import ChannelLocks
from bot.chat.pipeline import TurnPipeline
from bot.cogs.common import Denied, channel_id_of, check_access, require_permission, respond
from bot.replies import DISCORD_LIMIT
from storage.models import MAX_NEW_TOKENS_RANGE, TEMPERATURE_RANGE, TOP_P_RANGE

MAX_SYSTEM_PROMPT = 4000  # longest system prompt accepted (more than one Discord message can show)


def _with_quote(header: str, prompt: str) -> str:
    """`header`, then `prompt` as a block quote, cut to fit one message. The cut comes after quoting, because
    quoting adds "> " to every line: a prompt of short lines grows to several times its length."""
    quoted = header + "\n" + "\n".join("> " + line for line in prompt.splitlines() or [""])
    return quoted if len(quoted) <= DISCORD_LIMIT else quoted[: DISCORD_LIMIT - 1] + "…"


class AdminCog(commands.Cog):
    """Channel moderation: clear the conversation, set the system prompt, tune how the bot answers."""

    def __init__(self, pipeline: TurnPipeline, locks: ChannelLocks) -> None:
        self.store = pipeline.store
        self.settings = pipeline.settings
        self.configs = pipeline.configs  # every settings change goes through it, so its copy stays true
        self.engine = pipeline.engine
        self.locks = locks

    async def interaction_check(self, interaction: discord.Interaction, /) -> bool:
        check_access(interaction, self.settings)
        return True

    @app_commands.command(name="reset", description="Clear this channel's conversation with the bot")
    @app_commands.default_permissions(manage_messages=True)
    async def reset(self, interaction: discord.Interaction) -> None:
        require_permission(interaction, "manage_messages")
        channel_id = channel_id_of(interaction)
        # Deferred only after the checks, so denials stay ephemeral: the first follow-up after a public defer is
        # public. The lock may wait for a reply being written here, which then finishes (and is stored) first.
        await interaction.response.defer(thinking=True)
        async with self.locks(channel_id):
            cleared = await self.store.reset(channel_id, reset_by=interaction.user.id)
        await respond(interaction, f"Conversation cleared ({cleared} messages): I start fresh here.")

    @app_commands.command(name="system", description="Show or set this channel's system prompt")
    @app_commands.describe(
        prompt="The new system prompt for this channel (needs Manage Server)",
        reset="Go back to the default system prompt (needs Manage Server)",
    )
    async def system(
        self,
        interaction: discord.Interaction,
        prompt: app_commands.Range[str, 1, MAX_SYSTEM_PROMPT] | None = None,
        reset: bool = False,
    ) -> None:
        channel_id = channel_id_of(interaction)
        if prompt is None and not reset:
            config = await self.configs.get(channel_id)
            origin = "this channel's own" if "system_prompt" in config.overridden else "the default"
            await respond(interaction, _with_quote(f"System prompt ({origin}):", config.system_prompt), ephemeral=True)
            return
        if prompt is not None and reset:
            raise Denied("Give either a new `prompt` or `reset: True`, not both.")
        require_permission(interaction, "manage_guild")
        if prompt is not None and len(prompt) > MAX_SYSTEM_PROMPT:
            raise Denied(f"A system prompt can be at most {MAX_SYSTEM_PROMPT} characters; this one has {len(prompt)}.")
        await self.configs.update(channel_id, changed_by=interaction.user.id, system_prompt=prompt)
        if prompt is None:
            await respond(interaction, "This channel is back on the default system prompt.")
        else:
            await respond(interaction, _with_quote("System prompt for this channel set:", prompt))

    @app_commands.command(name="config", description="Show or change how the bot answers in this channel")
    @app_commands.default_permissions(manage_guild=True)
    @app_commands.describe(
        reply_mode="mention: answer when mentioned or replied to; all: answer every message",
        temperature=f"Sampling temperature, {TEMPERATURE_RANGE[0]:g} to {TEMPERATURE_RANGE[1]:g} (0 is greedy)",
        top_p=f"Nucleus sampling mass, above {TOP_P_RANGE[0]:g} and up to {TOP_P_RANGE[1]:g}",
        max_new_tokens=f"Longest reply in tokens, {MAX_NEW_TOKENS_RANGE[0]} to {MAX_NEW_TOKENS_RANGE[1]}",
        role="Only members with this role may talk to the bot here (moderators always may); @everyone: anyone",
        reset="Put every setting here back to its default",
    )
    async def config(
        self,
        interaction: discord.Interaction,
        reply_mode: Literal["mention", "all"] | None = None,
        temperature: app_commands.Range[float, TEMPERATURE_RANGE[0], TEMPERATURE_RANGE[1]] | None = None,
        top_p: app_commands.Range[float, TOP_P_RANGE[0], TOP_P_RANGE[1]] | None = None,
        max_new_tokens: app_commands.Range[int, MAX_NEW_TOKENS_RANGE[0], MAX_NEW_TOKENS_RANGE[1]] | None = None,
        role: discord.Role | None = None,
        reset: bool = False,
    ) -> None:
        require_permission(interaction, "manage_guild")
        channel_id = channel_id_of(interaction)
        given = {"reply_mode": reply_mode, "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens}
        changes: dict[str, object] = {name: value for name, value in given.items() if value is not None}
        if role is not None:
            changes["required_role_id"] = None if role.is_default() else role.id  # @everyone: anyone may talk
        given["required_role_id"] = None
        if reset and changes:
            raise Denied("Give either new values or `reset: True`, not both.")
        if reset:
            changes = dict.fromkeys(given)
        if max_new_tokens is not None and (problem := prompt_room_problem(max_new_tokens, self.engine.context_length)):
            raise Denied(f"Nothing changed: {problem}.")
        if changes:
            try:
                config = await self.configs.update(channel_id, changed_by=interaction.user.id, **changes)
            except (ValueError, TypeError) as error:
                # Discord enforces the ranges in its client; this catches what gets past it (top_p = 0, say).
                raise Denied(f"Nothing changed: {error}.") from None
        else:
            config = await self.configs.get(channel_id)
        title = "Channel configuration updated" if changes else "Channel configuration"
        await respond(interaction, embed=self._config_embed(title, config), ephemeral=not changes)

    @staticmethod
    def _config_embed(title: str, config: ChannelConfig) -> discord.Embed:
        embed = discord.Embed(title=title)
        # A role mention never pings in an embed.
        role = "anyone" if config.required_role_id is None else f"<@&{config.required_role_id}>"
        rows = [  # (field shown, setting, value)
            ("reply_mode", "reply_mode", f"`{config.reply_mode.value}`"),
            ("temperature", "temperature", f"`{config.temperature:g}`"),
            ("top_p", "top_p", f"`{config.top_p:g}`"),
            ("max_new_tokens", "max_new_tokens", f"`{config.max_new_tokens}`"),
            ("role", "required_role_id", role),
        ]
        for name, setting, value in rows:
            origin = "set here" if setting in config.overridden else "default"
            embed.add_field(name=name, value=f"{value} ({origin})", inline=True)
        return embed
