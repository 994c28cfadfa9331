"""`llamacord bench --against URL` end to end against a real OpenAI-compatible server: `transformers serve` on the tiny
Llama, the model the engine side loads too.

`transformers serve` refuses vLLM's `ignore_eos` and `min_tokens` (HTTP 422), so the benchmark sends its requests
without them and reports what the server really generated. Greedy decoding of the tiny Llama repeats a newline and
never reaches an EOS id, so this server still generates every token asked; a copy of the model whose EOS ids include
that newline stops after one token, which the benchmark must report rather than assume away.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer, GenerationConfig

from benchmarks.against import request_options
from bot.cli import main
from tests.support.openai_server import OpenAIServer, free_port

NEW_TOKENS = 4
BASELINE = "baseline (pipeline, one at a time)"


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenAIServer]:
    yield from _serve(tiny_model_dir, tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def early_stopping_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenAIServer]:
    """The tiny Llama with the newline it generates first among its EOS ids: every reply is one token long."""
    directory = tmp_path_factory.mktemp("early-eos") / "model"
    shutil.copytree(tiny_model_dir, directory)
    newline = AutoTokenizer.from_pretrained(directory).encode("\n", add_special_tokens=False)
    generation = GenerationConfig.from_pretrained(directory)
    generation.eos_token_id = [*generation.eos_token_id, *newline]
    generation.save_pretrained(directory)
    yield from _serve(directory, directory.parent)


def _serve(model_dir: Path, log_dir: Path) -> Iterator[OpenAIServer]:
    server = OpenAIServer(model_dir, log_dir / "serve.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def bench(tiny_model_dir: Path, out: Path, *options: str) -> tuple[dict[str, Any], str]:
    """`llamacord bench` on the tiny Llama with `options`: what it wrote to bench.json and bench.md."""
    main(["bench", "--model", str(tiny_model_dir), "--device", "cpu", "--new-tokens", str(NEW_TOKENS), *options])
    return json.loads((out / "bench.json").read_text()), (out / "bench.md").read_text()


def test_the_engine_and_the_server_alternate_on_the_same_conversations(
    tiny_model_dir: Path, server: OpenAIServer, tmp_path: Path
) -> None:
    options = ["--against", server.base_url, "--concurrency", "2,1", "--rounds", "2", "--out", str(tmp_path)]
    report, table = bench(tiny_model_dir, tmp_path, *options)
    described = report["server"]
    # What the server said about itself (no context length), and the model it listed first.
    assert described["base_url"] == server.base_url
    assert described["models"] == [{"id": server.model, "max_model_len": None}]
    assert described["model"] == server.model
    # It refused the length fields at the warm-up, so every measured request went without them, and that is said.
    assert described["refused"]["fields"] == ["ignore_eos", "min_tokens"]
    assert "HTTP 422" in described["refused"]["reply"] and "ignore_eos" in described["refused"]["reply"]
    assert described["request_options"] == request_options(NEW_TOKENS, with_length_fields=False)

    engine, served = report["engine"], described["rows"]
    assert [row["concurrency"] for row in served] == [1, 2]
    assert [row["requests"] for row in served] == [1 * 2, 2 * 2]  # both levels, both rounds
    for engine_row, server_row in zip(engine, served, strict=True):
        assert server_row["path"] == f"server ({server.base_url})"
        # The same rendered chat messages: the server's chat template gives the same prompts, token for token.
        assert server_row["prompt_tokens_mean"] == engine_row["prompt_tokens_mean"]
        # The server's usage counts every token asked (the tiny Llama never reaches an EOS id).
        assert server_row["generated_tokens"] == engine_row["generated_tokens"] == server_row["requests"] * NEW_TOKENS
        assert server_row["fewer_tokens_than_asked"] is False
        assert server_row["total_tok_s"] == pytest.approx(server_row["generated_tokens"] / server_row["wall_s"])
        assert 0 < server_row["ttft_p50_s"] <= server_row["ttft_p95_s"] <= server_row["e2e_p95_s"]
        assert server_row["peak_memory_mib"] is None  # another process's memory is not measured
        assert engine_row["ratio_to_server"] == pytest.approx(engine_row["total_tok_s"] / server_row["total_tok_s"])
        assert engine_row["ttft_p50_ratio_to_server"] == pytest.approx(
            engine_row["ttft_p50_s"] / server_row["ttft_p50_s"]
        )

    lines = table.splitlines()
    assert lines[lines.index("") + 1].endswith("| × baseline | tok/s × server | TTFT p50 × server |")
    paths = [line.split(" | ")[0].removeprefix("| ") for line in lines if line.startswith("| ")][2:]
    server_path = f"server ({server.base_url})"
    assert paths == [BASELINE, "engine", server_path, "engine", server_path]  # each level's engine, then its server
    assert f"{engine[1]['ratio_to_server']:.2f}×" in table
    assert "- the server refused ignore_eos and min_tokens (HTTP 422" in table
    assert "⚠" not in table


def test_a_server_that_stops_short_is_reported_with_the_tokens_it_generated(
    tiny_model_dir: Path, early_stopping_server: OpenAIServer, tmp_path: Path
) -> None:
    options = [
        "--against",
        early_stopping_server.base_url,
        "--concurrency",
        "2",
        "--no-baseline",
        "--out",
        str(tmp_path),
    ]
    report, table = bench(tiny_model_dir, tmp_path, *options)
    (engine,), (served,) = report["engine"], report["server"]["rows"]
    assert engine["generated_tokens"] == 2 * NEW_TOKENS
    assert served["generated_tokens"] == 2 * 1  # by the server's usage: one token a reply, the newline it stops on
    assert served["fewer_tokens_than_asked"] is True
    server_line = next(line for line in table.splitlines() if line.startswith("| server ("))
    assert f"| 1.0 of {NEW_TOKENS} ⚠ |" in server_line
    assert "⚠ The server generated fewer tokens than asked" in table


def test_an_unreachable_server_or_an_unknown_model_stops_the_benchmark_with_a_clear_message(
    tiny_model_dir: Path, server: OpenAIServer, tmp_path: Path
) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(SystemExit) as stopped:
        bench(tiny_model_dir, tmp_path, "--against", nowhere, "--out", str(tmp_path))
    assert str(stopped.value.code).startswith(f"--against {nowhere}: GET /models failed: Connection error")
    with pytest.raises(SystemExit) as stopped:
        bench(
            tiny_model_dir, tmp_path, "--against", server.base_url, "--against-model", "llama", "--out", str(tmp_path)
        )
    assert (
        stopped.value.code == f"--against {server.base_url}: the server does not serve 'llama'; it lists {server.model}"
    )
    assert not (tmp_path / "bench.json").exists()


def test_a_url_without_a_scheme_is_refused_before_anything_runs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["bench", "--against", "127.0.0.1:8011/v1"])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert "expected a server's base URL such as http://127.0.0.1:8000/v1, got '127.0.0.1:8011/v1'" in error


def test_the_length_fields_ask_the_server_for_exactly_the_tokens_asked() -> None:
    options = request_options(64, with_length_fields=True)
    assert options["max_tokens"] == 64
    assert options["extra_body"] == {"ignore_eos": True, "min_tokens": 64}
