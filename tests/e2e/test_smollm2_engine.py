"""The executor on a real instruction-tuned model (SmolLM2-135M-Instruct, MODEL=smollm2), offline."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bot.engine.api import FinishReason
from bot.engine.local.executor import AsyncEngine, RequestStream
from bot.engine.sampling import SamplingParams
from bot.settings import Settings

pytestmark = pytest.mark.smollm2

TIMEOUT_S = 180


async def answer(engine: AsyncEngine, question: str, params: SamplingParams) -> tuple[str, RequestStream]:
    prompt = await engine.prepare([{"role": "user", "content": question}], params.max_new_tokens)
    stream = engine.generate(prompt, params)
    return "".join([delta async for delta in stream]), stream


async def test_smollm2_knows_the_capital_of_france_while_batched_with_others(smollm2_cache_dir: Path) -> None:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        model="smollm2",
        model_cache_dir=smollm2_cache_dir,
        device="cpu",
        max_batch_size=4,
        max_prompt_tokens=256,
        max_new_tokens=64,
    )
    greedy = SamplingParams(temperature=0, top_p=1.0, max_new_tokens=64)
    async with asyncio.timeout(TIMEOUT_S):
        engine = await AsyncEngine.from_settings(settings)
        try:
            (france, stream), *_ = await asyncio.gather(
                answer(engine, "What is the capital of France?", greedy),
                answer(engine, "Write a haiku about llamas.", SamplingParams(0.7, 0.9, 64)),
                answer(engine, "What is 2 + 2?", greedy),
            )
        finally:
            await engine.shutdown()
    assert "Paris" in france
    assert stream.metrics.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
    assert stream.metrics.generated_tokens > 0
