"""A flood and a bystander: does the second user wait for one of the flood's replies, or for the whole flood?

    python -m benchmarks.fairness --rounds 3

Through the turn pipeline the bot runs for every Discord message (the SQLite store, the fair line, the engine), on
the tests' tiny random Llama with lively weights, MAX_BATCH_SIZE=2: one user sends `--flood` requests at once (one
per channel), and a second user sends one a moment later. For the bystander: the wait for a slot (the fair line and
the engine's queue) and the time to the first token. For comparison, the same with the order before fair turns
(first come, first served), alternating with it in one process. Then the throughput check: `--concurrency` users
(8 and 32) each send one request at once, MAX_BATCH_SIZE equal to the count, with each order: the total tokens/s
must not drop, since fairness must never leave a slot idle while anyone waits.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from time import perf_counter
from typing import Any

from transformers import AutoModelForCausalLM

from benchmarks.bench import concurrency_list, cpu_model, load_average, write_report
from benchmarks.random_llama import BOS, EOS_TOKENS, PAD, liven, save_random_llama
from benchmarks.timing import FirstTokenView
from bot.chat.admission import FairQueue, Ticket
from bot.chat.pipeline import Speaker, TurnPipeline, UserTurn
from bot.engine.local.executor import AsyncEngine
from bot.metrics import Metrics
from bot.settings import Settings
from storage import open_store

GUILD = 1
CORPUS = ["A flood of questions and one bystander, answered in fair turns by the tiny model."] * 8


class FirstComeFirstServed(FairQueue):
    """The order before fair turns: every waiting request in arrival order, whoever sent it."""

    def order(self) -> Iterator[Ticket]:
        waiting = [ticket for users in self._waiting.values() for tickets in users.values() for ticket in tickets]
        return iter(sorted(waiting, key=lambda ticket: ticket.entered_at))


async def ask(pipeline: TurnPipeline, channel: int, user: int, text: str) -> dict[str, float]:
    """One message through the pipeline: its wait for a slot, its first token and its end (seconds from its arrival),
    and its tokens."""
    clock = FirstTokenView()
    started = perf_counter()
    result = await pipeline.answer(
        UserTurn(channel, text, Speaker(user, f"user{user}"), server=GUILD), lambda reply: clock
    )
    assert result.metrics is not None and clock.first_at is not None
    return {
        "queue_wait_s": result.metrics.queue_wait_s or 0.0,
        "ttft_s": clock.first_at - started,
        "done_s": perf_counter() - started,
        "tokens": result.metrics.generated_tokens,
    }


def pipeline_for(store: Any, engine: AsyncEngine, settings: Settings, order: str) -> TurnPipeline:
    pipeline = TurnPipeline(store, engine, settings, Metrics())
    if order == "fifo":
        pipeline.queue = FirstComeFirstServed(
            settings.max_batch_size,
            max_queued=settings.max_queued_requests,
            max_active_per_user=settings.max_active_per_user,
            max_waiting_per_user=settings.max_waiting_per_user,
        )
    return pipeline


async def flood_and_bystander(
    store: Any, engine: AsyncEngine, settings: Settings, order: str, count: int, n: int
) -> tuple[dict[str, float], float]:
    """The bystander's figures, and the median time one flood request generated (its slot held, its wait left out)."""
    pipeline = pipeline_for(store, engine, settings, order)
    base = n * 1000
    flood = [asyncio.create_task(ask(pipeline, base + c, 1, f"question {c}")) for c in range(count)]
    await asyncio.sleep(0.05)  # a moment later
    bystander = await ask(pipeline, base + 999, 2, "just one question")
    flood_results = await asyncio.gather(*flood)
    return bystander, statistics.median(r["done_s"] - r["queue_wait_s"] for r in flood_results)


