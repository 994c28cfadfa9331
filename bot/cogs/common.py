"""What the cogs share: denials shown to the user, permission checks made in code, and answering an interaction."""

from __future__ import annotations

import discord
from discord import app_commands

from bot.chat.access import ACCESS_DENIED, may_use
from bot.settings import Settings


class Denied(app_commands.AppCommandError):
    """A command refused for a reason the user should read; the tree's error handler shows it ephemerally."""


PRIVATE_CHANNEL_DENIED = "That only works in a server channel or in your own DM with me."


def require_permission(interaction: discord.Interaction, permission: str) -> None:
    """Raise `Denied` unless the user holds `permission` (a `discord.Permissions` attribute) in this channel.

    Checked here in code, because server admins can override a command's `default_permissions`. In the bot's own DM
    no one else is in the conversation, so the user may do anything there; a group DM has other members and no
    permissions to ask, so no one may (the commands are not offered there either: see `bot.client`).
    """
    if interaction.guild_id is None:
        if interaction.context.dm_channel:
            return
        raise Denied(PRIVATE_CHANNEL_DENIED)
    if getattr(interaction.permissions, permission):
        return
    label = permission.replace("_", " ").title().replace("Guild", "Server")
    raise Denied(f"You need the **{label}** permission in this channel to do that.")


def check_access(interaction: discord.Interaction, settings: Settings) -> None:
    """Raise `Denied` for a user the operator's settings refuse here (blocked, or a DM with DMs off): the checks the
    chat cog makes silently for messages, made for commands with an answer."""
    if not may_use(settings, user_id=interaction.user.id, in_dm=interaction.guild_id is None):
        raise Denied(ACCESS_DENIED)


def channel_id_of(interaction: discord.Interaction) -> int:
    if interaction.channel_id is None:
        raise Denied("This command only works in a channel, thread or DM.")
    return interaction.channel_id


async def respond(
    interaction: discord.Interaction,
    content: str | None = None,
    *,
    embed: discord.Embed | None = None,
    ephemeral: bool = False,
) -> None:
    """Answer an interaction whether or not it was deferred. A deferred one takes a follow-up, and the first
    follow-up after a defer replaces its "thinking…" message with the defer's visibility: Discord ignores
    `ephemeral` there, so an error after a public defer shows publicly (keep such texts short and channel-fit)."""
    no_pings = discord.AllowedMentions.none()
    embed_or_missing = embed if embed is not None else discord.utils.MISSING
    if interaction.response.is_done():
        await interaction.followup.send(content, embed=embed_or_missing, ephemeral=ephemeral, allowed_mentions=no_pings)
    else:
        await interaction.response.send_message(
            content, embed=embed_or_missing, ephemeral=ephemeral, allowed_mentions=no_pings
        )
