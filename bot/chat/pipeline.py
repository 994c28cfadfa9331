"""One turn: the channel's history → the prompt → the engine → the reply streamed to a front end → the store.

Every front end (the Discord adapter, the terminal) answers a message through `TurnPipeline.answer`, so the rules of
a turn are written once:

- the prompt is the channel's system prompt and the stored history of its window plus the new message, rendered
  with the channel's sampling settings;
- the window stays put: when the history no longer fits (the token budget, or HISTORY_LIMIT messages), its start
  moves forward in one large step (to half the budget, or half the messages) and is kept in the store, so the next
  turns' prompts begin with the same tokens and reuse the engine's cached prefix (and a restart gives the same
  prompt);
- the new message is stored only once the reply's first message is shown, so a busy engine, a prompt that cannot be
  built or a channel the front end cannot post to leaves no unanswered turn in the history, and a message sent
  again after a refusal is stored once;
- the reply streams to the front end's `ReplyView`; a stopped reply ends with a note (an interrupted one, at
  shutdown, with its own), and so does one whose message was too long and had its middle cut;
- what the user saw is stored as the assistant's turn (a stopped reply's partial text included: the channel shows
  it, so the model should see it too); a reply that failed, has no text, or was deleted while it streamed is not
  stored, and one whose question was deleted meanwhile leaves no trace of either;
- a retry (`retry`) answers the channel's newest user turn again with the history before it, and its text replaces
  the stored reply;
- every reply is counted once in the metrics by how it ended, and each request the engine accepted logs one line
  (ids and numbers, never text).

The front end keeps what is its own: deciding whether to answer, the channel's turn order, and how a reply looks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Hashable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from bot.chat.admission import FairQueue, QueueFullError, Ticket
from bot.chat.config import ChannelConfig, ChannelConfigs
from bot.chat.conversation import build_chat, spoken
from bot.engine.api import Engine, Prompt, RequestMetrics, TextStream
from bot.engine.errors import EngineBusyError
from bot.logs import log_reply
from bot.metrics import Metrics, ReplyOutcome
from bot.settings import Settings
from storage import Role, Store, StoredMessage

log = logging.getLogger(__name__)

STOPPED_NOTE = "\n\n*(stopped)*"
INTERRUPTED_NOTE = "\n\n*(interrupted)*"  # the bot shut down before the reply was done
TRUNCATED_NOTE = "\n\n*(your message was too long for me, files included; I read its start and end)*"


def waiting_text(ahead: int) -> str:
    """What a message that waits for its turn shows."""
    return "*Waiting in line: you're next.*" if ahead == 0 else f"*Waiting in line: {ahead} ahead of you.*"


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
    server: int | None = None  # the Discord server (guild); None in a DM or the terminal

    @property
    def line(self) -> tuple[Hashable, Hashable]:
        return fair_line(self.server, self.speaker.id)


def fair_line(server: int | None, user_id: int | None) -> tuple[Hashable, Hashable]:
    """Whose turn a request is in the fair line: (server, user); a DM counts as its user's own server."""
    return (server if server is not None else ("dm", user_id)), user_id


class ReplyGone(Exception):
    """Raised by a view: what it showed is gone (Discord: the reply's message was deleted), so nothing is left to
    show the reply in. The pipeline ends the reply quietly, as cancelled, and stores no reply."""


class Reply:
    """One reply in progress, as its front end controls it: `stop()` is the Stop button (or Ctrl-C), `drop()` a
    deletion."""

    def __init__(self, queue: FairQueue) -> None:
        self.stream: TextStream | None = None
        self.ticket: Ticket | None = None
        self.stopped = False
        self.interrupted = False  # stopped because the bot is shutting down
        self.gone = False  # the reply was deleted: store no reply
        self.question_gone = False  # the question was deleted: store neither turn
        self._queue = queue

    async def stop(self) -> None:
        """Abort the generation at once, or take the request out of the line if it still waits; the reply ends
        with what was shown, and a note."""
        self.stopped = True
        if self.ticket is not None and not self.ticket.granted:
            self._queue.leave(self.ticket)
        if self.stream is not None:
            await self.stream.cancel()

    async def interrupt(self) -> None:
        """The bot is shutting down: end as `stop` does, with a note that says so."""
        self.interrupted = True
        await self.stop()

    async def drop(self, *, question: bool = False) -> None:
        """The reply's messages were deleted (with `question`, the message it answers): stop, and keep nothing of
        what was deleted."""
        self.gone = True
        self.question_gone = self.question_gone or question
        await self.stop()


