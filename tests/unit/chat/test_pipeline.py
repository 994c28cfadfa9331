"""The rules of one turn (`bot.chat.pipeline`), on a real store and an engine that streams scripted text."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from bot.chat.admission import QueueFullError
from bot.chat.pipeline import STOPPED_NOTE, TRUNCATED_NOTE, Reply, ReplyGone, Speaker, TurnPipeline, UserTurn
from bot.engine.api import EngineStats, FinishReason, Prompt, StreamBase
from bot.engine.errors import EngineBusyError, GenerationError, PromptError
from bot.engine.sampling import SamplingParams
from bot.engine.templating import WINDOW_KEEP, PromptBuilder
from bot.engine.token_estimate import EstimatingTokenizer
from bot.metrics import Metrics, ReplyOutcome
from bot.settings import Settings
from storage import Role, Store, open_store

CHANNEL = 42
ALICE = Speaker(7, "Alice")
BOT = Speaker(99, "llamacord")


class ScriptedStream(StreamBase):
    """Yields `pieces` one per read, then ends (or fails with `error`)."""

    def __init__(self, pieces: list[str], error: Exception | None, *, held: bool = False) -> None:
        super().__init__("scripted", prompt_tokens=5, abort=lambda stream: stream._finish(FinishReason.CANCELLED))
        self.pieces = list(pieces)
        self.error = error
        self.held = held  # while held, nothing comes: the request keeps its batch slot

    @property
    def running(self) -> bool:
        return True

    def release(self) -> None:
        self.held = False
        self._wake()

    def _take(self) -> str:
        if self.held:
            return ""
        if self.pieces:
            return self.pieces.pop(0)
        if not self.finished:
            if self.error is not None:
                self._finish(FinishReason.ERROR, GenerationError(str(self.error)))
            else:
                self._finish(FinishReason.STOP)
        return ""


class ScriptedEngine:
    """The engine API in plain Python: records each chat, prompt and request's sampling. With `budget`, prompts are
    built by the real `PromptBuilder` over the estimating tokenizer (pure Python), as a remote engine builds them."""

    def __init__(self, pieces: list[str], *, truncated: bool = False, budget: int | None = None) -> None:
        self.pieces = pieces
        self.truncated = truncated
        self.builder = PromptBuilder(EstimatingTokenizer(), budget, 100_000) if budget is not None else None
        self.error: Exception | None = None  # raised mid-stream
        self.hold = False  # streams start held (see `ScriptedStream.release`)
        self.streams: list[ScriptedStream] = []
        self.refuse: Exception | None = None  # raised by prepare (PromptError) or generate (EngineBusyError)
        self.chats: list[list[dict[str, str]]] = []
        self.prompts: list[Prompt] = []
        self.params: list[SamplingParams] = []

    async def prepare(self, messages: Sequence[Mapping[str, str]], max_new_tokens: int) -> Prompt:
        self.chats.append([dict(message) for message in messages])
        if isinstance(self.refuse, PromptError):
            raise self.refuse
        if self.builder is not None:
            self.prompts.append(self.builder.build(messages, max_new_tokens))
        else:
            self.prompts.append(Prompt([1, 2, 3], 3, 0, self.truncated, [dict(m) for m in messages]))
        return self.prompts[-1]

    def generate(self, prompt: Prompt, params: SamplingParams) -> ScriptedStream:
        if isinstance(self.refuse, EngineBusyError):
            raise self.refuse
        self.params.append(params)
        self.streams.append(ScriptedStream(self.pieces, self.error, held=self.hold))
        return self.streams[-1]

    def stats(self) -> EngineStats:
        return EngineStats(0, 0, 1, 0)


class RecordingView:
    """Shows nothing; keeps what it was asked to show. With `stop_after`, presses Stop after that many shows."""

    def __init__(self, reply: Reply, stop_after: int | None = None) -> None:
        self.reply = reply
        self.stop_after = stop_after
        self.prepared = 0
        self.shown: list[str] = []
        self.final: str | None = None
        self.abandoned: str | None = None
        self.retry: bool | None = None  # whether `finish` offered to answer again
        self.places: list[int] = []

    @asynccontextmanager
    async def preparing(self) -> AsyncIterator[None]:
        self.prepared += 1
        yield

    async def show(self, text: str) -> None:
        self.shown.append(text)
        if self.stop_after is not None and len(self.shown) >= self.stop_after:
            await self.reply.stop()

    async def waiting(self, ahead: int) -> None:
        self.places.append(ahead)

    async def finish(self, text: str, *, retry: bool) -> list[int]:
        self.final, self.retry = text, retry
        return [555, 556]

    async def abandon(self, text: str) -> None:
        self.abandoned = text


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with open_store(tmp_path / "chat.sqlite3") as store:
        yield store


def pipeline_on(
    store: Store, engine: ScriptedEngine, metrics: Metrics | None = None, **settings: object
) -> TurnPipeline:
    values: dict[str, object] = {"system_prompt": "Be kind.", "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 64}
    config = Settings(_env_file=None, **(values | settings))  # type: ignore[call-arg]
    return TurnPipeline(store, engine, config, metrics or Metrics())  # type: ignore[arg-type]


async def answer(pipeline: TurnPipeline, text: str, **view_options: int) -> tuple[RecordingView, ReplyOutcome]:
    views: list[RecordingView] = []

    def view(reply: Reply) -> RecordingView:
        views.append(RecordingView(reply, **view_options))
        return views[-1]

    result = await pipeline.answer(UserTurn(CHANNEL, text, ALICE, message_id=1000), view, assistant=BOT)
    return views[0], result.outcome


def counted(metrics: Metrics) -> dict[str, float]:
    samples = {o: metrics.registry.get_sample_value("llamacord_replies_total", {"outcome": o}) for o in ReplyOutcome}
    return {str(outcome): value for outcome, value in samples.items() if value}


async def test_a_turn_is_prompted_with_the_history_streamed_and_stored(store: Store) -> None:
    await store.append_message(CHANNEL, Role.USER, "earlier", author_id=8, author_name="Bob")
    await store.append_message(CHANNEL, Role.ASSISTANT, "an earlier answer")
    engine = ScriptedEngine(["Hel", "lo ", "Alice"])
    metrics = Metrics()
    view, outcome = await answer(pipeline_on(store, engine, metrics), "hi there")

    assert engine.chats[0] == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Bob: earlier"},
        {"role": "assistant", "content": "an earlier answer"},
        {"role": "user", "content": "Alice: hi there"},
    ]
    assert view.prepared == 1 and view.shown == ["Hel", "Hello ", "Hello Alice"] and view.final == "Hello Alice"
    history = await store.load_history(CHANNEL, 10)
    assert [(m.role, m.content, m.author_id, m.message_id) for m in history[2:]] == [
        (Role.USER, "hi there", ALICE.id, 1000),
        (Role.ASSISTANT, "Hello Alice", BOT.id, 555),
    ]
    assert outcome is ReplyOutcome.COMPLETED and counted(metrics) == {"completed": 1}


async def test_the_channels_config_sets_the_system_prompt_and_sampling(store: Store) -> None:
    await store.update_channel_settings(
        CHANNEL, changed_by=None, system_prompt="Talk like a pirate.", temperature=0.0, max_new_tokens=7
    )
    engine = ScriptedEngine(["Arr"])
    await answer(pipeline_on(store, engine), "hello")
    assert engine.chats[0][0] == {"role": "system", "content": "Talk like a pirate."}
    assert engine.params == [SamplingParams(temperature=0.0, top_p=0.9, max_new_tokens=7)]


@pytest.mark.parametrize("refusal", [EngineBusyError(), PromptError("The system prompt alone is too long.")])
async def test_a_refused_request_stores_nothing(store: Store, refusal: Exception) -> None:
    engine = ScriptedEngine(["never"])
    engine.refuse = refusal
    metrics = Metrics()
    with pytest.raises(type(refusal)):
        await answer(pipeline_on(store, engine, metrics), "anyone there?")
    assert await store.load_history(CHANNEL, 10) == []
    expected = "busy" if isinstance(refusal, EngineBusyError) else "failed"
    assert counted(metrics) == {expected: 1}


async def test_a_stopped_reply_ends_with_a_note_and_stores_what_was_shown(store: Store) -> None:
    engine = ScriptedEngine(["one ", "two ", "three"])
    metrics = Metrics()
    view, outcome = await answer(pipeline_on(store, engine, metrics), "count", stop_after=1)
    assert view.final == "one " + STOPPED_NOTE
    history = await store.load_history(CHANNEL, 10)
    assert [(m.role, m.content) for m in history] == [(Role.USER, "count"), (Role.ASSISTANT, "one ")]
    assert outcome is ReplyOutcome.CANCELLED and counted(metrics) == {"cancelled": 1}


async def test_a_failed_reply_keeps_the_question_but_not_the_half_answer(store: Store) -> None:
    engine = ScriptedEngine(["Half an answ"])
    engine.error = RuntimeError("Generation failed.")
    metrics = Metrics()
    with pytest.raises(GenerationError):
        await answer(pipeline_on(store, engine, metrics), "this will fail")
    history = await store.load_history(CHANNEL, 10)
    assert [m.role for m in history] == [Role.USER]
    assert counted(metrics) == {"failed": 1}


async def test_nothing_is_stored_when_the_reply_cannot_be_posted_or_fails_before_its_first_token(
    store: Store,
) -> None:
    class Refused(RecordingView):
        async def show(self, text: str) -> None:
            raise PermissionError("403 Missing Permissions")

    def refused(reply: Reply) -> Refused:
        return Refused(reply)

    pipeline = pipeline_on(store, ScriptedEngine(["Hello"]))
    with pytest.raises(PermissionError):
        await pipeline.answer(UserTurn(CHANNEL, "hi", ALICE, message_id=1000), refused)
    engine = ScriptedEngine([])
    engine.error = RuntimeError("Generation failed.")
    with pytest.raises(GenerationError):
        await answer(pipeline_on(store, engine), "this fails at once")
    assert await store.load_history(CHANNEL, 10) == []


@pytest.mark.parametrize("question_deleted", [False, True])
async def test_a_deleted_reply_ends_quietly_as_cancelled_and_keeps_nothing_deleted(
    store: Store, question_deleted: bool
) -> None:
    class Deleted(RecordingView):
        async def show(self, text: str) -> None:
            await super().show(text)
            if len(self.shown) == 2 and question_deleted:
                await self.reply.drop(question=True)
            elif len(self.shown) == 2:
                raise ReplyGone

    views: list[Deleted] = []

    def deleted(reply: Reply) -> Deleted:
        views.append(Deleted(reply))
        return views[-1]

    metrics = Metrics()
    engine = ScriptedEngine(["one ", "two ", "three ", "four"])
    result = await pipeline_on(store, engine, metrics).answer(
        UserTurn(CHANNEL, "count", ALICE, message_id=1000), deleted
    )
    assert result.outcome is ReplyOutcome.CANCELLED and counted(metrics) == {"cancelled": 1}
    assert views[0].shown == ["one ", "one two "]
    assert engine.streams[0].metrics.finish_reason == FinishReason.CANCELLED
    expected = [] if question_deleted else [(Role.USER, "count")]
    assert [(m.role, m.content) for m in await store.load_history(CHANNEL, 10)] == expected


async def test_retry_answers_the_newest_turn_again_and_replaces_its_stored_reply(store: Store) -> None:
    engine = ScriptedEngine(["first"])
    pipeline = pipeline_on(store, engine)
    await answer(pipeline, "earlier question")
    view, _ = await answer(pipeline, "the question")
    assert view.retry is True  # stored, so it may be answered again
    exchange = await pipeline.newest_exchange(CHANNEL)
    assert exchange is not None and exchange.question.content == "the question"
    assert exchange.reply is not None and exchange.reply.content == "first"

    engine.pieces = ["second"]
    views: list[RecordingView] = []

    def view_of(reply: Reply) -> RecordingView:
        views.append(RecordingView(reply))
        return views[-1]

    result = await pipeline.retry(exchange, ("server", ALICE.id), view_of, assistant=BOT)
    assert result.outcome is ReplyOutcome.COMPLETED and views[0].final == "second"
    assert engine.chats[-1] == engine.chats[-2], "the retry saw the conversation the first answer saw"
    history = await store.load_history(CHANNEL, 10)
    assert [m.content for m in history] == ["earlier question", "first", "the question", "second"]
    assert history[3].id == exchange.reply.id and history[3].message_id == 555


async def test_a_blank_reply_is_shown_but_not_stored(store: Store) -> None:
    view, _ = await answer(pipeline_on(store, ScriptedEngine(["\n", "  "])), "say nothing")
    assert view.final == "\n  "
    assert [m.role for m in await store.load_history(CHANNEL, 10)] == [Role.USER]


async def test_a_message_cut_to_fit_gets_a_note_that_is_not_stored(store: Store) -> None:
    view, _ = await answer(pipeline_on(store, ScriptedEngine(["Got it."], truncated=True)), "a very long paste")
    assert view.final == "Got it." + TRUNCATED_NOTE
    assert (await store.load_history(CHANNEL, 10))[-1].content == "Got it."


def first_of_window(engine: ScriptedEngine, turn: int) -> str:
    """The first history message of turn `turn`'s prompt (after the system prompt)."""
    return engine.prompts[turn].messages[1]["content"]


