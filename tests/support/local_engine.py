"""The local engine on the tiny random Llama with lively weights: fixtures and helpers its tests share."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from bot.engine.local.executor import AsyncEngine, RequestStream
from bot.engine.sampling import SamplingParams

TIMEOUT_S = 60
GREEDY = SamplingParams(temperature=0, top_p=1.0, max_new_tokens=24)
TEXTS = [
    "Hello there",
    "The capital of France is",
    "Llamas are domesticated",
    "def add(a, b):",
    "Alice said hi; Bob asked what 2 + 2 is.",
    "Émoji 🦙 and ünïcödé",
    "system user assistant",
    "How can I help you today? I am a helpful assistant and",
]


def reference(model: PreTrainedModel, prompt: list[int], max_new_tokens: int) -> list[int]:
    """What `generate` gives for this request alone, greedy."""
    input_ids = torch.tensor([prompt])
    with torch.no_grad():
        output = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            temperature=None,
            top_p=None,
            max_new_tokens=max_new_tokens,
        )
    return output[0, len(prompt) :].tolist()


@asynccontextmanager
async def running(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, **options: Any
) -> AsyncIterator[AsyncEngine]:
    settings: dict[str, Any] = {"max_batch_size": 8, "max_queued_requests": 8, "max_sequence_tokens": 1024}
    engine = AsyncEngine(model, tokenizer, **(settings | options))
    async with asyncio.timeout(TIMEOUT_S):
        await engine.start()
    try:
        yield engine
    finally:
        async with asyncio.timeout(TIMEOUT_S):
            await engine.shutdown()


async def collect(stream: RequestStream) -> str:
    async with asyncio.timeout(TIMEOUT_S):
        return "".join([delta async for delta in stream])


async def read_until(stream: RequestStream, tokens: int) -> AsyncIterator[str]:
    """Read deltas until the request has generated `tokens` tokens; return the open iterator to keep it alive
    (dropping it would abort the request)."""
    deltas = aiter(stream)
    async with asyncio.timeout(TIMEOUT_S):
        while len(stream.token_ids) < tokens:
            await anext(deltas)
    return deltas


@contextmanager
def logit_bias(model: PreTrainedModel, bias: dict[int, float]) -> Iterator[None]:
    """Add `bias` to the model's logits, in `generate` and in the executor alike."""
    token_ids, values = list(bias), torch.tensor(list(bias.values()))

    def hook(module: torch.nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor:
        output[..., token_ids] += values.to(output.dtype)
        return output

    handle = model.lm_head.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def eos_ids(model: PreTrainedModel) -> list[int]:
    return list(model.generation_config.eos_token_id)


@contextmanager
def no_eos(model: PreTrainedModel) -> Iterator[None]:
    with logit_bias(model, dict.fromkeys(eos_ids(model), -1e9)):
        yield


@contextmanager
def counting_forwards(model: PreTrainedModel, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], int]]:
    calls = 0
    original = model.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    yield lambda: calls


def generation_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if "_run_generation_loop" in thread.name]
