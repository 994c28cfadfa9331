"""Store benchmark: append latency and "load the last 50 messages of one channel" latency in a large database, on
SQLite or on PostgreSQL.

    python -m benchmarks.store --messages 1000000 --channels 10000                    # SQLite, in a temporary file
    python -m benchmarks.store --messages 1000000 --channels 10000 --database-url postgresql://user:pw@host/db

1. The store creates the empty schema (its own migrations: an empty PostgreSQL database, or a new SQLite file).
2. The fill goes around the store for speed: SQLite with plain sqlite3 in one transaction (synchronous=OFF for the
   fill only), PostgreSQL with COPY. Messages land on random channels in turn, as real traffic interleaves, so a
   channel's rows are spread across the whole table; each has a Discord message id, mapped in `discord_messages`.
3. The store is reopened exactly as the bot opens it (SQLite: WAL, synchronous=NORMAL unless --synchronous FULL;
   PostgreSQL: the connection pool) and each operation is timed on its own, `--samples` times, each on a random
   channel, after a short warm-up: `append_message` (a ~200-character message with its Discord message id, as the
   bot appends) and `load_history(channel, 50)`.

It prints p50/p90/p99 and writes everything, machine and versions included, as JSON (default
bench-results/store.json). Timings are wall-clock around one `await`, so they include aiosqlite's hop to its thread
(SQLite) or the round trip to the server (PostgreSQL). Caches are warm (the fill just wrote the data).
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
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from itertools import count
from pathlib import Path

import aiosqlite
import asyncpg

from benchmarks.bench import cpu_model
from storage import PostgresStore, SQLiteStore, Store
from storage.base import Opening

BASE = 1_000_000_000_000_000_000  # snowflake-sized ids
Row = tuple[int, str, str, int | None, str | None, int, datetime]  # channel, role, text, author, name, Discord id, time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000, help="messages in the database (default 1e6)")
    parser.add_argument("--channels", type=int, default=10_000, help="channels they are spread over")
    parser.add_argument("--samples", type=int, default=2_000, help="timed operations of each kind")
    parser.add_argument("--warmup", type=int, default=200, help="untimed operations of each kind first")
    parser.add_argument("--history", type=int, default=50, help="messages loaded per load_history call")
    parser.add_argument("--database-url", help="benchmark PostgreSQL: an empty database (or a filled one, --reuse)")
    parser.add_argument("--synchronous", choices=["NORMAL", "FULL"], default="NORMAL", help="SQLite's setting")
    parser.add_argument("--db", type=Path, help="SQLite database file to build (default: a temporary directory)")
    parser.add_argument("--reuse", action="store_true", help="the database is already filled: skip the fill")
    parser.add_argument("--json", type=Path, default=Path("bench-results/store.json"), help="where to write results")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.database_url and args.db:
        parser.error("--db is SQLite's file, --database-url PostgreSQL's database: give one")
    return args


def traffic(messages: int, channels: int, rng: random.Random) -> Iterator[Row]:
    """`messages` rows of conversation over `channels` channels, alternately user and assistant, one per second."""
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(5_000)]
    texts = [" ".join(rng.choices(words, k=rng.randint(3, 70))) for _ in range(20_000)]  # ~15-450 characters
    epoch = datetime(2025, 1, 1, tzinfo=UTC)
    for i in range(messages):
        user = i % 2 == 0
        yield (
            BASE + rng.randrange(channels),
            "user" if user else "assistant",
            texts[i % len(texts)],
            BASE + 500 + rng.randrange(1_000) if user else None,
            "user" if user else None,
            BASE + 10_000_000 + i,
            epoch + timedelta(seconds=i),
        )


def fill_sqlite(path: Path, messages: int, channels: int, rng: random.Random) -> None:
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("PRAGMA synchronous = OFF")
        connection.execute("PRAGMA cache_size = -262144")  # 256 MiB for the fill only
        connection.execute("BEGIN")
        connection.executemany("INSERT INTO channels (channel_id) VALUES (?)", ((BASE + c,) for c in range(channels)))
        connection.executemany(
            "INSERT INTO messages (channel_id, role, content, author_id, author_name, message_id, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            ((*row[:6], row[6].isoformat(timespec="microseconds")) for row in traffic(messages, channels, rng)),
        )
        connection.execute("INSERT INTO discord_messages SELECT message_id, id FROM messages")
        connection.execute("COMMIT")
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        connection.close()


async def fill_postgres(url: str, messages: int, channels: int, rng: random.Random) -> None:
    connection = await asyncpg.connect(url)
    try:
        async with connection.transaction():
            await connection.copy_records_to_table(
                "channels", records=((BASE + c,) for c in range(channels)), columns=["channel_id"]
            )
            await connection.copy_records_to_table(
                "messages",
                records=(
                    (c, role, text.encode(), author, None if name is None else name.encode(), discord_id, at)
                    for c, role, text, author, name, discord_id, at in traffic(messages, channels, rng)
                ),
                columns=["channel_id", "role", "content", "author_id", "author_name", "message_id", "created_at"],
            )
            await connection.execute("INSERT INTO discord_messages SELECT message_id, id FROM messages")
        await connection.execute("VACUUM ANALYZE")  # fresh statistics and visibility map, as autovacuum leaves them
    finally:
        await connection.close()


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
        "over_10ms": sum(1 for x in ms if x > 10),  # SQLite: WAL checkpoints (every ~1000 pages) show up here
        "mean_ms": statistics.fmean(ms),
    }


async def measure(args: argparse.Namespace, opening: Opening[Store], rng: random.Random) -> dict[str, dict[str, float]]:
    content = " ".join(["lorem ipsum dolor sit amet"] * 8)  # ~215 characters
    discord_ids = count(BASE + 500_000_000 + args.seed * 10_000_000)  # new ones, as each appended turn has
    async with opening as store:

        async def append() -> None:
            await store.append_message(
                BASE + rng.randrange(args.channels),
                "user",
                content,
                author_id=BASE + 1,
                author_name="bench",
                message_id=next(discord_ids),
            )

        async def load() -> None:
            history = await store.load_history(BASE + rng.randrange(args.channels), args.history)
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


@dataclass
class Run:
    """One backend's part of the report."""

    backend: str
    versions: dict[str, str]
    database: dict[str, object]
    results: dict[str, dict[str, float]]


