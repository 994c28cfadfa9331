"""The long-prompt benchmark runs end to end on tiny sizes, so it cannot rot between measurements."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import long_prompts


def test_the_long_prompt_benchmark_measures_both_attentions(tmp_path: Path) -> None:
    long_prompts.main(["--tokens", "200", "--count", "3", "--rounds", "1", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "long_prompts.json").read_text())
    assert set(report["summary"]) == {"sdpa", "varlen"}
    for summary in report["summary"].values():
        # Figures only: which is faster at these tiny sizes is noise, and not this test's to judge.
        for size in ("long", "half"):
            figures = summary[size]
            assert figures["alone_s"] > 0 and figures["together_last_s"] > 0
            assert figures["ratio"] == figures["together_last_s"] / figures["alone_s"]
            assert 0 < figures["best_alone_s"] <= figures["alone_s"]
            assert 0 < figures["best_together_last_s"] <= figures["together_last_s"]
            assert figures["best_ratio"] == figures["best_together_last_s"] / figures["best_alone_s"]
        assert summary["rss_after_start_gib"] > 0
