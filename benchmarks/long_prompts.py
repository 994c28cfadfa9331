"""Long prompts arriving together: is the last first token about N times one prompt's, or far worse?

    python -m benchmarks.long_prompts --rounds 3

Busy channels with long histories send exactly this load. On the tests' tiny random Llama (48k parameters, here with
an 8,192-token context) on the CPU, with the engine as the bot builds it (the cache holds all the prompts at once),
each round measures, for each attention:

- one prompt of `--tokens` tokens alone: its time to first token;
- `--count` such prompts submitted at once: the time to the last one's first token;
- alternated three times, so the machine's noise falls on both alike: the medians, their ratio, and the best of each;
- the same for prompts of half the length;

for `sdpa` (continuous batching's own: one SDPA call over the packed batch, with a mask sized by the whole cache)
and `cb_varlen_sdpa` (per request, what the engine picks on a CPU), alternating in one process. Resident memory is
read once each engine has started. 8 greedy new tokens per request, so prefill dominates, as it does for a long
history's first token.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks.bench import cpu_model, load_average, write_report
from benchmarks.random_llama import BOS, EOS_TOKENS, PAD, save_random_llama
from bot.engine.local.attention import SDPA, AttentionChoice, choose_attention
from bot.engine.local.executor import AsyncEngine
from bot.engine.local.threads import in_passing_thread
from bot.engine.sampling import SamplingParams

NEW_TOKENS = 8
REPEATS = 3
CONTEXT = 8192
CORPUS = ["Busy channels with long histories send long prompts together.", "The tokenizer only decodes here."] * 8


async def first_tokens(engine: AsyncEngine, prompts: list[list[int]]) -> list[float]:
    """Submit every prompt at once; the seconds to each one's first token."""
    params = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=NEW_TOKENS)
    streams = [engine.generate(prompt, params) for prompt in prompts]
    await asyncio.gather(*(drain(stream) for stream in streams))
    return [stream.metrics.ttft_s for stream in streams if stream.metrics.ttft_s is not None]


async def drain(stream: Any) -> None:
    async for _ in stream:
        pass


async def measure(engine: AsyncEngine, prompts: Prompts, tokens: int, count: int) -> dict[str, float]:
    """One prompt alone, then `count` at once, `REPEATS` times; every prompt new, so none is served from cache."""
    alone, together = [], []
    for _ in range(REPEATS):
        alone.append((await first_tokens(engine, prompts.take(tokens, 1)))[0])
        together.append(max(await first_tokens(engine, prompts.take(tokens, count))))
    typical_alone, typical_together = statistics.median(alone), statistics.median(together)
    return {
        "alone_s": typical_alone,
        "together_last_s": typical_together,
        "ratio": typical_together / typical_alone,
        "best_alone_s": min(alone),
        "best_together_last_s": min(together),
        "best_ratio": min(together) / min(alone),
    }


class Prompts:
    """Prompts that never repeat (no shared prefix for the cache to reuse), of ordinary token ids."""

    def __init__(self, ordinary: int) -> None:
        self.ordinary = ordinary  # ids below this are not special tokens
        self.made = 0

    def take(self, tokens: int, count: int) -> list[list[int]]:
        first, self.made = self.made, self.made + count
        return [[(n * 7919 + i * 31 + n * i) % self.ordinary for i in range(tokens)] for n in range(first, self.made)]


def build_model() -> tuple[Any, Any]:
    with tempfile.TemporaryDirectory(prefix="llamacord-long-") as scratch:
        directory = save_random_llama(
            "test", Path(scratch), CORPUS, special_tokens=[BOS, *EOS_TOKENS, PAD], context_length=CONTEXT
        )
        return AutoModelForCausalLM.from_pretrained(directory).eval(), AutoTokenizer.from_pretrained(directory)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    model, tokenizer = await in_passing_thread(build_model)  # as the bot loads: no OpenMP pool outlives it
    prompts = Prompts(model.config.vocab_size - 5)  # the 5 special tokens come last
    attentions = {SDPA: AttentionChoice(SDPA, False, "continuous batching's own"), "varlen": choose_attention(model)}
    results: dict[str, dict[str, list[dict[str, float]]]] = {name: {"long": [], "half": []} for name in attentions}
    memory: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, attention in attentions.items():
            engine = AsyncEngine(
                model,
                tokenizer,
                max_batch_size=32,
                max_queued_requests=32,
                max_sequence_tokens=args.tokens + 2 * NEW_TOKENS,
                cache_tokens=args.count * (args.tokens + 2 * NEW_TOKENS) * 4,
                attention=attention,
            )
            await engine.start()
            memory[name] = psutil.Process().memory_info().rss / 2**30
            try:
                results[name]["long"].append(await measure(engine, prompts, args.tokens, args.count))
                results[name]["half"].append(await measure(engine, prompts, args.tokens // 2, args.count))
            finally:
                await engine.shutdown()
    summary = {
        name: {
            size: {key: statistics.median(run[key] for run in runs) for key in runs[0]} for size, runs in sizes.items()
        }
        | {"rss_after_start_gib": memory[name]}
        for name, sizes in results.items()
    }
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "load_average_end": load_average()},
        "settings": {
            "tokens": args.tokens,
            "count": args.count,
            "rounds": args.rounds,
            "repeats": REPEATS,
            "new_tokens": NEW_TOKENS,
        },
        "summary": summary,
        "runs": results,
    }


def markdown(report: dict[str, Any]) -> str:
    settings = report["settings"]
    lines = [
        f"- date: {report['date']}; CPU: {report['machine']['cpu']}; {settings['rounds']} rounds of "
        f"{settings['repeats']} alternations; medians over rounds, of times and of each round's ratio (best: the "
        "ratio of the best of each side in a round)",
        "",
        f"| attention | one {settings['tokens']} alone | {settings['count']} at once: last | ratio | best: ratio "
        f"| one {settings['tokens'] // 2} alone | {settings['count']} at once: last | ratio | RSS after start |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, summary in report["summary"].items():
        long, half = summary["long"], summary["half"]
        lines.append(
            f"| {name} | {long['alone_s'] * 1000:.0f} ms | {long['together_last_s']:.2f} s | {long['ratio']:.1f}× "
            f"| {long['best_ratio']:.1f}× "
            f"| {half['alone_s'] * 1000:.0f} ms | {half['together_last_s']:.2f} s | {half['ratio']:.1f}× "
            f"| {summary['rss_after_start_gib']:.2f} GiB |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=3900, help="tokens of each long prompt (default 3900)")
    parser.add_argument("--count", type=int, default=10, help="prompts submitted at once (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, alternating the attentions (default 3)")
    parser.add_argument("--out", type=Path, default=Path("bench-results/long-prompts"), help="where the results go")
    args = parser.parse_args(argv)
    report = asyncio.run(run(args))
    write_report(args.out, "long_prompts", report, markdown(report))


if __name__ == "__main__":
    main()
