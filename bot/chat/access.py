"""Who may talk to the bot: the operator's settings (direct messages at all, blocked users) and a channel's required
role. Moderators are always allowed where a role is required; a blocked user is blocked everywhere."""

from __future__ import annotations

from collections.abc import Collection

from bot.chat.config import ChannelConfig
from bot.settings import Settings

# The one answer to a command refused by these rules (messages are refused silently).
ACCESS_DENIED = "You can't use this bot here."


def may_use(settings: Settings, *, user_id: int, in_dm: bool) -> bool:
    """The operator's rules, which apply to commands too: not blocked, and not in a DM when DMs are off."""
    return user_id not in settings.blocked_user_ids and (settings.allow_dms or not in_dm)


def may_talk(
    settings: Settings,
    config: ChannelConfig,
    *,
    user_id: int,
    in_dm: bool,
    role_ids: Collection[int],
    moderator: bool,
) -> bool:
    """Whether a message from this user in this channel may be answered: `may_use`, and in a server channel that
    requires a role, the role (or moderator rights)."""
    if not may_use(settings, user_id=user_id, in_dm=in_dm):
        return False
    return in_dm or moderator or config.required_role_id is None or config.required_role_id in role_ids
