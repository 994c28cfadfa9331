"""The stream and request-table rules both backends share (`bot.engine.api`), on a stream fed by hand."""

from __future__ import annotations

import asyncio

import pytest

from bot.engine.api import FinishReason, RequestTable, StreamBase
from bot.engine.errors import BUSY_MESSAGE, EngineBusyError, GenerationError


class HandFed(StreamBase):
    """A stream the test feeds: `feed` adds text, `tail` is held back until the end."""

    def __init__(self, request_id: str, aborted: list[str], *, started: bool = False) -> None:
        super().__init__(request_id, prompt_tokens=3, abort=lambda stream: self._on_abort(aborted))
        self.pending = ""
        self.tail = ""
        self.started = started

    @property
    def running(self) -> bool:
        return self.started

    def feed(self, text: str) -> None:
        self.pending += text
        self._wake()

    def _take(self) -> str:
        text, self.pending = self.pending, ""
        return text

    def _flush(self) -> str:
        return self.tail

    def _on_abort(self, aborted: list[str]) -> None:
        aborted.append(self.request_id)
        self._finish(FinishReason.CANCELLED)


async def collect(stream: StreamBase) -> list[str]:
    return [delta async for delta in stream]


async def test_a_stream_yields_what_arrives_then_its_held_back_tail() -> None:
    stream = HandFed("a", [])
    stream.tail = "!"
    reader = asyncio.create_task(collect(stream))
    stream.feed("Hel")
    await asyncio.sleep(0)
    stream.feed("lo")
    stream._finish(FinishReason.STOP)
    assert "".join(await asyncio.wait_for(reader, 5)) == "Hello!"
    assert stream.metrics.finish_reason is FinishReason.STOP and stream.metrics.total_s is not None
    assert stream.metrics.queue_wait_s == stream.metrics.total_s  # never reported: the whole time was waiting


async def test_a_failed_stream_raises_its_error_after_the_text() -> None:
    stream = HandFed("a", [])
    stream.feed("partial")
    stream._finish(FinishReason.ERROR, GenerationError("Generation failed."))
    seen: list[str] = []
    with pytest.raises(GenerationError, match="Generation failed"):
        async for delta in stream:
            seen.append(delta)
    assert seen == ["partial"]


async def test_a_cancelled_stream_yields_nothing_more() -> None:
    aborted: list[str] = []
    stream = HandFed("a", aborted)
    stream.tail = "never"
    stream.feed("arrived before the stop")
    await stream.cancel()
    assert await collect(stream) == []
    assert aborted == ["a"]
    await stream.cancel()  # a second cancel is a no-op
    assert aborted == ["a"]


async def test_leaving_the_loop_early_aborts_the_request() -> None:
    aborted: list[str] = []
    stream = HandFed("a", aborted)
    stream.feed("first")
    deltas = aiter(stream)
    assert await anext(deltas) == "first"
    await deltas.aclose()
    assert aborted == ["a"]


async def test_the_table_refuses_past_batch_plus_queue_and_counts_running_and_waiting() -> None:
    table: RequestTable[HandFed] = RequestTable(max_batch_size=2, max_queued_requests=1)
    table.admit(HandFed("a", [], started=True))
    table.admit(HandFed("b", []))
    table.admit(HandFed("c", []))
    with pytest.raises(EngineBusyError) as busy:
        table.admit(HandFed("d", []))
    assert str(busy.value) == BUSY_MESSAGE
    stats = table.stats()
    assert (stats.running, stats.waiting, stats.max_batch_size, stats.max_queued_requests) == (1, 2, 2, 1)
    assert table.pop("b") is not None and table.pop("b") is None
    table.admit(HandFed("d", []))
    assert len(table) == 3


async def test_drain_waits_for_finishing_requests_and_fail_all_ends_the_rest() -> None:
    table: RequestTable[HandFed] = RequestTable(max_batch_size=2, max_queued_requests=0)
    quick, slow = HandFed("quick", []), HandFed("slow", [])
    table.admit(quick)
    table.admit(slow)
    asyncio.get_running_loop().call_later(0.05, quick._finish, FinishReason.STOP)
    await table.drain(0.5)
    assert quick.finished and not slow.finished
    assert table.fail_all(GenerationError("The bot is shutting down.")) == [quick, slow]
    assert slow.metrics.finish_reason is FinishReason.ERROR and len(table) == 0
    with pytest.raises(GenerationError, match="shutting down"):
        await collect(slow)