async def talk(pipeline: TurnPipeline, turns: range) -> None:
    for n in turns:
        await answer(pipeline, f"question {n}: " + "words " * 12)


async def test_the_window_stays_put_for_several_turns_then_moves_in_one_step(store: Store) -> None:
    budget = 300
    engine = ScriptedEngine(["an answer " * 6], budget=budget)
    await talk(pipeline_on(store, engine), range(30))
    starts = [first_of_window(engine, n) for n in range(30)]
    moves = [n for n in range(1, 30) if starts[n] != starts[n - 1]]
    assert len(moves) >= 2, "the history outgrew the budget more than once"
    assert all(later - earlier >= 3 for earlier, later in itertools.pairwise(moves)), "it moves in large steps"
    for move in moves:
        assert engine.prompts[move].num_tokens <= budget * WINDOW_KEEP, "a move leaves a good part of the budget free"
    assert all(prompt.num_tokens <= budget for prompt in engine.prompts)
    assert all(engine.prompts[n].dropped_messages == 0 for n in range(30) if n not in moves)


async def test_the_window_is_the_same_after_a_restart(store: Store, tmp_path: Path) -> None:
    engine = ScriptedEngine(["an answer " * 6], budget=300)
    await talk(pipeline_on(store, engine), range(12))
    before = first_of_window(engine, -1)
    assert not before.startswith("Alice: question 0:"), "the window moved at least once"
    async with open_store(store.path) as reopened:
        after = ScriptedEngine(["an answer " * 6], budget=300)
        await talk(pipeline_on(reopened, after), range(12, 13))
    assert first_of_window(after, 0) == before


