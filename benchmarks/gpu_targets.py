"""The H200 targets (issue 16) next to what `llamacord bench` measured, so the GPU run's output says at once whether
they were met: `python -m benchmarks.gpu_targets OUT_DIR` reads OUT_DIR/bench.json, writes OUT_DIR/targets.md and
prints it (`benchmarks/gpu_run.sh` runs it last). Standard library only.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class Target:
    """One engine row's figure (a key of `PathResult.summary`) against a bound, both in `unit` once scaled."""

    label: str
    concurrency: int
    key: str
    bound: float
    at_least: bool  # True: the figure must reach the bound; False: stay under it
    unit: str
    scale: float = 1.0  # from the report's unit to `unit`

    def describe(self) -> str:
        return f"{self.label} {'≥' if self.at_least else '≤'} {self.bound:,.0f} {self.unit}"


TARGETS = (
    Target("tok/s per stream, 1 concurrent", 1, "stream_tok_s", 800, at_least=True, unit="tok/s"),
    Target("total tok/s, 256 concurrent", 256, "total_tok_s", 30_000, at_least=True, unit="tok/s"),
    Target("TTFT p50, 8 concurrent", 8, "ttft_p50_s", 50, at_least=False, unit="ms", scale=1000),
)


def verdicts(report: dict[str, Any], targets: tuple[Target, ...] = TARGETS) -> list[tuple[Target, str, str]]:
    """(target, measured, verdict) for each target, from the engine's rows of a `bench.json`."""
    rows = {row["concurrency"]: row for row in report["engine"]}
    results = []
    for target in targets:
        value = rows.get(target.concurrency, {}).get(target.key)
        if value is None:
            results.append((target, "–", f"not measured (no {target.concurrency}-concurrent figure)"))
            continue
        scaled = value * target.scale
        met = scaled >= target.bound if target.at_least else scaled <= target.bound
        results.append((target, f"{scaled:,.1f} {target.unit}", "met" if met else "not met"))
    return results


def targets_table(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        f"Targets (H200), engine rows of the run of {report['date']}: {env['device_name']}, {env['dtype']}, "
        f"{env['model']}, attention {env['attention']}, {report['new_tokens']} new tokens per conversation",
        "",
        "| target | measured | verdict |",
        "| --- | ---: | --- |",
        *(f"| {target.describe()} | {measured} | {verdict} |" for target, measured, verdict in verdicts(report)),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m benchmarks.gpu_targets OUT_DIR (the folder holding bench.json)", file=sys.stderr)
        return 2
    out = Path(argv[0])
    table = targets_table(json.loads((out / "bench.json").read_text(encoding="utf-8")))
    (out / "targets.md").write_text(table, encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
