"""The window benchmark runs end to end on tiny sizes, so it cannot rot between measurements."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import window
from tests.support.bot_harness import save_lively_llama


def test_the_window_benchmark_compares_both_rules_turn_by_turn(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = save_lively_llama(tiny_model_dir, tmp_path / "lively")
    arguments = ["--model", str(model), "--turns", "8", "--max-prompt-tokens", "400", "--new-tokens", "8"]
    window.main([*arguments, "--out", str(tmp_path / "out")])
    report = json.loads((tmp_path / "out" / "window.json").read_text())
    assert set(report["summary"]) == {"window", "slide"}
    assert [t["turn"] for t in report["turns"]] == [n for n in range(1, 9) for _ in range(2)]
    assert all(t["prompt_tokens"] <= 400 for t in report["turns"])
    assert report["summary"]["window"]["budget_reached_at_turn"] is not None, "the history outgrew the budget"
    assert "| window |" in (tmp_path / "out" / "window.md").read_text()
