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
        assert summary["long"]["together_last_s"] >= summary["long"]["alone_s"] > 0