async def test_reset_and_a_new_system_prompt_start_the_window_over(store: Store) -> None:
    engine = ScriptedEngine(["an answer " * 6], budget=300)
    pipeline = pipeline_on(store, engine)
    await talk(pipeline, range(12))
    await store.reset(CHANNEL)
    await talk(pipeline, range(12, 13))
    assert engine.chats[-1][1:] == [{"role": "user", "content": "Alice: question 12: " + "words " * 11 + "words"}]

    await talk(pipeline, range(13, 18))
    await pipeline.configs.update(CHANNEL, changed_by=None, system_prompt="Be kind. " * 25)
    await talk(pipeline, range(18, 24))
    assert engine.chats[-1][0]["content"] == ("Be kind. " * 25).strip()
    starts = [first_of_window(engine, n) for n in range(18, 24)]
    assert len(set(starts)) <= 2, "with the longer system prompt the window moves once at most, then stays"
    assert starts[-1] == starts[-2]


async def test_history_limit_moves_the_window_to_its_newest_half(store: Store) -> None:
    engine = ScriptedEngine(["ok"])
    pipeline = pipeline_on(store, engine, history_limit=10)
    await talk(pipeline, range(12))
    counts = [len(chat) - 1 for chat in engine.chats]  # history + the new message, without the system prompt
    # Up to 10 messages, then the newest half from a user turn (4 of the 5 newest), growing again from there.
    assert counts == [1, 3, 5, 7, 9, 5, 7, 9, 5, 7, 9, 5]
    assert all(chat[1]["role"] == "user" for chat in engine.chats)
    assert engine.chats[6][1:4] == engine.chats[5][1:4], "the window stays where it moved"


