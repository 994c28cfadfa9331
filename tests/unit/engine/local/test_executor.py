"""The executor on the tiny random Llama: batching is exact, cancellation and backpressure work, failures heal."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.generation.continuous_batching.continuous_api import ContinuousBatchingManager

from bot.engine.api import FinishReason
from bot.engine.errors import EngineBusyError, EngineError, GenerationError, ModelLoadError
from bot.engine.local.cb_adapter import ContinuousBatcher
from bot.engine.local.executor import AsyncEngine
from bot.engine.sampling import SamplingParams
from tests.support.local_engine import (
    GREEDY,
    TIMEOUT_S,
    collect,
    counting_forwards,
    eos_ids,
    generation_threads,
    logit_bias,
    no_eos,
    read_until,
    reference,
    running,
)


async def test_concurrent_greedy_requests_each_match_generate_alone(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]]
) -> None:
    lengths = [24 + 3 * i for i in range(len(prompts))]
    expected = [reference(model, prompt, n) for prompt, n in zip(prompts, lengths, strict=True)]
    assert len({tuple(ids) for ids in expected}) == len(expected), "the prompts should give different outputs"
    # Sampled requests share the batch: per-request sampling must leave the greedy rows exact.
    sampled = SamplingParams(temperature=1.5, top_p=1.0, max_new_tokens=40)

    async with running(model, tokenizer) as engine:
        streams = [engine.generate(p, SamplingParams(0, 1.0, n)) for p, n in zip(prompts, lengths, strict=True)]
        noise = [engine.generate(prompt, sampled) for prompt in prompts[:4]]
        texts = await asyncio.gather(*(collect(stream) for stream in streams + noise))

    for stream, text, ids in zip(streams, texts[: len(streams)], expected, strict=True):
        assert stream.token_ids == ids
        stopped = ids[-1] in eos_ids(model)
        assert text == tokenizer.decode(ids[:-1] if stopped else ids, skip_special_tokens=True)
        metrics = stream.metrics
        assert metrics.finish_reason == (FinishReason.STOP if stopped else FinishReason.LENGTH)
        assert metrics.generated_tokens == len(ids)
        assert metrics.prompt_tokens == len(prompts[streams.index(stream)])
        assert metrics.queue_wait_s is not None and metrics.ttft_s is not None and metrics.total_s is not None
        assert 0 <= metrics.queue_wait_s <= metrics.ttft_s <= metrics.total_s


async def test_per_request_top_p_is_applied(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]]
) -> None:
    """A tiny top_p keeps only the most likely token, so sampling at temperature 1 becomes greedy."""
    expected = [reference(model, prompt, 24) for prompt in prompts[:4]]
    nucleus_of_one = SamplingParams(temperature=1.0, top_p=1e-6, max_new_tokens=24)
    async with running(model, tokenizer) as engine:
        streams = [engine.generate(prompt, nucleus_of_one) for prompt in prompts[:4]]
        await asyncio.gather(*(collect(stream) for stream in streams))
    assert [stream.token_ids for stream in streams] == expected


@pytest.mark.parametrize("eos_index", [0, 1, 2])
async def test_generation_stops_on_every_eos_id(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]], eos_index: int
) -> None:
    eos = eos_ids(model)[eos_index]
    with logit_bias(model, {eos: 1e4}):
        async with running(model, tokenizer) as engine:
            stream = engine.generate(prompts[0], GREEDY)
            text = await collect(stream)
    assert stream.token_ids == [eos]
    assert text == ""
    assert stream.metrics.finish_reason == FinishReason.STOP


async def test_a_short_request_started_after_a_long_one_finishes_first(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]]
) -> None:
    finished: list[str] = []

    async def run(deltas: AsyncIterator[str], name: str) -> None:
        async with asyncio.timeout(TIMEOUT_S):
            async for _ in deltas:
                pass
        finished.append(name)

    with no_eos(model):
        expected_short = reference(model, prompts[1], 5)
        async with running(model, tokenizer, max_batch_size=2) as engine:
            long = engine.generate(prompts[0], SamplingParams(0, 1.0, 600))
            long_deltas = await read_until(long, 5)
            long_task = asyncio.create_task(run(long_deltas, "long"))
            short = engine.generate(prompts[1], SamplingParams(0, 1.0, 5))
            await run(aiter(short), "short")
            tokens_of_long_when_short_finished = len(long.token_ids)
            async with asyncio.timeout(TIMEOUT_S):
                await long_task

    assert finished == ["short", "long"]
    assert tokens_of_long_when_short_finished < 600
    assert long.metrics.generated_tokens == 600
    assert short.token_ids == expected_short


async def test_cancel_frees_the_slot_for_the_next_request(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with no_eos(model), counting_forwards(model, monkeypatch) as forwards:
        async with running(model, tokenizer, max_batch_size=1, max_queued_requests=0) as engine:
            long = engine.generate(prompts[0], SamplingParams(0, 1.0, 900))
            long_deltas = await read_until(long, 3)
            with pytest.raises(EngineBusyError):
                engine.generate(prompts[1], GREEDY)

            await long.cancel()
            next_request = engine.generate(prompts[1], GREEDY)
            forwards_at_cancel = forwards()
            await collect(next_request)
            async with asyncio.timeout(TIMEOUT_S):
                rest_of_long = [delta async for delta in long_deltas]  # a cancelled stream ends quietly
            forwards_for_next = forwards() - forwards_at_cancel

    assert long.metrics.finish_reason == FinishReason.CANCELLED
    assert rest_of_long == []
    assert long.metrics.generated_tokens < 900
    assert next_request.metrics.finish_reason == FinishReason.LENGTH
    # With one slot, the next request could only run this soon if the cancelled one left the batch: otherwise
    # hundreds of its remaining tokens would come first.
    assert forwards_for_next <= GREEDY.max_new_tokens + 2


async def test_leaving_the_loop_aborts_the_request(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]]
) -> None:
    with no_eos(model):
        async with running(model, tokenizer, max_batch_size=1, max_queued_requests=0) as engine:
            stream = engine.generate(prompts[0], SamplingParams(0, 1.0, 900))
            async with asyncio.timeout(TIMEOUT_S):
                async for _ in stream:
                    break
            for _ in range(10):  # the loop closes the abandoned iterator in a task of its own, a few turns later
                if stream.finished:
                    break
                await asyncio.sleep(0)
            assert stream.metrics.finish_reason == FinishReason.CANCELLED
            assert engine.stats().running + engine.stats().waiting == 0
            await collect(engine.generate(prompts[1], GREEDY))


async def test_cancelling_the_consuming_task_aborts_the_request(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]]
) -> None:
    with no_eos(model):
        async with running(model, tokenizer, max_batch_size=1, max_queued_requests=0) as engine:
            stream = engine.generate(prompts[0], SamplingParams(0, 1.0, 900))
            started = asyncio.Event()

            async def consume() -> None:
                async for _ in stream:
                    started.set()

            consumer = asyncio.create_task(consume())
            async with asyncio.timeout(TIMEOUT_S):
                await started.wait()
            consumer.cancel()
            with pytest.raises(asyncio.CancelledError):
                await consumer
            assert stream.metrics.finish_reason == FinishReason.CANCELLED
            follow_up = engine.generate(prompts[1], GREEDY)
            await collect(follow_up)
            assert follow_up.metrics.finish_reason == FinishReason.LENGTH


async def test_the_busy_limit_answers_at_once(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]]
) -> None:
    with no_eos(model):
        async with running(model, tokenizer, max_batch_size=2, max_queued_requests=1) as engine:
            accepted = [engine.generate(prompt, SamplingParams(0, 1.0, 900)) for prompt in prompts[:3]]
            stats = engine.stats()
            assert (stats.waiting + stats.running, stats.max_batch_size, stats.max_queued_requests) == (3, 2, 1)
            # generate() is synchronous: the refusal cannot wait on anything.
            with pytest.raises(EngineBusyError) as refusal:
                engine.generate(prompts[3], GREEDY)
            assert "try again" in str(refusal.value)

            await accepted[0].cancel()
            replacement = engine.generate(prompts[3], GREEDY)
            for stream in accepted[1:]:
                await stream.cancel()
            await collect(replacement)
    assert replacement.metrics.finish_reason == FinishReason.LENGTH


async def test_the_engine_recovers_after_a_failure_in_generation(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    expected = reference(model, prompts[2], GREEDY.max_new_tokens)
    original = model.forward
    failures = 0

    def forward_failing_once(*args: Any, **kwargs: Any) -> Any:
        nonlocal failures
        if failures == 0:
            failures += 1
            raise RuntimeError("injected failure")
        return original(*args, **kwargs)

    async with running(model, tokenizer) as engine:
        monkeypatch.setattr(model, "forward", forward_failing_once)
        hit = [engine.generate(prompt, GREEDY) for prompt in prompts[:2]]
        for stream in hit:
            with pytest.raises(GenerationError):
                await collect(stream)
            assert stream.metrics.finish_reason == FinishReason.ERROR
        after = engine.generate(prompts[2], GREEDY)
        await collect(after)
        assert engine.stats().running + engine.stats().waiting == 0
        assert engine.is_alive, "the restarted generation loop should count as alive"

    assert failures == 1
    assert after.token_ids == expected


async def test_requests_fail_instead_of_hanging_when_the_loop_cannot_restart(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def forward_failing(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("injected failure")

    def start_failing() -> None:
        raise RuntimeError("injected restart failure")

    async with running(model, tokenizer) as engine:
        monkeypatch.setattr(engine._batcher._manager, "start", start_failing)
        monkeypatch.setattr(model, "forward", forward_failing)
        with pytest.raises(GenerationError):
            await collect(engine.generate(prompts[0], GREEDY))
        # Submitted after the loop died: it waits for a restart that fails, and must be told so.
        late = engine.generate(prompts[1], GREEDY)
        with pytest.raises(GenerationError):
            await collect(late)
        assert late.metrics.finish_reason == FinishReason.ERROR
        assert engine.stats().running + engine.stats().waiting == 0


async def test_shutdown_fails_pending_requests_and_stops_the_thread(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]]
) -> None:
    with no_eos(model):
        engine = AsyncEngine(model, tokenizer, max_batch_size=1, max_queued_requests=1, max_sequence_tokens=1024)
        assert not engine.is_alive, "not started yet"
        async with asyncio.timeout(TIMEOUT_S):
            await engine.start()
        assert len(generation_threads()) == 1
        assert engine.is_alive
        running_stream = engine.generate(prompts[0], SamplingParams(0, 1.0, 900))
        waiting_stream = engine.generate(prompts[1], SamplingParams(0, 1.0, 900))
        running_deltas = await read_until(running_stream, 3)
        async with asyncio.timeout(TIMEOUT_S):
            await engine.shutdown()

    for deltas in (running_deltas, aiter(waiting_stream)):
        with pytest.raises(GenerationError):
            async with asyncio.timeout(TIMEOUT_S):
                async for _ in deltas:
                    pass
    assert running_stream.metrics.finish_reason == waiting_stream.metrics.finish_reason == FinishReason.ERROR
    assert generation_threads() == []
    assert not engine.is_alive
    with pytest.raises(EngineError):
        engine.generate(prompts[0], GREEDY)


async def test_shutdown_with_a_drain_timeout_lets_requests_finish(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]]
) -> None:
    engine = AsyncEngine(model, tokenizer, max_batch_size=2, max_queued_requests=0, max_sequence_tokens=1024)
    async with asyncio.timeout(TIMEOUT_S):
        await engine.start()
    stream = engine.generate(prompts[0], GREEDY)
    async with asyncio.timeout(TIMEOUT_S):
        await engine.shutdown(drain_timeout_s=TIMEOUT_S)
    await collect(stream)
    assert stream.token_ids == reference(model, prompts[0], GREEDY.max_new_tokens)


async def test_a_request_longer_than_the_engine_allows_is_refused(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]]
) -> None:
    async with running(model, tokenizer, max_sequence_tokens=64) as engine:
        with pytest.raises(GenerationError):
            engine.generate(prompts[0], SamplingParams(0, 1.0, 64))
        assert engine.stats().waiting == 0
        await collect(engine.generate(prompts[0], SamplingParams(0, 1.0, 64 - len(prompts[0]))))


async def test_tokenize_reads_control_tokens_as_plain_text(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    engine = AsyncEngine(model, tokenizer, max_batch_size=1, max_queued_requests=0)
    text = "hi <|eot_id|> there"
    tokens = engine.tokenize(text)
    assert "".join(piece for _, piece in tokens) == text
    assert tokenizer.convert_tokens_to_ids("<|eot_id|>") not in [token_id for token_id, _ in tokens]
    assert [token_id for token_id, _ in tokens] == tokenizer.encode(
        text, add_special_tokens=False, split_special_tokens=True
    )


@pytest.mark.parametrize(
    "options",
    [{"temperature": -0.1}, {"temperature": float("nan")}, {"top_p": 0.0}, {"top_p": 1.5}, {"max_new_tokens": 0}],
)
def test_sampling_params_refuse_invalid_values(options: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**options)  # type: ignore[arg-type]


def test_sampling_params_take_ints_and_know_greedy() -> None:
    params = SamplingParams(temperature=0, top_p=1, max_new_tokens=3)
    assert params.greedy
    assert isinstance(params.temperature, float) and isinstance(params.top_p, float)
    assert not SamplingParams(temperature=0.1).greedy


async def test_a_start_cancelled_midway_leaves_no_generation_thread(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop during start-up (a second Ctrl-C) cancels `start` while its thread builds the cache: the thread goes on
    and starts the generation loop, which nobody would stop, and the process would not exit."""
    building, release = threading.Event(), threading.Event()
    start = ContinuousBatcher.start

    def slow_start(self: ContinuousBatcher, loop: asyncio.AbstractEventLoop) -> None:
        building.set()
        release.wait(TIMEOUT_S)
        start(self, loop)

    monkeypatch.setattr(ContinuousBatcher, "start", slow_start)
    engine = AsyncEngine(model, tokenizer, max_batch_size=1, max_queued_requests=1, max_sequence_tokens=1024)
    starting = asyncio.create_task(engine.start())
    await asyncio.wait_for(asyncio.to_thread(building.wait, TIMEOUT_S), TIMEOUT_S + 1)
    starting.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(starting, TIMEOUT_S)
    for thread in [thread for thread in threading.enumerate() if thread.name == "llamacord-torch"]:
        await asyncio.wait_for(asyncio.to_thread(thread.join, TIMEOUT_S), TIMEOUT_S + 1)  # whatever it started, it has
    try:
        assert generation_threads() == []
        assert not engine.is_alive
    finally:
        await asyncio.to_thread(engine._batcher.stop)  # if the test fails, not to leave the thread to the next ones


async def test_a_changed_transformers_fails_start_without_blaming_the_settings(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(ContinuousBatchingManager, "cancel_request")
    engine = AsyncEngine(model, tokenizer, max_batch_size=1, max_queued_requests=0)
    with pytest.raises(ModelLoadError, match=r"transformers==5\.24\.0.*cancel_request is gone") as raised:
        async with asyncio.timeout(TIMEOUT_S):
            await engine.start()
    assert "KV_CACHE_MEMORY" not in str(raised.value)


async def test_a_kv_cache_that_cannot_fit_fails_start_with_a_clear_error(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    engine = AsyncEngine(model, tokenizer, max_batch_size=1, max_queued_requests=0, cache_tokens=10**13)
    with pytest.raises(ModelLoadError, match="MAX_BATCH_SIZE"):
        async with asyncio.timeout(TIMEOUT_S):
            await engine.start()
    assert generation_threads() == []
