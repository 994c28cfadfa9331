"""The adapter over transformers' continuous batching: every internal it uses is pinned here, in one place."""

from __future__ import annotations

import asyncio
import math
import random
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.generation.continuous_batching.cache_allocators.full_attention import FullAttentionCacheAllocator
from transformers.generation.continuous_batching.continuous_api import ContinuousBatchingManager, OutputRouter
from transformers.generation.continuous_batching.input_outputs import ContinuousBatchingIOs

from bot.engine.local import cb_adapter
from bot.engine.local.attention import AttentionChoice
from bot.engine.local.cb_adapter import (
    ContinuousBatcher,
    _GreedyAwareTemperature,
    _install_read_slots_as_tensors,
    _install_sample_or_argmax,
    _install_skippable_top_p,
    _sample_or_argmax,
    cache_slots,
    internals_problems,
)
from bot.engine.sampling import SamplingParams
from tests.support.local_engine import collect, reference, running


def test_every_transformers_internal_the_adapter_uses_is_as_pinned() -> None:
    assert internals_problems() == []


def test_a_missing_internal_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(ContinuousBatchingManager, "cancel_request")
    assert internals_problems() == ["ContinuousBatchingManager.cancel_request is gone"]


def test_a_renamed_parameter_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    def deliver_batch(self: OutputRouter, results: list[object]) -> None: ...

    monkeypatch.setattr(OutputRouter, "deliver_batch", deliver_batch)
    assert internals_problems() == ["OutputRouter.deliver_batch lost its parameters outputs"]


async def test_a_changed_transformers_stops_the_batcher_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(ContinuousBatchingManager, "cancel_request")
    model = SimpleNamespace(device=torch.device("cpu"))  # never reached: the check comes first
    batcher = ContinuousBatcher(
        model,  # type: ignore[arg-type]
        eos_token_ids=[0],
        max_batch_size=1,
        cache_blocks=4,
        longest_request=64,
        max_batch_tokens=64,
        attention=AttentionChoice("sdpa", False, "test"),
        on_updates=lambda updates: None,
    )
    with pytest.raises(RuntimeError, match=r"transformers==5\.24\.0.*cancel_request is gone"):
        batcher.start(asyncio.get_running_loop())


def test_adapters_fail_loudly_when_the_structure_they_patch_is_missing() -> None:
    no_processors = SimpleNamespace(logit_processor=SimpleNamespace(logits_processor=[]))
    with pytest.raises(RuntimeError, match="top-p"):
        _install_skippable_top_p(no_processors)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="model runner"):
        _install_sample_or_argmax(SimpleNamespace(batch_processor=None))  # type: ignore[arg-type]


def test_temperature_zero_rows_keep_only_the_argmax_and_the_others_are_scaled() -> None:
    scores = torch.tensor([[1.0, 3.0, 2.0], [1.0, 3.0, 2.0]])
    temperatures = torch.tensor([0.0, 2.0], dtype=torch.float32).view(torch.int32)  # as the manager packs them
    warper = _GreedyAwareTemperature.__new__(_GreedyAwareTemperature)
    out = _GreedyAwareTemperature.__call__(warper, scores, temperatures)
    assert out[0].tolist() == [-math.inf, 0.0, -math.inf]
    assert out[1].tolist() == [0.5, 1.5, 1.0]


def test_sampling_skips_the_draw_only_when_every_row_is_one_hot() -> None:
    one_hot = torch.full((1, 2, 5), -math.inf)
    one_hot[0, 0, 3] = one_hot[0, 1, 1] = 0.0
    picked = torch.zeros((1, 2), dtype=torch.long)
    _sample_or_argmax(one_hot, picked)
    assert picked.tolist() == [[3, 1]]

    torch.manual_seed(0)
    mixed = one_hot.clone()
    mixed[0, 1] = 0.0  # uniform over 5 tokens: drawn, not argmaxed
    draws = set()
    for _ in range(40):
        _sample_or_argmax(mixed, picked)
        assert picked[0, 0] == 3
        draws.add(int(picked[0, 1]))
    assert len(draws) > 1


