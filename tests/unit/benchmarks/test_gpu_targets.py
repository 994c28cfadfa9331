"""The GPU run's targets are read off the right rows and compared the right way round."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.gpu_targets import TARGETS, main, verdicts


def report(**rows: dict[str, float | None]) -> dict[str, Any]:
    """A bench.json with one engine row per `c<concurrency>` keyword."""
    return {
        "date": "2026-12-02T00:00:00+00:00",
        "new_tokens": 256,
        "environment": {
            "device_name": "NVIDIA H200",
            "dtype": "bfloat16",
            "model": "random weights, llama-3.2-1b config",
            "attention": "sdpa (none of flash-attn-4, flash-attn-3, flash-attn is installed; no CUDA graphs)",
        },
        "engine": [{"concurrency": int(name[1:]), **figures} for name, figures in rows.items()],
    }


def test_each_target_reads_its_own_level_and_direction() -> None:
    measured = report(
        c1={"stream_tok_s": 812.0, "total_tok_s": 790.0, "ttft_p50_s": 0.012},
        c8={"stream_tok_s": 700.0, "total_tok_s": 5_000.0, "ttft_p50_s": 0.0512},  # 51.2 ms: over 50
        c256={"stream_tok_s": 150.0, "total_tok_s": 30_000.0, "ttft_p50_s": 0.900},  # exactly the bound
    )
    assert [(measured_text, verdict) for _, measured_text, verdict in verdicts(measured)] == [
        ("812.0 tok/s", "met"),
        ("30,000.0 tok/s", "met"),
        ("51.2 ms", "not met"),
    ]
    fast = report(c1={"stream_tok_s": 799.9}, c8={"ttft_p50_s": 0.049}, c256={"total_tok_s": 29_999.0})
    assert [verdict for _, _, verdict in verdicts(fast)] == ["not met", "not met", "met"]


def test_a_level_that_was_not_run_is_not_measured(tmp_path: Path) -> None:
    measured = report(c1={"stream_tok_s": None, "ttft_p50_s": 0.01}, c8={"ttft_p50_s": 0.02})
    (tmp_path / "bench.json").write_text(json.dumps(measured))
    assert main([str(tmp_path)]) == 0
    table = (tmp_path / "targets.md").read_text()
    assert "attention sdpa (none of flash-attn-4" in table
    assert f"| {TARGETS[0].describe()} | – | not measured (no 1-concurrent figure) |" in table
    assert "| total tok/s, 256 concurrent ≥ 30,000 tok/s | – | not measured (no 256-concurrent figure) |" in table
    assert "| TTFT p50, 8 concurrent ≤ 50 ms | 20.0 ms | met |" in table
