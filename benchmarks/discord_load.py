"""Discord load: many channels asked at once on a fake Discord that enforces Discord's global limit of 50 REST
requests a second, with the bot's pacing off (before) and on (after), alternating in one run.

    python -m benchmarks.discord_load --channels 100 --rounds 3

The real bot (discord.py, the chat cog, the SQLite store, the real `AsyncEngine` on the tests' tiny Llama with
lively weights, greedy) runs against the fake Discord from tests/ on 127.0.0.1, which answers a 51st request with the
bot token within one second with a global 429, as Discord does (`--limit` lowers it). Each trial starts a fresh
fake and bot (the engine is shared) and sends one message mentioning the bot in each channel at once, then waits
until every reply has ended. For each trial:

- **requests/s peak**: the most requests with the bot token that reached the fake in any one second (429s
  included); **429s**: how many it refused;
- **completed**: replies that ended normally and were stored (the others failed: discord.py gives up after five
  429s in a row);
- **first message**: from the message being sent to the POST that creates its reply (p50 and max), for every reply
  that posted one;
- **final edit**: from the message being sent to the reply's last request, and **after the last token**: from the
  engine's last token to that request (p50 and max), **characters**, **edits a reply** and the mean **seconds
  between its edits**, for the completed replies;
- how many typing indicators were sent.

All times are `time.monotonic()` on one event loop; the fake stamps each REST call when it arrives.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks.bench import cpu_model, load_average, write_report
from benchmarks.bot_overhead import TimedEngine
from benchmarks.timing import percentile
from bot.engine.local.executor import AsyncEngine
from bot.metrics import ReplyOutcome
from storage import Role
from tests.support.bot_harness import bot_settings, eventually, lively_engine, reply_done, running_bot
from tests.support.fake_discord import GLOBAL_LIMIT, FakeDiscord
from tests.support.tiny_model import save_tiny_llama


@dataclass(frozen=True, slots=True)
class Trial:
    """One trial's figures; times in seconds from each message being sent."""

    paced: bool
    replies: int
    completed: int
    requests: int
    peak_per_s: int
    rate_limited: int
    first_message_p50_s: float
    first_message_max_s: float
    final_edit_p50_s: float
    final_edit_max_s: float
    after_last_token_p50_s: float
    after_last_token_max_s: float
    reply_chars: float
    edits_per_reply: float
    edit_interval_s: float
    typing_sent: int
    duration_s: float


def replies_ended(metrics: Any) -> dict[str, float]:
    registry = metrics.registry
    counts = {
        outcome: registry.get_sample_value("llamacord_replies_total", {"outcome": outcome}) for outcome in ReplyOutcome
    }
    return {str(outcome): count or 0.0 for outcome, count in counts.items()}


@dataclass(frozen=True, slots=True)
class Asked:
    """A message sent to the bot: when, where, and its text (which finds its engine call)."""

    sent_at: float
    channel_id: int
    text: str


def measure_trial(
    fake: FakeDiscord, engine: TimedEngine, asked: dict[int, Asked], completed: set[int], start: int, paced: bool
) -> Trial:
    """The figures of one trial from what reached the fake (its calls from index `start` on). The first message counts
    for every reply that posted one (a reply that failed later included); the rest for the `completed` ones."""
    calls = fake.calls[start:]
    refused = {id(call) for call in fake.rate_limited}
    accepted = [call for call in calls if id(call) not in refused]
    first, final, after_last, edits, intervals, chars = [], [], [], [], [], []
    for message_id, message in asked.items():
        sent_at = message.sent_at
        # The reply's first message came with its Stop button (an error notice comes without).
        posted = [m for m in fake.replies_to(message_id) if fake.created_by[int(m["id"])].json.get("components")]
        if not posted:
            continue
        first_post = fake.created_by[int(posted[0]["id"])].time
        first.append(first_post - sent_at)
        done = reply_done(fake, message_id)
        if message_id not in completed or done is None:
            continue
        paths = {f"/channels/{m['channel_id']}/messages/{m['id']}" for m in done}
        patches = [call.time for call in accepted if call.method == "PATCH" and call.path in paths]
        last = max([*(fake.created_by[int(m["id"])].time for m in done), *patches])
        final.append(last - sent_at)
        call = next(call for key, call in engine.calls.items() if key.endswith(message.text))
        after_last.append(last - (call.generate_at + call.stream.metrics.total_s))
        chars.append(sum(len(m["content"]) for m in done))
        edits.append(len(patches))
        if patches:
            intervals.append((last - first_post) / len(patches))
    times = [call.time for call in calls]
    return Trial(
        paced=paced,
        replies=len(asked),
        completed=len(completed),
        requests=sum(call.global_scope for call in calls),
        peak_per_s=fake.peak_rate(after=start),
        rate_limited=len(fake.rate_limited),
        first_message_p50_s=percentile(first, 50) if first else float("nan"),
        first_message_max_s=max(first, default=float("nan")),
        final_edit_p50_s=percentile(final, 50) if final else float("nan"),
        final_edit_max_s=max(final, default=float("nan")),
        after_last_token_p50_s=percentile(after_last, 50) if after_last else float("nan"),
        after_last_token_max_s=max(after_last, default=float("nan")),
        reply_chars=statistics.fmean(chars) if chars else 0.0,
        edits_per_reply=statistics.fmean(edits) if edits else 0.0,
        edit_interval_s=statistics.fmean(intervals) if intervals else float("nan"),
        typing_sent=sum(call.path.endswith("/typing") for call in accepted),
        duration_s=max(times) - min(times) if times else 0.0,
    )