class ReplyView(Protocol):
    """How one front end shows a reply. The pipeline decides what to show and when; the view does the I/O."""

    def preparing(self) -> AbstractAsyncContextManager[object]:
        """Entered while the prompt is built and processed, until the first token (Discord: the typing indicator)."""
        ...

    async def waiting(self, ahead: int) -> None:
        """The request waits for its turn, with `ahead` requests before it (called once the wait is long enough to
        say so, then as the line moves; the view paces its own updates and may skip some)."""
        ...

    async def show(self, text: str) -> None:
        """The reply so far; the view paces its own updates and may skip some. Raises `ReplyGone` when what it
        showed was deleted (so does `finish`)."""
        ...

    async def finish(self, text: str, *, retry: bool) -> list[int]:
        """The final text (notes included); with `retry`, the reply's turn is stored and may be answered again
        (Discord: a Retry button). Returns the ids of the messages that show it (Discord: the reply's messages,
        first to last; the store keeps them with the reply)."""
        ...

    async def abandon(self, text: str) -> None:
        """The reply failed after `text` was shown: leave what is shown, without its controls. Never raises."""
        ...


@dataclass(slots=True)
class ReplyResult:
    """How a reply ended, for the front end to act on."""

    outcome: ReplyOutcome
    metrics: RequestMetrics | None


@dataclass(frozen=True, slots=True)
class Exchange:
    """A channel's newest user turn, the stored reply to it (if any), and the history before it: what Retry
    answers again."""

    question: StoredMessage
    reply: StoredMessage | None
    before: list[StoredMessage]


