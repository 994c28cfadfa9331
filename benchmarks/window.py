"""One long-lived channel through the bot's own path: does its prompt keep the engine's prefix cache warm?

    python -m benchmarks.window --model smollm2 --turns 40 --max-prompt-tokens 1024 --new-tokens 64

Each turn goes through what the bot runs for a Discord message: the SQLite store, the turn pipeline (history of the
channel's window, `build_chat`, storing both turns), the engine's templating within MAX_PROMPT_TOKENS, and the
local engine. Two channels alternate turn by turn on one engine, so the machine's noise hits both alike:

- **window**: the window rule as committed (an overflowing history is cut to half the budget, and the prompt's start
  then stays put for the following turns);
- **slide**: the rule before it (cut just enough to fit, so the prompt's first tokens change on every turn once the
  budget is reached).

Greedy decoding, the same 40 user messages in both. Per turn: prompt tokens, the tokens the prefix cache served,
the engine's time to first token (from `generate()`), and the time the user waits for the first token (from the
message reaching the pipeline: history, templating and the engine). The bot's defaults otherwise (KV_CACHE_MEMORY,
MAX_BATCH_SIZE). Reported: the median of the user's wait before
the budget is first reached and after, and the cached share of turns 20 to 40.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from time import perf_counter
from typing import Any

from benchmarks.bench import cpu_model, load_average, write_report
from benchmarks.timing import FirstTokenView
from bot.chat.pipeline import Reply, Speaker, TurnPipeline, UserTurn
from bot.engine.api import Prompt
from bot.engine.local.executor import AsyncEngine
from bot.engine.templating import WINDOW_KEEP, PromptBuilder
from bot.metrics import Metrics
from bot.settings import Settings
from storage import open_store

MESSAGES = [
    "Hi! I want to start a small vegetable garden on my balcony. Where should I begin?",
    "It gets about five hours of direct sun in the afternoon. Is that enough for tomatoes?",
    "What size of pot would a cherry tomato plant need?",
    "Should I buy seedlings or start from seed?",
    "How often should I water the pots in summer?",
    "Can I grow basil next to the tomatoes in the same container?",
    "What kind of soil mix do you recommend for containers?",
    "Is it worth adding compost, and how much?",
    "My neighbour says I need to feed the plants every week. Is that true?",
    "What fertiliser would you use for tomatoes specifically?",
    "How do I know when a tomato is ripe enough to pick?",
    "Some leaves at the bottom are turning yellow. What could cause that?",
    "Could it be overwatering? The pot does not have many drainage holes.",
    "How can I add drainage to a plastic pot safely?",
    "What about lettuce? Can it grow in the same sunlight?",
    "How long until I can harvest lettuce from seed?",
    "Can I keep harvesting the outer leaves, or do I cut the whole head?",
    "I'd also like some herbs. Which herbs are easiest for a beginner?",
    "Does mint really take over everything? Should it have its own pot?",
    "How do I stop aphids without using strong chemicals?",
    "Would ladybugs help, and can I buy them?",
    "What's a simple homemade spray that works against aphids?",
    "How often should I apply that spray?",
    "Can I grow strawberries in a hanging basket?",
    "Which strawberry variety fruits all summer long?",
    "Do strawberries need pollinators on a balcony that high up?",
    "How can I hand-pollinate them if bees don't come?",
    "What should I do with the plants when autumn comes?",
    "Can any of these survive the winter outside in pots?",
    "Should I bring the herbs indoors for the winter?",
    "What grows well indoors on a windowsill in winter?",
    "Do I need a grow light, or is a south window enough?",
    "How many hours a day should a grow light run?",
    "Can I reuse the old soil next spring?",
    "How do I refresh old potting soil?",
    "Is crop rotation a thing for pots too?",
    "What would you plant first next spring, given everything we discussed?",
    "Can you make me a short month-by-month plan for next year?",
    "Which of those tasks is the most important not to forget?",
    "Thanks! Last question: what is one mistake most beginners make?",
]


@dataclass(slots=True)
class Turn:
    variant: str
    turn: int
    prompt_tokens: int
    cached_prompt_tokens: int
    dropped_messages: int
    engine_ttft_s: float | None
    wait_s: float | None  # the message reaching the pipeline → the first token shown


class VariantEngine:
    """The engine, with prompts built by `builder` (the window rule under test)."""

    def __init__(self, engine: AsyncEngine, builder: PromptBuilder) -> None:
        self._engine = engine
        self._builder = builder
        self.last_prompt: Prompt | None = None

    async def prepare(self, messages: Sequence[Mapping[str, str]], max_new_tokens: int) -> Prompt:
        self.last_prompt = await asyncio.to_thread(self._builder.build, list(messages), max_new_tokens)
        return self.last_prompt

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        model=args.model,
        device="cpu",
        temperature=0.0,
        max_new_tokens=args.new_tokens,
        max_prompt_tokens=args.max_prompt_tokens,
    )
    engine = await AsyncEngine.from_settings(settings)
    variants = {"window": WINDOW_KEEP, "slide": 1.0}
    turns: list[Turn] = []
    try:
        context = engine._prompt_builder.context_length  # type: ignore[union-attr]
        with tempfile.TemporaryDirectory(prefix="llamacord-window-") as scratch:
            async with open_store(Path(scratch) / "window.sqlite3") as store:
                builders = {
                    name: PromptBuilder(engine.tokenizer, args.max_prompt_tokens, context, window_keep=keep)
                    for name, keep in variants.items()
                }
                engines = {name: VariantEngine(engine, builder) for name, builder in builders.items()}
                pipelines = {name: TurnPipeline(store, engines[name], settings, Metrics()) for name in variants}
                for number, text in enumerate(MESSAGES[: args.turns], start=1):
                    order = list(variants) if number % 2 else list(reversed(variants))
                    for name in order:
                        clock = FirstTokenView()

                        def view(reply: Reply, clock: FirstTokenView = clock) -> FirstTokenView:
                            return clock

                        channel_id = 1 if name == "window" else 2
                        started = perf_counter()
                        result = await pipelines[name].answer(
                            UserTurn(channel_id, text, Speaker(7, "Alice")), view, assistant=Speaker(9, "Llamacord")
                        )
                        prompt = engines[name].last_prompt
                        metrics = result.metrics
                        assert prompt is not None and metrics is not None
                        turns.append(
                            Turn(
                                variant=name,
                                turn=number,
                                prompt_tokens=metrics.prompt_tokens,
                                cached_prompt_tokens=metrics.cached_prompt_tokens,
                                dropped_messages=prompt.dropped_messages,
                                engine_ttft_s=metrics.ttft_s,
                                wait_s=clock.first_at - started if clock.first_at is not None else None,
                            )
                        )
    finally:
        await engine.shutdown()
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "load_average_end": load_average()},
        "settings": {"model": args.model, "max_prompt_tokens": args.max_prompt_tokens, "new_tokens": args.new_tokens},
        "summary": {name: summarize([t for t in turns if t.variant == name]) for name in variants},
        "turns": [asdict(turn) for turn in turns],
    }


def summarize(turns: list[Turn]) -> dict[str, Any]:
    """Medians of the user's wait before the budget was first reached and after it, and the cached share of turns
    20 to 40."""
    reached = next((t.turn for t in turns if t.dropped_messages), None)
    before = [t.wait_s for t in turns if (reached is None or t.turn < reached) and t.wait_s is not None]
    after = [t.wait_s for t in turns if reached is not None and t.turn >= reached and t.wait_s is not None]
    late = [t for t in turns if 20 <= t.turn <= 40]
    cached, total = sum(t.cached_prompt_tokens for t in late), sum(t.prompt_tokens for t in late)
    median_before = statistics.median(before) if before else None
    median_after = statistics.median(after) if after else None
    return {
        "budget_reached_at_turn": reached,
        "median_wait_before_s": median_before,
        "median_wait_after_s": median_after,
        "after_over_before": median_after / median_before if median_before and median_after else None,
        "cached_share_turns_20_40": cached / total if total else None,
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"- date: {report['date']}; CPU: {report['machine']['cpu']}; settings: {report['settings']}",
        "",
        "| rule | budget reached at turn | median wait before | median wait after | after / before "
        "| cached share, turns 20-40 |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, summary in report["summary"].items():
        lines.append(
            f"| {name} | {summary['budget_reached_at_turn']} | {_ms(summary['median_wait_before_s'])} "
            f"| {_ms(summary['median_wait_after_s'])} | {_ratio(summary['after_over_before'])} "
            f"| {_percent(summary['cached_share_turns_20_40'])} |"
        )
    lines += ["", "| turn | " + " | ".join(f"{n}: prompt / cached / wait" for n in report["summary"]) + " |"]
    lines.append("| ---: | " + " | ".join("---:" for _ in report["summary"]) + " |")
    by_turn: dict[int, dict[str, dict[str, Any]]] = {}
    for turn in report["turns"]:
        by_turn.setdefault(turn["turn"], {})[turn["variant"]] = turn
    for number, row in sorted(by_turn.items()):
        cells = [
            f"{t['prompt_tokens']} / {t['cached_prompt_tokens']} / {_ms(t['wait_s'])}"
            + (" (cut)" if t["dropped_messages"] else "")
            for t in (row[name] for name in report["summary"])
        ]
        lines.append(f"| {number} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1000:.0f} ms"


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{value:.0%}"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="MODEL (default smollm2)")
    parser.add_argument("--turns", type=int, default=40, help=f"turns, at most {len(MESSAGES)} (default 40)")
    parser.add_argument("--max-prompt-tokens", type=int, default=1024, help="MAX_PROMPT_TOKENS (default 1024)")
    parser.add_argument("--new-tokens", type=int, default=64, help="most tokens per reply, greedy (default 64)")
    parser.add_argument("--out", type=Path, default=Path("bench-results/window"), help="where window.json/.md go")
    args = parser.parse_args(argv)
    report = asyncio.run(run(args))
    write_report(args.out, "window", report, markdown(report))


if __name__ == "__main__":
    main()
