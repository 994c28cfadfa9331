"""The engine API: what the turn pipeline, the front ends and the metrics see of an engine, whichever backend runs.

Shaped like vLLM's `AsyncLLM`: `generate()` returns a stream at once (or raises `EngineBusyError` at once), iterating
the stream yields text deltas, and leaving the loop (or cancelling the task that iterates) aborts the request.

Two backends implement `Engine`: the local engine (`bot.engine.local`, the model in this process) and the remote one
(`bot.engine.remote`, an OpenAI-compatible server). Both build their streams on `StreamBase` and keep their requests in
a `RequestTable`, so the rules of a stream (when it ends, what a cancel drops) and of the busy limit are written once.
This module imports neither torch nor an HTTP client.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from time import perf_counter
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from bot.engine.errors import BUSY_MESSAGE, EngineBusyError, EngineError

if TYPE_CHECKING:
    from bot.engine.sampling import SamplingParams


class FinishReason(StrEnum):
    STOP = "stop"  # the model ended its turn (an EOS token, or the server's "stop")
    LENGTH = "length"  # max_new_tokens reached
    CANCELLED = "cancelled"  # the consumer left, or cancel() was called
    ERROR = "error"  # generation failed, or the engine shut down


@dataclass(slots=True)
class RequestMetrics:
    """Times in seconds from `generate()`; None until known. Updated live while the request runs."""

    queue_wait_s: float | None = None  # until the scheduler (or the server) took the request
    ttft_s: float | None = None  # until the first token reached the event loop
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # of prompt_tokens, served from the engine's prefix cache (not computed)
    generated_tokens: int = 0
    total_s: float | None = None
    finish_reason: FinishReason | None = None


@dataclass(frozen=True, slots=True)
class EngineStats:
    waiting: int  # accepted, not yet generating
    running: int  # generating
    max_batch_size: int
    max_queued_requests: int


@dataclass(frozen=True, slots=True)
class Prompt:
    """A conversation ready for the engine, and what the token budget did to it."""

    token_ids: list[int]
    num_tokens: int
    dropped_messages: int  # oldest messages left out to fit
    truncated: bool  # the newest message alone was over budget and its middle was cut
    messages: list[dict[str, str]] = field(default_factory=list)  # what was rendered, after dropping and cutting


class EngineInfo(Protocol):
    """What `/info` and `llamacord chat` read: the local `ModelInfo` or the remote `RemoteModelInfo`."""

    @property
    def source(self) -> str: ...

    def lines(self) -> list[str]: ...


class TextStream(Protocol):
    """One request's text deltas. Leaving the loop, or cancelling its task, aborts it; errors are `EngineError`s."""

    @property
    def metrics(self) -> RequestMetrics: ...

    def __aiter__(self) -> AsyncIterator[str]: ...

    async def cancel(self) -> None: ...


class Engine(Protocol):
    """The engine face. `generate` raises `EngineBusyError` at once when full; every error's `str()` is user-fit.

    `tokenize` may raise `EngineError` when the backend has no tokenizer (a remote model whose tokenizer is not
    available locally).
    """

    @property
    def info(self) -> EngineInfo: ...

    @property
    def is_alive(self) -> bool: ...  # can still generate (not shut down); /healthz reports it

    @property
    def context_length(self) -> int: ...  # the most tokens one request (prompt + reply) may hold here

    async def prepare(self, messages: Sequence[Mapping[str, str]], max_new_tokens: int) -> Prompt: ...

    def generate(self, prompt: Prompt, params: SamplingParams) -> TextStream: ...

    def stats(self) -> EngineStats: ...

    def tokenize(self, text: str) -> list[tuple[int, str]]: ...

    async def shutdown(self, drain_timeout_s: float = 0.0) -> None: ...


