"""The store benchmark runs on both backends (with tiny numbers: the figures themselves are in docs/benchmarks.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.store import main


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_the_store_benchmark_fills_measures_and_reports(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    target = (
        ["--db", str(tmp_path / "bench.sqlite3")]
        if backend == "sqlite"
        else ["--database-url", request.getfixturevalue("postgres_url")]
    )
    report_path = tmp_path / "store.json"
    arguments = ["--messages", "300", "--channels", "5", "--samples", "20", "--warmup", "2", "--json", str(report_path)]
    assert main([*arguments, *target]) == 0
    assert main([*arguments, *target, "--reuse", "--seed", "1"]) == 0  # a second run on the filled database

    report = json.loads(report_path.read_text())
    assert report["backend"] == {"sqlite": "sqlite", "postgres": "postgresql"}[backend]
    assert report["database"]["messages"] == 300 + 22  # counted before the run: the fill and the first run's appends
    assert set(report["results"]) == {"append", "load_last_50"}
    assert all(result["n"] == 20 and result["p50_ms"] > 0 for result in report["results"].values())
    assert report["command"].startswith("python -m benchmarks.store --messages 300")
    assert target[-1] not in report["command"] or backend == "sqlite", "the URL, with its password, is not written"
