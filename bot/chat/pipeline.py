"""One turn: the channel's history → the prompt → the engine → the reply streamed to a front end → the store.

Every front end (the Discord adapter, the terminal) answers a message through `TurnPipeline.answer`, so the rules of
a turn are written once:

- the prompt is the channel's system prompt and the stored history of its window plus the new message, rendered
  with the channel's sampling settings;
- the window stays put: when the history no longer fits (the token budget, or HISTORY_LIMIT messages), its start
  moves forward in one large step (to half the budget, or half the messages) and is kept in the store, so the next
  turns' prompts begin with the same tokens and reuse the engine's cached prefix (and a restart gives the same
  prompt);
- the new message is stored only once the engine has accepted the request, so a busy engine or a prompt that cannot
  be built leaves no unanswered turn in the history, and a retry is stored once;
- the reply streams to the front end's `ReplyView`; a stopped reply ends with a note, and so does one whose message
  was too long and had its middle cut;
- what the user saw is stored as the assistant's turn (a stopped reply's partial text included: the channel shows
  it, so the model should see it too); a reply that failed, or has no text, is not stored;
- every reply is counted once in the metrics by how it ended, and each request the engine accepted logs one line
  (ids and numbers, never text).

The front end keeps what is its own: deciding whether to answer, the channel's turn order, and how a reply looks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from bot.chat.config import ChannelConfig
from bot.chat.conversation import build_chat, spoken
from bot.engine.api import Engine, RequestMetrics, TextStream
from bot.engine.errors import EngineBusyError
from bot.logs import log_reply
from bot.metrics import Metrics, ReplyOutcome
from bot.settings import Settings
from storage import Role, Store, StoredMessage

log = logging.getLogger(__name__)

STOPPED_NOTE = "\n\n*(stopped)*"
TRUNCATED_NOTE = "\n\n*(your message was too long; I read its start and end)*"


@dataclass(frozen=True, slots=True)
class Speaker:
    """Who said a turn: an id and a display name where the front end has them."""

    id: int | None = None
    name: str | None = None


@dataclass(frozen=True, slots=True)
class UserTurn:
    """A message to answer, as its front end read it (the text the model should see)."""

    channel_id: int
    content: str
    speaker: Speaker
    message_id: int | None = None  # the Discord message, when there is one


class Reply:
    """One reply in progress, as its front end controls it: `stop()` is the Stop button (or Ctrl-C)."""

    def __init__(self) -> None:
        self.stream: TextStream | None = None
        self.stopped = False

    async def stop(self) -> None:
        """Abort the generation at once; the reply ends with what was shown, and a note."""
        self.stopped = True
        if self.stream is not None:
            await self.stream.cancel()


class ReplyView(Protocol):
    """How one front end shows a reply. The pipeline decides what to show and when; the view does the I/O."""

    def preparing(self) -> AbstractAsyncContextManager[object]:
        """Entered while the prompt is built and processed, until the first token (Discord: the typing indicator)."""
        ...

    async def show(self, text: str) -> None:
        """The reply so far; the view paces its own updates and may skip some."""
        ...

    async def finish(self, text: str) -> int | None:
        """The final text (notes included). Returns the id the reply is stored under (Discord: its first message)."""
        ...

    async def abandon(self, text: str) -> None:
        """The reply failed after `text` was shown: leave what is shown, without its controls. Never raises."""
        ...


@dataclass(slots=True)
class ReplyResult:
    """How a reply ended, for the front end to act on."""

    outcome: ReplyOutcome
    metrics: RequestMetrics | None


class TurnPipeline:
    """Answers user turns over one store and one engine, with each channel's configuration."""

    def __init__(self, store: Store, engine: Engine, settings: Settings, metrics: Metrics) -> None:
        self.store = store
        self.engine = engine
        self.settings = settings
        self.metrics = metrics

    async def config(self, channel_id: int) -> ChannelConfig:
        return ChannelConfig.resolve(self.settings, await self.store.get_channel_settings(channel_id))

    async def answer(
        self, turn: UserTurn, make_view: Callable[[Reply], ReplyView], *, assistant: Speaker = Speaker()
    ) -> ReplyResult:
        """Answer `turn` through the view `make_view` builds for the reply; store both turns (the reply under
        `assistant`). Records how the reply ended whatever happens; `EngineBusyError` and other errors propagate
        for the front end to tell the user."""
        reply = Reply()
        outcome = ReplyOutcome.FAILED
        try:
            await self._answer(turn, reply, make_view(reply), assistant)
            outcome = ReplyOutcome.CANCELLED if reply.stopped else ReplyOutcome.COMPLETED
        except EngineBusyError:
            outcome = ReplyOutcome.BUSY
            raise
        finally:
            request = reply.stream.metrics if reply.stream is not None else None
            self.metrics.observe_reply(outcome, request)
            if request is not None:
                log_reply(turn.channel_id, request, outcome)
        return ReplyResult(outcome, request)

    async def _window(self, channel_id: int) -> tuple[list[StoredMessage], bool]:
        """The history of the channel's window, and whether its start must move: past HISTORY_LIMIT messages (with
        the new one), the window keeps the newest half, from a user turn."""
        limit = self.settings.history_limit
        history = await self.store.load_history(channel_id, limit)
        if len(history) < limit:
            return history, False
        newest = history[len(history) - limit // 2 :]
        first_question = next((i for i, message in enumerate(newest) if message.role is Role.USER), len(newest))
        return newest[first_question:], True

    async def _answer(self, turn: UserTurn, reply: Reply, view: ReplyView, assistant: Speaker) -> None:
        store, channel_id = self.store, turn.channel_id
        config = await self.config(channel_id)
        history, moved = await self._window(channel_id)
        history = spoken(history)
        question = StoredMessage(
            id=0,  # not stored yet
            channel_id=channel_id,
            role=Role.USER,
            content=turn.content,
            author_id=turn.speaker.id,
            author_name=turn.speaker.name,
            message_id=turn.message_id,
            created_at=datetime.now(UTC),
        )
        text = ""
        try:
            async with view.preparing():
                chat = build_chat(config.system_prompt, [*history, question])
                prompt = await self.engine.prepare(chat, config.max_new_tokens)
                stream = reply.stream = self.engine.generate(prompt, config.sampling)  # busy: raises at once
                stored = await store.append_message(
                    channel_id,
                    Role.USER,
                    question.content,
                    author_id=question.author_id,
                    author_name=question.author_name,
                    message_id=question.message_id,
                )
                kept = history[prompt.dropped_messages :]
                if moved or prompt.dropped_messages:
                    await store.set_window_start(channel_id, kept[0].id if kept else stored.id)
                deltas = aiter(stream)
                first = await anext(deltas, None)
            if first is not None:
                text = first
                await view.show(text)
                async for delta in deltas:
                    if reply.stopped:  # a press after the last token changes nothing
                        break
                    text += delta
                    await view.show(text)
            notes = (STOPPED_NOTE if reply.stopped else "") + (TRUNCATED_NOTE if prompt.truncated else "")
            message_id = await view.finish(text + notes)
        except BaseException:
            await view.abandon(text)
            raise
        finally:
            if reply.stream is not None:
                await reply.stream.cancel()  # a no-op after a finished generation; frees the slot after a failure
        if text.strip():
            await store.append_message(
                channel_id,
                Role.ASSISTANT,
                text,
                author_id=assistant.id,
                author_name=assistant.name,
                message_id=message_id,
            )