async def trial(engine: AsyncEngine, args: argparse.Namespace, scratch: Path, index: int, paced: bool) -> Trial:
    async with FakeDiscord(global_limit=args.limit) as fake:
        channels = [fake.add_channel(f"load-{n}") for n in range(args.channels)]
        settings = bot_settings(
            fake,
            scratch / f"trial-{index}.sqlite3",
            temperature=0.0,
            edit_interval_seconds=args.edit_interval,
            max_new_tokens=args.new_tokens,
            max_batch_size=args.channels,
            max_queued_requests=args.channels,
            max_active_per_user=args.channels,
            discord_requests_per_second=args.pace if paced else 0,
        )
        timed = TimedEngine(engine)
        async with running_bot(settings, timed) as bot:
            start = len(fake.calls)
            asked: dict[int, Asked] = {}  # by message id

            async def ask(number: int, channel_id: int) -> None:
                sent_at = time.monotonic()
                text = f"[{number}] tell me a long story about llamas"  # the same in every trial (greedy)
                message = await fake.send_message(fake.alice, text, channel_id=channel_id, mention_bot=True)
                asked[int(message["id"])] = Asked(sent_at, channel_id, text)

            async def answered(channel_id: int) -> bool:
                """Whether the reply completed: a failed one is not stored."""
                return any(m.role is Role.ASSISTANT for m in await bot.store.load_history(channel_id, 10))

            await asyncio.gather(*(ask(number, channel_id) for number, channel_id in enumerate(channels)))

            async def all_ended() -> bool:
                return sum(replies_ended(bot.metrics).values()) >= len(channels)

            with suppress(AssertionError):  # past the timeout, the replies still going count as not completed
                await eventually(all_ended, timeout_s=args.timeout, what="every reply to end")
            completed = {message_id for message_id, message in asked.items() if await answered(message.channel_id)}
            return measure_trial(fake, timed, asked, completed, start, paced)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    trials: list[Trial] = []
    with tempfile.TemporaryDirectory(prefix="llamacord-discord-load-") as directory:
        scratch = Path(directory)
        model_dir = save_tiny_llama(scratch / "tiny-llama")
        async with lively_engine(
            model_dir, scratch / "lively", max_batch_size=args.channels, max_queued_requests=args.channels
        ) as engine:
            for index in range(2 * args.rounds):
                paced = index % 2 == 1  # before, after, before, after, ...
                trials.append(await trial(engine, args, scratch, index, paced))
                print(f"trial {index} ({'paced' if paced else 'unpaced'}): {trials[-1]}", flush=True)
    summary = {
        name: {
            key: statistics.median(getattr(t, key) for t in trials if t.paced == paced)
            for key in Trial.__slots__
            if key != "paced"
        }
        for name, paced in (("before", False), ("after", True))
    }
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "load_average_end": load_average()},
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "discord.py": metadata.version("discord.py"),
        },
        "settings": {key: str(value) for key, value in vars(args).items()},
        "summary": summary,
        "trials": [asdict(t) for t in trials],
    }


def markdown(report: dict[str, Any]) -> str:
    settings = report["settings"]
    lines = [
        f"- date: {report['date']}; CPU: {report['machine']['cpu']} ({report['machine']['cpus']} CPUs); "
        f"{settings['channels']} channels at once, {settings['rounds']} rounds of each, medians; "
        f"up to {settings['new_tokens']} new tokens, EDIT_INTERVAL_SECONDS={settings['edit_interval']}, "
        f"the fake's global limit {settings['limit']}/s",
        "",
        "| pacing | requests/s peak | 429s | completed | first message p50 | first message max "
        "| final edit p50 | final edit max | after the last token p50 | after the last token max | edits a reply "
        "| s between edits | typing sent |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, label in (("before", "off (before)"), ("after", f"{settings['pace']}/s (after)")):
        row = report["summary"][name]
        lines.append(
            f"| {label} | {row['peak_per_s']:.0f} | {row['rate_limited']:.0f} "
            f"| {row['completed']:.0f} of {row['replies']:.0f} "
            f"| {row['first_message_p50_s']:.2f} s | {row['first_message_max_s']:.2f} s "
            f"| {row['final_edit_p50_s']:.1f} s | {row['final_edit_max_s']:.1f} s "
            f"| {row['after_last_token_p50_s']:.2f} s | {row['after_last_token_max_s']:.2f} s "
            f"| {row['edits_per_reply']:.1f} | {row['edit_interval_s']:.1f} | {row['typing_sent']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=100, help="channels asked at once (default 100)")
    parser.add_argument("--rounds", type=int, default=3, help="trials of each, alternating (default 3)")
    parser.add_argument("--new-tokens", type=int, default=600, help="most tokens a reply, greedy (default 600)")
    parser.add_argument("--edit-interval", type=float, default=1.0, help="EDIT_INTERVAL_SECONDS (default 1.0)")
    parser.add_argument("--pace", type=float, default=40.0, help="DISCORD_REQUESTS_PER_SECOND when paced (40)")
    parser.add_argument("--limit", type=int, default=GLOBAL_LIMIT, help="the fake's global limit (Discord's, 50)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a trial may take (default 300)")
    parser.add_argument("--out", type=Path, default=Path("bench-results/discord_load"), help="where results go")
    args = parser.parse_args(argv)
    report = asyncio.run(run(args))
    write_report(args.out, "discord_load", report, markdown(report))


if __name__ == "__main__":
    # Unpaced, discord.py warns of every 429 and the bot logs every reply that failed: the table counts them.
    logging.basicConfig(level=logging.CRITICAL)
    main()