async def throughput(store: Any, engine: AsyncEngine, settings: Settings, order: str, users: int, n: int) -> float:
    pipeline = pipeline_for(store, engine, settings.model_copy(update={"max_batch_size": users}), order)
    base = n * 100_000
    started = perf_counter()
    results = await asyncio.gather(*(ask(pipeline, base + u, 10 + u, f"hello from {u}") for u in range(users)))
    return sum(r["tokens"] for r in results) / (perf_counter() - started)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="llamacord-fairness-") as scratch:
        directory = save_random_llama("test", Path(scratch) / "model", CORPUS, special_tokens=[BOS, *EOS_TOKENS, PAD])
        liven(AutoModelForCausalLM.from_pretrained(directory)).save_pretrained(directory)
        settings = Settings(  # type: ignore[call-arg]
            _env_file=None,
            model=str(directory),
            device="cpu",
            temperature=0.0,
            max_new_tokens=args.new_tokens,
            max_prompt_tokens=512,
            max_batch_size=max(args.concurrency),
            max_queued_requests=64,
            max_waiting_per_user=args.flood,  # every flood request waits (the default, 8, would refuse some at once)
        )
        engine = await AsyncEngine.from_settings(settings)
        flood: dict[str, list[dict[str, float]]] = {"fifo": [], "fair": []}
        flood_generation: dict[str, list[float]] = {"fifo": [], "fair": []}
        rates: dict[str, dict[int, list[float]]] = {order: {n: [] for n in args.concurrency} for order in flood}
        try:
            async with open_store(Path(scratch) / "fairness.sqlite3") as store:
                narrow = settings.model_copy(update={"max_batch_size": 2})
                for n in range(args.rounds):
                    for order in ["fifo", "fair"] if n % 2 == 0 else ["fair", "fifo"]:
                        bystander, generation = await flood_and_bystander(
                            store, engine, narrow, order, args.flood, n * 2 + (order == "fair")
                        )
                        flood[order].append(bystander)
                        flood_generation[order].append(generation)
                        for users in args.concurrency:
                            rate = await throughput(store, engine, settings, order, users, n * 2 + (order == "fair"))
                            rates[order][users].append(rate)
        finally:
            await engine.shutdown()
    summary = {
        order: {
            "bystander_queue_wait_s": statistics.median(r["queue_wait_s"] for r in flood[order]),
            "bystander_ttft_s": statistics.median(r["ttft_s"] for r in flood[order]),
            "flood_request_s": statistics.median(flood_generation[order]),
            "total_tok_s": {users: statistics.median(values) for users, values in rates[order].items()},
        }
        for order in flood
    }
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "load_average_end": load_average()},
        "settings": {key: value for key, value in vars(args).items() if key != "out"} | {"max_batch_size_flood": 2},
        "summary": summary,
        "bystander_runs": flood,
        "throughput_runs": rates,
    }


def markdown(report: dict[str, Any]) -> str:
    settings, fifo, fair = report["settings"], report["summary"]["fifo"], report["summary"]["fair"]
    lines = [
        f"- date: {report['date']}; CPU: {report['machine']['cpu']}; {settings['rounds']} rounds, medians; "
        f"flood of {settings['flood']} requests, MAX_BATCH_SIZE=2, {settings['new_tokens']} new tokens at most",
        "",
        "| order | bystander's wait for a slot | bystander's first token | one flood request's generation "
        + "".join(f"| total tok/s, {n} users " for n in settings["concurrency"])
        + "|",
        "| --- | ---: | ---: | ---: " + "| ---: " * len(settings["concurrency"]) + "|",
    ]
    for name, row in (("first come, first served (before)", fifo), ("fair turns (now)", fair)):
        lines.append(
            f"| {name} | {row['bystander_queue_wait_s'] * 1000:.0f} ms | {row['bystander_ttft_s'] * 1000:.0f} ms "
            f"| {row['flood_request_s'] * 1000:.0f} ms "
            + "".join(f"| {row['total_tok_s'][n]:.0f} " for n in settings["concurrency"])
            + "|"
        )
    ratios = ", ".join(
        f"{n} users {fair['total_tok_s'][n] / fifo['total_tok_s'][n]:.2f}×" for n in settings["concurrency"]
    )
    lines += ["", f"Fair over first-come total tok/s: {ratios}."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flood", type=int, default=16, help="requests one user sends at once (default 16)")
    parser.add_argument("--new-tokens", type=int, default=64, help="most tokens per reply, greedy (default 64)")
    parser.add_argument("--concurrency", type=concurrency_list, default=[8, 32], help="users for throughput")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, alternating the orders (default 3)")
    parser.add_argument("--out", type=Path, default=Path("bench-results/fairness"), help="where the results go")
    args = parser.parse_args(argv)
    report = asyncio.run(run(args))
    write_report(args.out, "fairness", report, markdown(report))


if __name__ == "__main__":
    main()