class StreamBase:
    """One request's text deltas, as an async iterator: the part both backends share.

    A backend feeds it (`_finish`, `_wake`) and says what text is ready (`_take`) and what is left at the end
    (`_flush`). Once cancelled, a stream yields nothing more: text that arrived before the abort reached the
    engine is dropped, so a stopped reply ends where the user saw it stop.
    """

    def __init__(self, request_id: str, prompt_tokens: int, abort: Callable[[StreamBase], None]) -> None:
        self.request_id = request_id
        self.metrics = RequestMetrics(prompt_tokens=prompt_tokens)
        self._abort = abort
        self._submitted_at = perf_counter()
        self._error: EngineError | None = None
        self._wakeup = asyncio.Event()  # set on every update; the consumer clears it before waiting
        self._done = asyncio.Event()

    @property
    def finished(self) -> bool:
        return self.metrics.finish_reason is not None

    @property
    def running(self) -> bool:
        """Generating (counted as `running` by `EngineStats`), rather than waiting for a slot."""
        raise NotImplementedError

    def __aiter__(self) -> AsyncIterator[str]:
        return self._deltas()

    async def _deltas(self) -> AsyncIterator[str]:
        try:
            while self.metrics.finish_reason is not FinishReason.CANCELLED:
                text = self._take()
                if text:
                    yield text
                    continue
                if self.finished:
                    tail = self._flush()
                    if tail:
                        yield tail
                    break
                self._wakeup.clear()
                await self._wakeup.wait()
            if self._error is not None:
                raise self._error
        finally:
            if not self.finished:  # the consumer left the loop early, or its task was cancelled
                self._abort(self)

    async def cancel(self) -> None:
        """Abort the request (the Stop button). Its capacity is free for the next request at once."""
        if not self.finished:
            self._abort(self)

    async def wait_finished(self) -> None:
        await self._done.wait()

    def _take(self) -> str:
        """The text that arrived since the last call ("" when none)."""
        raise NotImplementedError

    def _flush(self) -> str:
        """Text held back until the end (an incomplete character, say)."""
        return ""

    def _wake(self) -> None:
        self._wakeup.set()

    def _finish(self, reason: FinishReason, error: EngineError | None = None, now: float | None = None) -> None:
        if self.finished:
            return
        now = perf_counter() if now is None else now
        self.metrics.finish_reason = reason
        self.metrics.total_s = now - self._submitted_at
        if self.metrics.queue_wait_s is None:
            self.metrics.queue_wait_s = self.metrics.total_s
        self._error = error
        self._wakeup.set()
        self._done.set()


S = TypeVar("S", bound=StreamBase)


class RequestTable(Generic[S]):
    """The requests an engine holds, by id, and the busy limit: `max_batch_size` generating plus
    `max_queued_requests` waiting. Past that, `admit` raises `EngineBusyError` at once."""

    def __init__(self, max_batch_size: int, max_queued_requests: int) -> None:
        if max_batch_size < 1 or max_queued_requests < 0:
            raise ValueError("max_batch_size must be >= 1 and max_queued_requests >= 0")
        self.max_batch_size = max_batch_size
        self.max_queued_requests = max_queued_requests
        self._streams: dict[str, S] = {}

    def check_room(self) -> None:
        if len(self._streams) >= self.max_batch_size + self.max_queued_requests:
            raise EngineBusyError(BUSY_MESSAGE)

    def admit(self, stream: S) -> None:
        self.check_room()
        self._streams[stream.request_id] = stream

    def get(self, request_id: str) -> S | None:
        return self._streams.get(request_id)

    def pop(self, request_id: str) -> S | None:
        return self._streams.pop(request_id, None)

    def __iter__(self) -> Iterator[S]:
        return iter(list(self._streams.values()))

    def __len__(self) -> int:
        return len(self._streams)

    def stats(self) -> EngineStats:
        running = sum(1 for stream in self._streams.values() if stream.running)
        return EngineStats(
            waiting=len(self._streams) - running,
            running=running,
            max_batch_size=self.max_batch_size,
            max_queued_requests=self.max_queued_requests,
        )

    async def drain(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` for every request to finish."""
        if self._streams and timeout_s > 0:
            waits = [asyncio.create_task(stream.wait_finished()) for stream in self._streams.values()]
            _, pending = await asyncio.wait(waits, timeout=timeout_s)
            for task in pending:
                task.cancel()

    def fail_all(self, error: EngineError) -> list[S]:
        """End every request with `error` and forget them; returns them (for closing what they hold)."""
        streams = list(self._streams.values())
        self._streams.clear()
        for stream in streams:
            stream._finish(FinishReason.ERROR, error)
        return streams