class TurnPipeline:
    """Answers user turns over one store and one engine, with each channel's configuration."""

    def __init__(self, store: Store, engine: Engine, settings: Settings, metrics: Metrics) -> None:
        self.store = store
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.configs = ChannelConfigs(store, settings)
        self.queue = FairQueue(
            settings.max_batch_size,
            max_queued=settings.max_queued_requests,
            max_active_per_user=settings.max_active_per_user,
            max_waiting_per_user=settings.max_waiting_per_user,
        )

    async def config(self, channel_id: int) -> ChannelConfig:
        return await self.configs.get(channel_id)

    async def answer(
        self, turn: UserTurn, make_view: Callable[[Reply], ReplyView], *, assistant: Speaker = Speaker()
    ) -> ReplyResult:
        """Answer `turn` through the view `make_view` builds for the reply; store both turns (the reply under
        `assistant`). Records how the reply ended whatever happens; `EngineBusyError` and other errors propagate
        for the front end to tell the user."""
        reply = Reply(self.queue)
        return await self._recorded(turn.channel_id, reply, self._answer(turn, reply, make_view(reply), assistant))

    async def newest_exchange(self, channel_id: int) -> Exchange | None:
        """The channel's newest user turn and the stored reply to it (None if it has none yet): what a retry
        answers again. None when the channel has no user turn in its window."""
        history, _ = await self._window(channel_id)
        last_question = next((i for i in range(len(history) - 1, -1, -1) if history[i].role is Role.USER), None)
        if last_question is None:
            return None
        question = history[last_question]
        later = history[last_question + 1 :]
        reply = next((m for m in later if m.role is Role.ASSISTANT and m.reply_to_id == question.id), None)
        return Exchange(question, reply, history[:last_question])

    async def retry(
        self,
        exchange: Exchange,
        line: tuple[Hashable, Hashable],
        make_view: Callable[[Reply], ReplyView],
        *,
        assistant: Speaker = Speaker(),
    ) -> ReplyResult:
        """Answer the exchange's user turn again (the front end checked it is still the newest, under the channel's
        lock), waiting in the fair line as `line`; the new reply replaces the stored one (or is stored, if there was
        none). Outcomes and errors as for `answer`."""
        reply = Reply(self.queue)
        channel_id = exchange.question.channel_id
        return await self._recorded(channel_id, reply, self._retry(exchange, line, reply, make_view(reply), assistant))

    async def _recorded(self, channel_id: int, reply: Reply, work: Awaitable[None]) -> ReplyResult:
        """Run one reply's `work`, and record how it ended whatever happens."""
        outcome = ReplyOutcome.FAILED
        try:
            await work
            outcome = ReplyOutcome.CANCELLED if reply.stopped else ReplyOutcome.COMPLETED
        except QueueFullError as full:
            self.metrics.count_refusal(per_user=full.per_user)
            outcome = ReplyOutcome.BUSY
            raise
        except EngineBusyError:
            outcome = ReplyOutcome.BUSY
            raise
        except ReplyGone:
            reply.gone = True
            outcome = ReplyOutcome.CANCELLED
            log.info("the reply in channel %s was deleted while it was written; generation cancelled", channel_id)
        finally:
            request = self._request_metrics(reply)
            self.metrics.observe_reply(outcome, request)
            if request is not None:
                log_reply(channel_id, request, outcome)
        return ReplyResult(outcome, request)

    @staticmethod
    def _request_metrics(reply: Reply) -> RequestMetrics | None:
        """The engine's figures, with the wait in the fair line added to its queue wait (both are waiting for a
        slot, as the user sees it)."""
        if reply.stream is None:
            return None
        request = reply.stream.metrics
        if reply.ticket is None:
            return request
        return dataclasses.replace(request, queue_wait_s=reply.ticket.waited_s + (request.queue_wait_s or 0.0))

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
        channel_id = turn.channel_id
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
        stored: StoredMessage | None = None

        async def store_question(prompt: Prompt) -> None:
            nonlocal stored
            stored = await self._store_question(question, reply, history, prompt, moved)

        chat = build_chat(config.system_prompt, [*history, question])
        text, shown_in = await self._speak(reply, view, turn.line, chat, config, store_question)
        if stored is not None and reply.question_gone and stored.message_id is not None:
            await self.store.delete_discord_messages([stored.message_id])  # deleted on Discord while being stored
        elif stored is not None and text.strip() and not reply.gone:
            await self._store_reply(stored, text, shown_in, assistant)

    async def _retry(
        self, exchange: Exchange, line: tuple[Hashable, Hashable], reply: Reply, view: ReplyView, assistant: Speaker
    ) -> None:
        question = exchange.question
        config = await self.config(question.channel_id)
        chat = build_chat(config.system_prompt, spoken([*exchange.before, question]))
        text, shown_in = await self._speak(reply, view, line, chat, config, None)
        if not text.strip() or reply.gone or reply.question_gone:
            return
        if exchange.reply is not None:
            first, parts = (shown_in[0], shown_in[1:]) if shown_in else (None, [])
            await self.store.update_reply(exchange.reply.id, text, message_id=first, part_ids=parts)
        else:
            await self._store_reply(question, text, shown_in, assistant)

    async def _store_reply(self, question: StoredMessage, text: str, shown_in: list[int], assistant: Speaker) -> None:
        await self.store.append_message(
            question.channel_id,
            Role.ASSISTANT,
            text,
            author_id=assistant.id,
            author_name=assistant.name,
            message_id=shown_in[0] if shown_in else None,
            reply_to_id=question.id,
            part_ids=shown_in[1:],
        )

    async def _speak(
        self,
        reply: Reply,
        view: ReplyView,
        line: tuple[Hashable, Hashable],
        chat: list[dict[str, str]],
        config: ChannelConfig,
        on_shown: Callable[[Prompt], Awaitable[None]] | None,
    ) -> tuple[str, list[int]]:
        """Wait in the fair line as `line`, generate for `chat` and stream the reply to `view`; `on_shown` runs
        once the reply's first message is shown. Returns the text (without notes) and the ids `view.finish` gave."""
        ticket = reply.ticket = self.queue.enter(*line)  # QueueFullError at once when it may not wait
        text, prompt, told = "", None, on_shown is None
        try:
            async with view.preparing():
                await self._wait_turn(ticket, view)
                if not reply.stopped:  # not stopped while it waited
                    prompt = await self.engine.prepare(chat, config.max_new_tokens)
                    stream = reply.stream = self.engine.generate(prompt, config.sampling)  # busy: raises at once
                    deltas = aiter(stream)
                    text = await anext(deltas, "")
            if text:
                await view.show(text)
                if on_shown is not None and prompt is not None:
                    await on_shown(prompt)
                    told = True
                async for delta in deltas:
                    if reply.stopped:  # a press after the last token changes nothing
                        break
                    text += delta
                    await view.show(text)
            self.queue.leave(ticket)  # the engine is done with it: the next turn need not wait for the last edit
            notes = (INTERRUPTED_NOTE if reply.interrupted else STOPPED_NOTE if reply.stopped else "") + (
                TRUNCATED_NOTE if prompt and prompt.truncated else ""
            )
            shown_in = await view.finish(text + notes, retry=prompt is not None and not reply.question_gone)
            if not told and on_shown is not None and prompt is not None:
                await on_shown(prompt)
        except BaseException:
            await view.abandon(text)
            raise
        finally:
            self.queue.leave(ticket)
            if reply.stream is not None:
                await reply.stream.cancel()  # a no-op after a finished generation; frees the slot after a failure
        return text, shown_in

    async def _store_question(
        self,
        question: StoredMessage,
        reply: Reply,
        history: list[StoredMessage],
        prompt: Prompt | None,
        moved: bool,
    ) -> StoredMessage | None:
        """Store the question once its reply is shown (not if the engine never took it, or it was deleted), and
        move the channel's window start where the prompt began."""
        if prompt is None or reply.question_gone:
            return None
        stored = await self.store.append_message(
            question.channel_id,
            Role.USER,
            question.content,
            author_id=question.author_id,
            author_name=question.author_name,
            message_id=question.message_id,
        )
        kept = history[prompt.dropped_messages :]
        if moved or prompt.dropped_messages:
            await self.store.set_window_start(question.channel_id, kept[0].id if kept else stored.id)
        return stored

    async def _wait_turn(self, ticket: Ticket, view: ReplyView) -> None:
        """Wait in the fair line; once it has taken QUEUE_NOTICE_SECONDS, show the place in it as it moves."""
        try:
            await asyncio.wait_for(self.queue.wait(ticket), self.settings.queue_notice_seconds)
            return
        except TimeoutError:
            pass
        shown = self.queue.ahead(ticket)
        await view.waiting(shown)
        async for ahead in self.queue.moves(ticket):
            if ahead != shown:
                shown = ahead
                await view.waiting(ahead)
