"""Bot overhead: from a Discord message arriving to the first visible reply token and to the final edit, under N
concurrent channels, next to the engine's own time to first token.

    python -m benchmarks.bot_overhead --channels 8 --rounds 5

The real bot (discord.py, the chat cog, the SQLite store, the real `AsyncEngine` on the tiny random Llama from
tests/) runs against the fake Discord from tests/ on 127.0.0.1. Each round, one user message mentioning the bot
arrives in each of N channels at once (MESSAGE_CREATE on the gateway). For each message:

- **first visible token**: when the fake receives the POST that creates the reply (it carries the first delta);
- **final edit**: when the fake receives the reply's last edit (the one that removes the Stop button).

Each is split into what happened before the engine was asked (gateway, "should I answer", storing the message,
loading the history, the typing indicator), the engine (`prepare`, then its time to first token or to its last
token, from the stream's own metrics), and what came after (posting or editing on Discord). The final edit waits
for the edit throttle by design (EDIT_INTERVAL_SECONDS, default 1 s, as in production): at most one edit per
interval keeps Discord's rate limits from ever answering 429.

All times are `time.monotonic()` on one event loop; the fake stamps each REST call when it arrives.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.timing import percentile
from bot.engine.local.executor import AsyncEngine
from tests.support.bot_harness import bot_settings, running_bot, wait_for_reply
from tests.support.fake_discord import FakeDiscord
from tests.support.tiny_model import save_tiny_llama


@dataclass(slots=True)
class EngineCall:
    prepare_at: float = 0.0
    generate_at: float = 0.0
    stream: Any = None


class TimedEngine:
    """The real engine; notes when each prompt was prepared and submitted, keyed by the newest message's text."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self.calls: dict[str, EngineCall] = {}
        self._keys: dict[int, str] = {}  # id(prompt) → key

    async def prepare(self, messages: Any, max_new_tokens: int) -> Any:
        call = EngineCall(prepare_at=time.monotonic())
        key = messages[-1]["content"]
        self.calls[key] = call
        prompt = await self._engine.prepare(messages, max_new_tokens)
        self._keys[id(prompt)] = key
        return prompt

    def generate(self, prompt: Any, params: Any) -> Any:
        call = self.calls[self._keys.pop(id(prompt))]
        call.generate_at = time.monotonic()
        call.stream = self._engine.generate(prompt, params)
        return call.stream

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


@dataclass(frozen=True, slots=True)
class ReplyTiming:
    """Seconds from the message's arrival, and the parts of them."""

    first_visible_s: float
    final_edit_s: float
    before_engine_s: float  # gateway → should-answer → store → history → typing, until prepare() is called
    prepare_s: float
    engine_ttft_s: float
    engine_total_s: float
    after_first_token_s: float  # first token → the POST that shows it reaches Discord
    after_last_token_s: float  # last token → the final edit reaches Discord (edit throttle included)
    bot_first_s: float  # the bot's own share of first_visible_s: before_engine_s + after_first_token_s
    bot_final_s: float  # the bot's own share of final_edit_s: before_engine_s + after_last_token_s
    generated_tokens: int


async def one_round(fake: FakeDiscord, bot: Any, engine: TimedEngine, channels: list[int], tag: str) -> list[Any]:
    texts = [f"{tag} channel {index}: what is the capital of France?" for index in range(len(channels))]

    async def ask(channel_id: int, text: str) -> tuple[float, dict[str, Any]]:
        arrived = time.monotonic()
        message = await fake.send_message(fake.alice, text, channel_id=channel_id, mention_bot=True)
        return arrived, message

    sent = await asyncio.gather(*(ask(channel_id, text) for channel_id, text in zip(channels, texts, strict=True)))
    replies = await asyncio.gather(*(wait_for_reply(fake, bot.store, message) for _, message in sent))
    timings = []
    for (arrived, _), (posted, _), text in zip(sent, replies, texts, strict=True):
        reply_ids = {int(m["id"]) for m in posted}
        first_post = fake.created_by[int(posted[0]["id"])].time
        last_call = max(
            call.time
            for call in fake.calls
            if call.method in ("POST", "PATCH") and any(call.path.endswith(f"/messages/{i}") for i in reply_ids)
        )
        call = next(call for key, call in engine.calls.items() if key.endswith(text))  # key: "Alice: <text>"
        metrics = call.stream.metrics
        first_token_at = call.generate_at + metrics.ttft_s
        last_token_at = call.generate_at + metrics.total_s
        before_engine = call.prepare_at - arrived
        after_first = first_post - first_token_at
        after_last = max(first_post, last_call) - last_token_at
        timings.append(
            ReplyTiming(
                first_visible_s=first_post - arrived,
                final_edit_s=max(first_post, last_call) - arrived,
                before_engine_s=before_engine,
                prepare_s=call.generate_at - call.prepare_at,
                engine_ttft_s=metrics.ttft_s,
                engine_total_s=metrics.total_s,
                after_first_token_s=after_first,
                after_last_token_s=after_last,
                bot_first_s=before_engine + after_first,
                bot_final_s=before_engine + after_last,
                generated_tokens=metrics.generated_tokens,
            )
        )
    return timings


