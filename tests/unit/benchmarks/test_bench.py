"""`llamacord bench` runs end to end on a tiny random Llama, and the GPU run's stand-in model has the real shape."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from benchmarks.bench import build_engine, concurrency_list
from benchmarks.random_llama import build_tokenizer, llama3_special_tokens, model_config
from benchmarks.timing import percentile
from bot.cli import main
from bot.engine.local.loader import load_model
from bot.engine.sampling import SamplingParams
from bot.settings import Settings

NEW_TOKENS = 4


def test_bench_end_to_end_on_tiny_random_weights(tmp_path: Path) -> None:
    out = tmp_path / "out"
    main(
        [
            "bench",
            "--random-weights-config",
            "tiny",
            "--device",
            "cpu",
            "--concurrency",
            "2,1",
            "--new-tokens",
            str(NEW_TOKENS),
            "--rounds",
            "2",
            "--out",
            str(out),
        ]
    )
    report = json.loads((out / "bench.json").read_text())
    assert report["environment"]["model"] == "random weights, tiny config"
    # The attention the engine chose, with its reason: per-request SDPA on a CPU.
    assert report["environment"]["attention"].startswith("cb_varlen_sdpa (per-request SDPA")
    assert "--random-weights-config tiny" in report["command"]
    baseline, engine = report["baseline"], report["engine"]
    assert [row["concurrency"] for row in engine] == [1, 2]
    for row in [baseline, *engine]:
        # Every conversation generated exactly --new-tokens, in both paths, in both rounds.
        assert row["generated_tokens"] == row["requests"] * NEW_TOKENS
        assert row["total_tok_s"] == pytest.approx(row["generated_tokens"] / row["wall_s"])
        assert 0 < row["ttft_p50_s"] <= row["ttft_p95_s"] <= row["e2e_p95_s"]
        assert row["e2e_p50_s"] <= row["e2e_p95_s"]
        assert row["peak_memory_mib"] > 0
    assert baseline["requests"] == 2 * 2  # the largest concurrency, twice
    assert [row["requests"] for row in engine] == [1 * 2, 2 * 2]
    for row in engine:
        assert row["ratio_to_baseline"] == pytest.approx(row["total_tok_s"] / baseline["total_tok_s"])
    table = (out / "bench.md").read_text()
    assert table.count("| engine |") == 2 and "| baseline" in table
    assert f"attention {report['environment']['attention']}" in table
    assert f"{engine[1]['ratio_to_baseline']:.2f}×" in table


async def test_the_cache_runs_every_conversation_of_the_largest_level_at_once(tiny_model_dir: Path) -> None:
    """The executor reserves whole pages per request and one more: a cache of N × the longest request would leave
    some of N conversations waiting for others to finish, and the N-concurrent figures would measure fewer."""
    conversations, prompt_tokens, new_tokens = 8, 61, 16  # 77-token requests: not a whole number of pages
    settings = Settings(_env_file=None, model=str(tiny_model_dir), device="cpu", max_new_tokens=new_tokens)  # type: ignore[call-arg]
    loaded = load_model(settings)
    loaded.model.generation_config.eos_token_id = []  # every request runs to its full length, as in the benchmark
    engine = build_engine(loaded, settings, conversations, prompt_tokens)
    params = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=new_tokens)
    await engine.start()
    try:
        streams = [
            engine.generate([10 + (n + i) % 50 for i in range(prompt_tokens)], params) for n in range(conversations)
        ]
        async with asyncio.timeout(60):
            for stream in streams:
                async for _ in stream:
                    pass
    finally:
        await engine.shutdown()
    assert all(stream.metrics.generated_tokens == new_tokens for stream in streams)
    started = [stream.metrics.queue_wait_s for stream in streams]
    finished = [stream.metrics.total_s for stream in streams]
    assert max(started) < min(finished), "a conversation waited for another to finish"


def test_llama_3_2_1b_stand_in_has_the_real_shape() -> None:
    config = model_config("llama-3.2-1b", 128_256)
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (2048, 8192, 16)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (32, 8, 64)
    assert config.tie_word_embeddings
    assert config.rope_parameters == {
        "rope_type": "llama3",
        "rope_theta": 500_000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    tokenizer = build_tokenizer(["Alice: what is the capital of France?"], 128_256)
    assert len(tokenizer) == 128_256
    ids = tokenizer.convert_tokens_to_ids(["<|begin_of_text|>", "<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"])
    assert ids == [128_000, 128_001, 128_008, 128_009]  # as in Llama 3.2, so its EOS ids are the real ones
    assert len(llama3_special_tokens()) == 256
    # A random id from anywhere in the ordinary range decodes to plain text.
    assert tokenizer.decode([90_000, 127_999]).strip()


def test_percentile_and_concurrency_parsing() -> None:
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile([5.0], 95) == 5.0
    assert concurrency_list("8,1,8") == [1, 8]