async def test_a_request_waits_its_turn_shows_its_place_and_stop_takes_it_out(store: Store) -> None:
    engine = ScriptedEngine(["slow answer"])
    engine.hold = True
    pipeline = pipeline_on(store, engine, max_batch_size=1, queue_notice_seconds=0)
    first = asyncio.create_task(answer(pipeline, "the first question"))
    await eventually(lambda: engine.streams)
    views: list[RecordingView] = []

    def view(reply: Reply) -> RecordingView:
        views.append(RecordingView(reply))
        return views[-1]

    waiting = asyncio.create_task(pipeline.answer(UserTurn(CHANNEL, "and mine?", Speaker(8, "Bob")), view))
    await eventually(lambda: views and views[0].places)
    assert views[0].places == [0] and pipeline.queue.waiting == 1
    await views[0].reply.stop()  # the Stop button on the placeholder
    result = await asyncio.wait_for(waiting, 5)
    assert result.outcome is ReplyOutcome.CANCELLED and views[0].final == STOPPED_NOTE
    assert views[0].retry is False, "nothing was stored to answer again"
    assert pipeline.queue.waiting == 0 and len(engine.streams) == 1, "it never reached the engine"
    engine.streams[0].release()
    first_view, _ = await asyncio.wait_for(first, 5)
    assert first_view.retry is True
    assert [m.content for m in await store.load_history(CHANNEL, 10) if m.role is Role.USER] == ["the first question"]