async def postgres_facts(url: str) -> dict[str, object]:
    connection = await asyncpg.connect(url)
    try:
        return {
            "server": await connection.fetchval("SHOW server_version"),
            "messages": await connection.fetchval("SELECT count(*) FROM messages"),
            "size_mib": round(await connection.fetchval("SELECT pg_database_size(current_database())") / 2**20, 1),
            "synchronous_commit": await connection.fetchval("SHOW synchronous_commit"),
            "fsync": await connection.fetchval("SHOW fsync"),
        }
    finally:
        await connection.close()


def run_postgres(args: argparse.Namespace, rng: random.Random) -> Run:
    url = args.database_url
    fill_s = None
    if not args.reuse:
        asyncio.run(_create(PostgresStore.open(url)))
        if asyncio.run(postgres_facts(url))["messages"]:
            sys.exit("the database already holds messages; pass --reuse to benchmark it as it is, or use an empty one")
        print(f"filling PostgreSQL with {args.messages:,} messages over {args.channels:,} channels ...", flush=True)
        start = time.perf_counter()
        asyncio.run(fill_postgres(url, args.messages, args.channels, rng))
        fill_s = time.perf_counter() - start
        print(f"  filled in {fill_s:.1f} s", flush=True)
    facts = asyncio.run(postgres_facts(url))
    results = asyncio.run(measure(args, PostgresStore.open(url), rng))
    return Run(
        backend="postgresql",
        versions={"postgresql": str(facts.pop("server")), "asyncpg": asyncpg.__version__},
        database={**facts, "channels": args.channels, "fill_s": None if fill_s is None else round(fill_s, 2)},
        results=results,
    )


def run_sqlite(args: argparse.Namespace, rng: random.Random) -> Run:
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
            asyncio.run(_create(SQLiteStore.open(path)))
            print(f"filling {path} with {args.messages:,} messages over {args.channels:,} channels ...", flush=True)
            start = time.perf_counter()
            fill_sqlite(path, args.messages, args.channels, rng)
            fill_s = time.perf_counter() - start
            print(f"  filled in {fill_s:.1f} s", flush=True)
        with sqlite3.connect(path) as raw:
            total = raw.execute("SELECT count(*) FROM messages").fetchone()[0]
        size = path.stat().st_size
        results = asyncio.run(measure(args, SQLiteStore.open(path, synchronous=args.synchronous), rng))
    finally:
        if temporary is not None:
            temporary.cleanup()
    return Run(
        backend="sqlite",
        versions={"sqlite": sqlite3.sqlite_version, "aiosqlite": getattr(aiosqlite, "__version__", "?")},
        database={
            "messages": total,
            "channels": args.channels,
            "size_mib": round(size / 2**20, 1),
            "fill_s": None if fill_s is None else round(fill_s, 2),
            "synchronous": args.synchronous,
        },
        results=results,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rng = random.Random(args.seed)
    run = run_postgres(args, rng) if args.database_url else run_sqlite(args, rng)
    arguments = sys.argv[1:] if argv is None else argv
    report = {
        "benchmark": "store",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        # The URL's password is not written down.
        "command": "python -m benchmarks.store "
        + " ".join("postgresql://..." if a == args.database_url else a for a in arguments),
        "machine": {
            "cpu": cpu_model(),
            "cpus": os.cpu_count(),
            "system": platform.platform(),
            "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        },
        **asdict(run),
        "versions": {"python": platform.python_version(), **run.versions},
    }
    for name, stats in run.results.items():
        print(
            f"{name:>14}: p50 {stats['p50_ms']:.3f} ms  p90 {stats['p90_ms']:.3f} ms  p99 {stats['p99_ms']:.3f} ms  "
            f"max {stats['max_ms']:.3f} ms  >10 ms: {stats['over_10ms']}  (n={stats['n']}, {run.backend})"
        )
    print(f"database: {run.database['messages']:,} messages, {run.database['size_mib']} MiB")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.json}")
    return 0


async def _create(opening: Opening[Store]) -> None:
    """Create the empty schema through the store itself: its migrations (and for SQLite, WAL mode)."""
    async with opening:
        pass


if __name__ == "__main__":
    raise SystemExit(main())
