"""Store benchmark: append latency and "load the last 50 messages of one channel" latency in a large database.

    python -m benchmarks.store --messages 1000000 --channels 10000

1. `Store.open` creates an empty database (so the schema is the store's own, migrations included) and closes it.
2. The fill goes around the store for speed: plain sqlite3, one transaction, `executemany`, synchronous=OFF (the
   fill only). Messages land on random channels in turn, as real traffic interleaves, so a channel's rows are
   spread across the whole file rather than stored together.
3. The store is reopened exactly as the bot opens it (WAL, synchronous=NORMAL unless --synchronous FULL) and each
   operation is timed on its own, `--samples` times, each on a random channel, after a short warm-up:
   `append_message` (a ~200-character message) and `load_history(channel, 50)`.

It prints p50/p90/p99 and writes everything, machine and versions included, as JSON (default
bench-results/store.json). Timings are wall-clock around one `await`, so they include aiosqlite's hop to its
thread and back. The OS page cache is warm (the fill just wrote the file); a cold cache is slower on first touch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sqlite3
import statistics
import string
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiosqlite

from benchmarks.bench import cpu_model
from storage import Store


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000, help="messages in the database (default 1e6)")
    parser.add_argument("--channels", type=int, default=10_000, help="channels they are spread over")
    parser.add_argument("--samples", type=int, default=2_000, help="timed operations of each kind")
    parser.add_argument("--warmup", type=int, default=200, help="untimed operations of each kind first")
    parser.add_argument("--history", type=int, default=50, help="messages loaded per load_history call")
    parser.add_argument("--synchronous", choices=["NORMAL", "FULL"], default="NORMAL", help="the store's setting")
    parser.add_argument("--db", type=Path, help="database file to build (default: a temporary directory)")
    parser.add_argument("--reuse", action="store_true", help="--db already holds a filled database: skip the fill")
    parser.add_argument("--json", type=Path, default=Path("bench-results/store.json"), help="where to write results")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def fill(path: Path, messages: int, channels: int, rng: random.Random) -> float:
    """Bulk-insert `messages` rows over `channels` channels into the store's schema; return the seconds it took."""
    start = time.perf_counter()
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(5_000)]
    texts = [" ".join(rng.choices(words, k=rng.randint(3, 70))) for _ in range(20_000)]  # ~15-450 characters
    base = 1_000_000_000_000_000_000
    epoch = datetime(2025, 1, 1, tzinfo=UTC)

    def rows():
        for i in range(messages):
            channel = base + rng.randrange(channels)
            user = i % 2 == 0
            yield (
                channel,
                "user" if user else "assistant",
                texts[i % len(texts)],
                base + 500 + rng.randrange(1_000) if user else None,
                "user" if user else None,
                base + 10_000_000 + i,
                (epoch + timedelta(seconds=i)).isoformat(timespec="microseconds"),
            )

    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("PRAGMA synchronous = OFF")
        connection.execute("PRAGMA cache_size = -262144")  # 256 MiB for the fill only
        connection.execute("BEGIN")
        connection.executemany("INSERT INTO channels (channel_id) VALUES (?)", ((base + c,) for c in range(channels)))
        connection.executemany(
            "INSERT INTO messages (channel_id, role, content, author_id, author_name, message_id, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            rows(),
        )
        connection.execute("COMMIT")
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        connection.close()
    return time.perf_counter() - start


def summarise(samples_ns: list[int]) -> dict[str, float]:
    ms = sorted(s / 1e6 for s in samples_ns)

    def pct(p: float) -> float:
        return ms[min(len(ms) - 1, round(p / 100 * (len(ms) - 1)))]

    return {
        "n": len(ms),
        "p50_ms": pct(50),
        "p90_ms": pct(90),
        "p99_ms": pct(99),
        "max_ms": ms[-1],
        "over_10ms": sum(1 for x in ms if x > 10),  # WAL checkpoints (every ~1000 pages) show up here
        "mean_ms": statistics.fmean(ms),
    }


async def measure(args: argparse.Namespace, path: Path, rng: random.Random) -> dict[str, dict[str, float]]:
    base = 1_000_000_000_000_000_000
    content = " ".join(["lorem ipsum dolor sit amet"] * 8)  # ~215 characters
    async with Store.open(path, synchronous=args.synchronous) as store:

        async def append() -> None:
            await store.append_message(
                base + rng.randrange(args.channels), "user", content, author_id=base + 1, author_name="bench"
            )

        async def load() -> None:
            history = await store.load_history(base + rng.randrange(args.channels), args.history)
            assert history, "an empty channel: the fill did not run"

        results = {}
        for name, operation in (("append", append), (f"load_last_{args.history}", load)):
            for _ in range(args.warmup):
                await operation()
            samples = []
            for _ in range(args.samples):
                start = time.perf_counter_ns()
                await operation()
                samples.append(time.perf_counter_ns() - start)
            results[name] = summarise(samples)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rng = random.Random(args.seed)
    temporary = None
    if args.db is None:
        temporary = tempfile.TemporaryDirectory(prefix="llamacord-bench-")
        path = Path(temporary.name) / "bench.sqlite3"
    else:
        path = args.db
        if path.exists() and not args.reuse:
            sys.exit(f"{path} exists; pass --reuse to benchmark it as it is, or choose another --db")

    try:
        fill_s = None
        if not (args.reuse and path.exists()):
            asyncio.run(_create(path))
            print(f"filling {path} with {args.messages:,} messages over {args.channels:,} channels ...", flush=True)
            fill_s = fill(path, args.messages, args.channels, rng)
            print(f"  filled in {fill_s:.1f} s", flush=True)
        with sqlite3.connect(path) as raw:
            total = raw.execute("SELECT count(*) FROM messages").fetchone()[0]
        size = path.stat().st_size

        results = asyncio.run(measure(args, path, rng))
    finally:
        if temporary is not None:
            temporary.cleanup()

    report = {
        "benchmark": "store",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.store " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {
            "cpu": cpu_model(),
            "cpus": os.cpu_count(),
            "system": platform.platform(),
            "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        },
        "versions": {
            "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version,
            "aiosqlite": getattr(aiosqlite, "__version__", "?"),
        },
        "database": {
            "messages": total,
            "channels": args.channels,
            "file_mib": round(size / 2**20, 1),
            "fill_s": None if fill_s is None else round(fill_s, 2),
            "synchronous": args.synchronous,
        },
        "results": results,
    }
    for name, stats in results.items():
        print(
            f"{name:>14}: p50 {stats['p50_ms']:.3f} ms  p90 {stats['p90_ms']:.3f} ms  p99 {stats['p99_ms']:.3f} ms  "
            f"max {stats['max_ms']:.3f} ms  >10 ms: {stats['over_10ms']}  "
            f"(n={stats['n']}, synchronous={args.synchronous})"
        )
    print(f"database: {total:,} messages, {report['database']['file_mib']} MiB")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.json}")
    return 0


async def _create(path: Path) -> None:
    """Create the empty database through the store itself: its schema, its migrations, WAL mode."""
    async with Store.open(path):
        pass


if __name__ == "__main__":
    raise SystemExit(main())
