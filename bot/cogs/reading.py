"""A Discord message as the model reads it: its text, and its text files fetched from Discord's CDN.

Which files are read and how they join the turn are the rules of `bot.chat.attachments`; this module does the
fetching. Only text files within ATTACHMENT_MAX_BYTES by Discord's own count are fetched (the size is checked
before a byte is read), all at once, within one ATTACHMENT_TIMEOUT_SECONDS for the message. A file that fails
(an HTTP error, a dropped connection, the timeout) is named as not downloaded and logged at WARNING, by id only:
a slow or broken CDN costs a message at most the timeout, and never its answer.
"""

from __future__ import annotations

import asyncio
import logging
import re

import aiohttp
import discord

from bot.chat.attachments import NOT_DOWNLOADED, Attached, join_turn, read, skipped
from bot.settings import Settings

log = logging.getLogger(__name__)


def prompt_text(message: discord.Message, me: discord.abc.User) -> str:
    """The message as the model should read it: the bot's own mention removed, other mentions as @names."""
    text = re.sub(rf"<@!?{me.id}>", "", message.content)
    for user in message.mentions:
        text = text.replace(f"<@{user.id}>", f"@{user.display_name}").replace(f"<@!{user.id}>", f"@{user.display_name}")
    return text.strip()


async def read_turn(message: discord.Message, me: discord.abc.User, settings: Settings) -> str:
    """The text the model should read for `message`: `prompt_text`, then its attachments. Never raises for a file."""
    text = prompt_text(message, me)
    if not message.attachments:
        return text
    deadline = asyncio.get_running_loop().time() + settings.attachment_timeout_seconds
    files = await asyncio.gather(
        *(_attached(message, attachment, settings.attachment_max_bytes, deadline) for attachment in message.attachments)
    )
    return join_turn(text, files)


async def _attached(
    message: discord.Message, attachment: discord.Attachment, max_bytes: int, deadline: float
) -> Attached:
    name = attachment.filename
    unread = skipped(name, attachment.content_type, attachment.size, max_bytes)
    if unread is not None:
        return unread
    try:
        async with asyncio.timeout_at(deadline):
            data = await attachment.read()
    except (discord.HTTPException, aiohttp.ClientError, TimeoutError) as error:
        log.warning(
            "attachment %s of message %s in channel %s could not be downloaded: %s",
            attachment.id,
            message.id,
            message.channel.id,
            f"{type(error).__name__} {getattr(error, 'status', '')}".strip(),  # not the text: it may echo content
        )
        return Attached(name, why=NOT_DOWNLOADED)
    return read(name, data)
