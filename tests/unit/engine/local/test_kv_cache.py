"""The KV cache: sized by KV_CACHE_MEMORY, full without harm to running requests, its prefix reuse counted, and its
cached pages evicted oldest first."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from bot.engine.api import FinishReason
from bot.engine.errors import ModelLoadError
from bot.engine.local import kv_cache
from bot.engine.local.executor import AsyncEngine
from bot.engine.local.kv_cache import CPU_PAGE_SIZE, KVCacheInfo, kv_bytes_per_token, planned_blocks
from bot.engine.sampling import SamplingParams
from bot.settings import Settings
from tests.support.local_engine import TIMEOUT_S, collect, no_eos, reference, running

PAGE = CPU_PAGE_SIZE


def long_prompt(tokenizer: PreTrainedTokenizerBase, words: int, seed: int = 0) -> list[int]:
    text = " ".join(f"word{(seed * 7919 + i) % 997}" for i in range(words))
    return tokenizer.encode(text)


def test_a_size_in_bytes_becomes_that_many_pages(model: PreTrainedModel) -> None:
    per_token = kv_bytes_per_token(model)
    assert per_token == 2 * 2 * 1 * 8 * 4  # K and V, 2 layers, 1 KV head of 8 dims, fp32
    assert planned_blocks(per_token * PAGE * 10, model, worst_case_tokens=10**9) == 10


def test_auto_on_a_cpu_takes_a_share_of_available_memory_within_the_worst_case(
    model: PreTrainedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Memory:
        available = 64 * 2**20

    monkeypatch.setattr(kv_cache.psutil, "virtual_memory", lambda: Memory)
    per_page = kv_bytes_per_token(model) * PAGE
    assert planned_blocks("auto", model, worst_case_tokens=10**9) == Memory.available // 4 // per_page
    # No more than four full batches of the longest requests: the running one, and cached prefixes of others.
    assert planned_blocks("auto", model, worst_case_tokens=1000) == 250


def test_the_cache_describes_itself_in_conversations() -> None:
    info = KVCacheInfo(tokens=46_080, page_size=16, bytes=2 * 2**30, longest_request=4608)
    assert info.conversations == 10
    assert info.describe() == "46,080 tokens in 2,880 pages of 16 (2.00 GiB): 10 conversations of 4,608 tokens"


async def test_a_cache_too_small_for_one_request_is_refused_naming_the_settings(tiny_model_dir: Path) -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        model=str(tiny_model_dir),
        device="cpu",
        kv_cache_memory="64KiB",  # 512 tokens of the tiny model
        max_prompt_tokens=1024,
        max_new_tokens=512,
    )
    with pytest.raises(ModelLoadError) as refused:
        await asyncio.wait_for(AsyncEngine.from_settings(settings), TIMEOUT_S)
    message = str(refused.value)
    assert "512 tokens" in message and "1,536 tokens" in message
    assert all(name in message for name in ("KV_CACHE_MEMORY", "MAX_PROMPT_TOKENS", "MAX_NEW_TOKENS"))


async def test_the_engine_reports_its_cache_in_info(tiny_model_dir: Path) -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, model=str(tiny_model_dir), device="cpu", kv_cache_memory="1MiB", max_prompt_tokens=512
    )
    engine = await asyncio.wait_for(AsyncEngine.from_settings(settings), TIMEOUT_S)
    try:
        assert engine.kv_cache.tokens == 2**20 // kv_bytes_per_token(engine._batcher._model) // PAGE * PAGE
        assert engine.kv_cache.longest_request == 512 + 512
        assert f"kv cache:       {engine.kv_cache.describe()}" in engine.info.lines()
    finally:
        await engine.shutdown()


async def test_a_second_turn_reuses_the_cached_prefix(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    first = long_prompt(tokenizer, 40)
    params = SamplingParams(temperature=0, top_p=1.0, max_new_tokens=20)
    async with running(model, tokenizer) as engine:
        stream = engine.generate(first, params)
        await collect(stream)
        assert stream.metrics.cached_prompt_tokens == 0
        second = first + stream.token_ids + long_prompt(tokenizer, 10, seed=1)
        follow_up = engine.generate(second, params)
        await collect(follow_up)
    cached = follow_up.metrics.cached_prompt_tokens
    # Every whole page of the first prompt and what was generated after it, less the last page the step left open.
    assert (len(first) + len(stream.token_ids) - 1) // PAGE * PAGE - PAGE <= cached < len(second)


async def test_a_full_cache_makes_new_requests_wait_and_harms_none(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    prompts = [long_prompt(tokenizer, 12, seed=n) for n in range(64)]
    params = SamplingParams(temperature=0, top_p=1.0, max_new_tokens=40)
    longest = max(len(p) for p in prompts) + params.max_new_tokens
    computed = 0  # tokens that went through the model: a request cut short and recomputed would add to them

    def count(module: object, args: tuple[object, ...], kwargs: dict[str, Any]) -> None:
        nonlocal computed
        computed += kwargs["input_ids"].shape[-1]

    with no_eos(model):  # every request runs to its full length
        hook = model.register_forward_pre_hook(count, with_kwargs=True)
        try:
            async with running(
                model, tokenizer, max_batch_size=16, max_queued_requests=64, cache_tokens=8 * longest + 16 * PAGE
            ) as engine:
                streams = [engine.generate(prompt, params) for prompt in prompts]
                texts = await asyncio.gather(*(collect(stream) for stream in streams))
                assert engine.stats().waiting == engine.stats().running == 0
        finally:
            hook.remove()
        expected = [reference(model, prompts[n], params.max_new_tokens) for n in (0, 31, 63)]
    assert all(stream.metrics.finish_reason is FinishReason.LENGTH for stream in streams), "every one completed"
    assert all(text for text in texts)
    assert [streams[n].token_ids for n in (0, 31, 63)] == expected
    # Each request computes its uncached prompt and one token per step after the first: nothing is computed twice.
    needed = sum(s.metrics.prompt_tokens - s.metrics.cached_prompt_tokens + params.max_new_tokens - 1 for s in streams)
    assert computed == needed, "requests were recomputed: the cache ran out under running ones"


async def test_under_pressure_only_the_oldest_cached_pages_are_evicted(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    params = SamplingParams(temperature=0, top_p=1.0, max_new_tokens=4)
    kept = long_prompt(tokenizer, 20, seed=99)
    fillers = [long_prompt(tokenizer, 20, seed=n) for n in range(12)]  # 12 × 9 pages in a cache of 40
    reused = []
    async with running(model, tokenizer, max_batch_size=2, max_sequence_tokens=300, cache_tokens=40 * PAGE) as engine:
        for filler in fillers:  # each leaves its pages cached; the cache fills up and must evict
            stream = engine.generate(kept, params)  # used again and again: among the most recently released
            await collect(stream)
            reused.append(stream.metrics.cached_prompt_tokens)
            await collect(engine.generate(filler, params))
        first_filler = engine.generate(fillers[0], params)
        await collect(first_filler)
    assert first_filler.metrics.cached_prompt_tokens == 0, "the cache was full: the oldest pages went"
    whole_pages = (len(kept) - 1) // PAGE * PAGE
    assert reused[1:] == [whole_pages] * (len(fillers) - 1), "the pages in use again were never evicted"
