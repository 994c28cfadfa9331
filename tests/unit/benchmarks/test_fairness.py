"""The fairness benchmark runs end to end on tiny sizes, so it cannot rot between measurements."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import fairness


def test_the_fairness_benchmark_compares_both_orders(tmp_path: Path) -> None:
    arguments = ["--rounds", "1", "--flood", "6", "--concurrency", "2", "--new-tokens", "32", "--out", str(tmp_path)]
    fairness.main(arguments)
    report = json.loads((tmp_path / "fairness.json").read_text())
    fifo, fair = report["summary"]["fifo"], report["summary"]["fair"]
    # With two slots and a flood of six ahead, first come first served makes the bystander wait; fair turns do not.
    assert fair["bystander_queue_wait_s"] < fifo["bystander_queue_wait_s"]
    assert set(fair["total_tok_s"]) == {"2"} and fair["total_tok_s"]["2"] > 0
    assert "| fair turns (now) |" in (tmp_path / "fairness.md").read_text()