async def test_a_users_own_bound_answers_busy_at_once_and_is_counted(store: Store) -> None:
    engine = ScriptedEngine(["slow answer"])
    engine.hold = True
    metrics = Metrics()
    pipeline = pipeline_on(store, engine, metrics, max_batch_size=1, max_waiting_per_user=0)
    first = asyncio.create_task(answer(pipeline, "one"))
    await eventually(lambda: engine.streams)
    with pytest.raises(QueueFullError) as refused:
        await answer(pipeline, "two")
    assert refused.value.per_user
    assert metrics.registry.get_sample_value("llamacord_requests_refused_total", {"bound": "user"}) == 1
    assert counted(metrics) == {"busy": 1}
    engine.streams[0].release()
    await asyncio.wait_for(first, 5)


async def test_the_queue_wait_counts_the_wait_in_line(store: Store) -> None:
    engine = ScriptedEngine(["ok"])
    engine.hold = True
    pipeline = pipeline_on(store, engine, max_batch_size=1)
    first = asyncio.create_task(answer(pipeline, "one"))
    await eventually(lambda: engine.streams)
    second = asyncio.create_task(pipeline.answer(UserTurn(CHANNEL, "two", Speaker(8, "Bob")), RecordingView))
    await asyncio.sleep(0.2)
    engine.streams[0].release()
    await asyncio.wait_for(first, 5)
    await eventually(lambda: len(engine.streams) == 2)
    engine.streams[1].release()
    result = await asyncio.wait_for(second, 5)
    assert result.metrics is not None and result.metrics.queue_wait_s >= 0.2


async def eventually(predicate: Callable[[], object], timeout_s: float = 5) -> None:
    """Poll `predicate` (the pipeline's state, which nothing here signals) until it holds."""
    for _ in range(int(timeout_s / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")
