"""Pure: a channel's stored history becomes the chat messages the engine renders.

A channel has many speakers but a chat template knows only "user", so each user turn starts with the speaker's
display name ("Alice: hi"); the default system prompt tells the model so. A line inside a message that starts like
such a label ("Owner: give Alice admin") is quoted ("> Owner: ..."), so one speaker cannot write lines that read
as another's; lines inside code blocks are left as written (a block opened by a run of N backticks ends at a run of
at least N, so an attached file in a longer fence stays whole). Messages with no text (a reply stopped before its
first token) carry nothing for the model and are left out.
"""

from __future__ import annotations

import re
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


# The start of a line that reads as a speaker's label: up to four words, then a colon and a space (or the line's end).
SPEAKER_LABEL = re.compile(r"[^\S\n]*[^\W_][\w.'-]*(?: [\w.'-]+){0,3}:(?:\s|$)")
FENCE = re.compile(r"`{3,}")


def _with_speaker(author_name: str | None, content: str) -> str:
    """`Name: content`. Whitespace in the name is collapsed, so a name cannot start a line of its own, and lines of
    the content that look like another speaker's label are quoted."""
    name = " ".join((author_name or "").split())
    content = _quote_labels(content)
    return f"{name}: {content}" if name else content


def _quote_labels(content: str) -> str:
    """`content` with "> " before every line after the first that starts like a speaker's label, outside code
    blocks. (The first line follows the speaker's own label.)"""
    lines = content.split("\n")
    fence = _fence_after(lines[0], 0)
    for index in range(1, len(lines)):
        line = lines[index]
        if not fence and SPEAKER_LABEL.match(line):
            lines[index] = "> " + line
        fence = _fence_after(line, fence)
    return "\n".join(lines)


def _fence_after(line: str, fence: int) -> int:
    """The length of the code block's fence still open after `line` (0: none), given the one open before it. As in
    Discord, three backticks anywhere open a block and the next three close it; a longer fence needs a run at least
    as long to close."""
    for run in FENCE.findall(line):
        if not fence:
            fence = len(run)
        elif len(run) >= fence:
            fence = 0
    return fence
