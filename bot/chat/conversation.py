"""Pure: a channel's stored history becomes the chat messages the engine renders.

A channel has many speakers but a chat template knows only "user", so each user turn starts with the speaker's
display name ("Alice: hi"); the default system prompt tells the model so. Messages with no text (an attachment
only, a reply stopped before its first token) carry nothing for the model and are left out.
"""

from __future__ import annotations

from collections.abc import Sequence

from storage.models import Role, StoredMessage


def spoken(history: Sequence[StoredMessage]) -> list[StoredMessage]:
    """The messages of `history` that carry text for the model, in order: those `build_chat` renders."""
    return [message for message in history if message.content.strip()]


def build_chat(system_prompt: str, history: Sequence[StoredMessage]) -> list[dict[str, str]]:
    """The system prompt (if not blank), then the `spoken` messages of `history` in order, as `{"role", "content"}`
    dicts."""
    chat: list[dict[str, str]] = []
    if system_prompt.strip():
        chat.append({"role": Role.SYSTEM.value, "content": system_prompt.strip()})
    for message in spoken(history):
        content = message.content.strip()
        role = Role(message.role)
        if role is Role.USER:
            content = _with_speaker(message.author_name, content)
        chat.append({"role": role.value, "content": content})
    return chat


def _with_speaker(author_name: str | None, content: str) -> str:
    """`Name: content`. Whitespace in the name is collapsed, so a name cannot start a line of its own."""
    name = " ".join((author_name or "").split())
    return f"{name}: {content}" if name else content