async def measure(args: argparse.Namespace, scratch: Path) -> list[ReplyTiming]:
    model_dir = save_tiny_llama(scratch / "tiny-llama")
    async with FakeDiscord() as fake:
        channels = []
        for index in range(args.channels):
            channel_id = fake.snowflake()
            fake.channels[channel_id] = fake._text_channel(channel_id, f"bench-{index}", 10 + index)
            channels.append(channel_id)
        settings = bot_settings(
            fake,
            scratch / "bench.sqlite3",
            model=str(model_dir),
            edit_interval_seconds=args.edit_interval,
            max_new_tokens=args.new_tokens,
            max_batch_size=args.channels,
            max_queued_requests=args.channels,
        )
        engine = TimedEngine(await AsyncEngine.from_settings(settings))
        try:
            async with running_bot(settings, engine) as bot:
                await one_round(fake, bot, engine, channels[:1], "warm-up")
                timings = []
                for round_index in range(args.rounds):
                    timings += await one_round(fake, bot, engine, channels, f"round {round_index}")
        finally:
            await engine.shutdown()
    return timings


def summarize(timings: list[ReplyTiming]) -> dict[str, dict[str, float]]:
    fields = [name for name in ReplyTiming.__slots__ if name.endswith("_s")]
    return {
        name: {
            "p50": percentile([getattr(t, name) for t in timings], 50),
            "p95": percentile([getattr(t, name) for t in timings], 95),
            "mean": statistics.fmean(getattr(t, name) for t in timings),
        }
        for name in fields
    }


def markdown(report: dict[str, Any]) -> str:
    rows = [
        ("message → first visible token", "first_visible_s"),
        ("  before the engine (gateway, store, history, typing)", "before_engine_s"),
        ("  engine: prepare (template, tokenize)", "prepare_s"),
        ("  engine: time to first token", "engine_ttft_s"),
        ("  after the first token (POST to Discord)", "after_first_token_s"),
        ("  **the bot's own share** (before + after the engine)", "bot_first_s"),
        ("message → final edit", "final_edit_s"),
        ("  engine: submit → last token", "engine_total_s"),
        ("  after the last token (edit throttle + PATCH)", "after_last_token_s"),
        ("  **the bot's own share** (before + after the engine)", "bot_final_s"),
    ]
    summary = report["summary"]
    lines = [
        f"- date: {report['date']}; command: `{report['command']}`",
        f"- {report['channels']} concurrent channels × {report['rounds']} rounds = {report['replies']} replies, "
        f"tiny random Llama (tests/support/tiny_model.py), up to {report['new_tokens']} new tokens, "
        f"EDIT_INTERVAL_SECONDS={report['edit_interval_s']}; "
        f"mean generated tokens {report['generated_tokens_mean']:.1f}",
        f"- machine: {report['machine']}; load average at start {report['load_average_start']}, "
        f"at end {report['load_average_end']}",
        "",
        "| from the message arriving | p50 | p95 |",
        "| --- | ---: | ---: |",
    ]
    for label, name in rows:
        lines.append(f"| {label} | {summary[name]['p50'] * 1000:.0f} ms | {summary[name]['p95'] * 1000:.0f} ms |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=8, help="concurrent channels (default 8)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of one message per channel (default 5)")
    parser.add_argument("--new-tokens", type=int, default=32, help="max new tokens per reply (default 32)")
    parser.add_argument("--edit-interval", type=float, default=1.0, help="EDIT_INTERVAL_SECONDS (default 1.0)")
    parser.add_argument("--json", type=Path, default=Path("bench-results/bot_overhead.json"))
    args = parser.parse_args(argv)
    load_start = [round(v, 2) for v in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="llamacord-overhead-") as scratch:
        timings = asyncio.run(measure(args, Path(scratch)))
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.bot_overhead " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "load_average_start": load_start,
        "load_average_end": [round(v, 2) for v in os.getloadavg()],
        "channels": args.channels,
        "rounds": args.rounds,
        "replies": len(timings),
        "new_tokens": args.new_tokens,
        "edit_interval_s": args.edit_interval,
        "generated_tokens_mean": statistics.fmean(t.generated_tokens for t in timings),
        "summary": summarize(timings),
        "replies_detail": [asdict(t) for t in timings],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(markdown(report))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