def test_the_pinned_version_is_the_one_pyproject_pins() -> None:
    import tomllib

    from tests.support import REPO

    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert cb_adapter.PINNED in dependencies


@pytest.mark.parametrize("page", [1, 4, 16, 256])
def test_cache_slots_are_transformers_own_read_and_write_indices(page: int) -> None:
    rng = random.Random(page)
    for _ in range(50):
        allocator = SimpleNamespace(tokens_per_page=page, block_physical_stride=2 * page, block_table={})
        reads, writes, expected_reads, expected_writes = [], [], [], []
        for request in map(str, range(rng.randint(1, 6))):
            past, new = rng.randint(0, 600), rng.randint(1, 300)
            allocator.block_table[request] = rng.sample(range(1000), -(-(past + new) // page))
            expected_reads += FullAttentionCacheAllocator.get_read_indices(allocator, request, past, new)  # type: ignore[arg-type]
            expected_writes += FullAttentionCacheAllocator.get_write_indices(allocator, request, past, new)  # type: ignore[arg-type]
            reads.append((request, 0, past + new))
            writes.append((request, past, past + new))
        assert cache_slots(allocator, reads).tolist() == expected_reads  # type: ignore[arg-type]
        assert cache_slots(allocator, writes).tolist() == expected_writes  # type: ignore[arg-type]


async def test_chunked_prompts_beside_decode_rows_read_the_cache_through_the_tensor_indices(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Prompts longer than a step (chunked) beside requests already decoding: at every step that reads the cache,
    the model gets the read indices transformers' own allocator would have listed, built by `cache_slots`, and the
    outputs are exactly `generate`'s."""
    expected_reads: list[list[int]] = []

    def traced_slots(allocator: FullAttentionCacheAllocator, spans: list[tuple[str, int, int]]) -> torch.Tensor:
        expected_reads.append([i for rid, _, end in spans for i in allocator.get_read_indices(rid, 0, end)])
        return cache_slots(allocator, spans)

    checked = []
    model_kwargs = ContinuousBatchingIOs.get_model_kwargs

    def traced_kwargs(ios: ContinuousBatchingIOs, use_padding: bool = False) -> Any:
        kwargs = model_kwargs(ios, use_padding)
        if ios.true_read_sizes[0]:
            assert kwargs["read_index"][0].tolist() == expected_reads[-1]
            checked.append(len(expected_reads[-1]))
        return kwargs

    monkeypatch.setattr(cb_adapter, "cache_slots", traced_slots)
    monkeypatch.setattr(ContinuousBatchingIOs, "get_model_kwargs", traced_kwargs)
    long_prompts = [prompt * 6 for prompt in prompts[:4]]
    expected = [reference(model, prompt, 12) for prompt in long_prompts]
    async with running(model, tokenizer, max_batch_tokens=64) as engine:
        streams = [engine.generate(prompt, SamplingParams(0, 1.0, 12)) for prompt in long_prompts]
        await asyncio.gather(*(collect(stream) for stream in streams))
    assert [stream.token_ids for stream in streams] == expected
    assert len(checked) == len(expected_reads) > len(long_prompts) and max(checked) > 64


def test_the_read_indices_stay_transformers_own_where_the_tensor_path_does_not_apply() -> None:
    """Asynchronous IOs (CUDA with flash attention) keep transformers' lists: the cache is left unpatched."""

    def extend(*args: Any) -> None:
        return None

    cache = SimpleNamespace(cache_allocators={}, extend_read_and_write_indices=extend)
    manager = SimpleNamespace(batch_processor=SimpleNamespace(inputs_and_outputs=SimpleNamespace()))
    _install_read_slots_as_tensors(manager, cache)  # type: ignore[arg-type]
    assert cache.extend_read_and_write_indices is extend
