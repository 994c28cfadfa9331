"""The Discord load benchmark runs end to end on tiny sizes, so it cannot rot between measurements."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import discord_load


def test_the_discord_load_benchmark_compares_pacing_off_and_on(tmp_path: Path) -> None:
    # Six channels editing every 50 ms overrun a limit of 10 a second many times over.
    arguments = ["--channels", "6", "--rounds", "1", "--new-tokens", "48", "--edit-interval", "0.05"]
    discord_load.main([*arguments, "--limit", "10", "--pace", "8", "--timeout", "60", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "discord_load.json").read_text())
    before, after = report["summary"]["before"], report["summary"]["after"]
    assert before["rate_limited"] > 0 and before["peak_per_s"] > 10
    assert after["rate_limited"] == 0 and after["peak_per_s"] <= 10
    assert after["completed"] == after["replies"] == 6
    assert after["first_message_max_s"] > 0 and after["edits_per_reply"] >= 1
    assert "| 8.0/s (after) |" in (tmp_path / "discord_load.md").read_text()
