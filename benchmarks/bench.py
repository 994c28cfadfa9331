"""`llamacord bench`: our engine against the seed's one-at-a-time pipeline, and optionally against an OpenAI-compatible
server, on the same model, prompts and lengths.

- **baseline**: transformers `pipeline("text-generation")` called once per conversation, one at a time, with the
  chat messages (the pipeline applies the chat template), as the seed did;
- **engine**: our `AsyncEngine` with N conversations submitted at once, for each N in `--concurrency`;
- **server** (`--against URL`): the same N conversations streamed at once from the server (`benchmarks.against`).

Both decode greedily and generate exactly `--new-tokens` tokens: the baseline with `min_new_tokens`, the engine
with a model whose generation config lists no EOS id (the engine stops on those), so tokens/s compare like for
like; the tokens actually generated are counted, not assumed. Each path is warmed up with one short request first.
With `--rounds R` the baseline and the engine levels alternate R times (each level's server run right after the
engine's, or before it in every other round) and their figures pool every round, so a load that comes and goes on a
shared machine hits every side alike.

Times are wall-clock from the moment a conversation is handed over (templating and tokenization included):
time to first token is when the first new token id exists (a `generate` streamer for the baseline, the engine's
own `ttft_s` for the engine), end-to-end is when the last one does. The baseline's latencies are those of a lone
user: N users arriving together would also wait for the conversations ahead of them.

`--random-weights-config` replaces the model with a Llama 3.2 of random weights (see `benchmarks.random_llama`): speed
does not depend on the weights, so the real architecture can be measured on a machine with no hub access.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import resource
import shlex
import sys
import tempfile
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from time import perf_counter
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from benchmarks.timing import PathResult, RequestTiming

if TYPE_CHECKING:
    import torch

    from benchmarks.against import Server
    from bot.engine.local.executor import AsyncEngine
    from bot.engine.local.loader import LoadedModel
    from bot.settings import Settings

QUESTIONS = [
    "Alice: What is the capital of France, and what is it famous for?",
    "Bob: Can you explain what a Python list comprehension is, with a short example?",
    "Chen: Give me three tips for staying focused while studying.",
    "Dana: Why is the sky blue? Keep it simple please.",
    "Eli: Write a haiku about llamas in the mountains.",
    "Fatima: What is the difference between TCP and UDP?",
    "Gus: How do I make a good cup of coffee with a French press?",
    "Hana: Summarize the plot of Romeo and Juliet in a few sentences.",
    "Ivan: What are some good beginner exercises for running?",
    "Jade: Explain recursion to a ten-year-old.",
    "Kofi: What should I pack for a weekend camping trip?",
    "Lena: How does a Discord bot receive messages?",
    "Mo: Suggest a name for my pet turtle and say why.",
    "Nia: What is photosynthesis?",
    "Omar: How can I improve my chess openings?",
    "Pia: Tell me a fun fact about octopuses.",
]


class PeakMemory:
    """Peak memory of one phase: `torch.cuda.max_memory_allocated` on CUDA, the process's peak RSS on a CPU.

    On Linux the RSS peak (VmHWM) is reset through /proc/self/clear_refs, so each phase gets its own; elsewhere it
    is the process's lifetime peak (`ru_maxrss`).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS"

    def reset(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.kind = "lifetime peak RSS"

    def peak_mib(self) -> float:
        import torch

        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.kind == "peak RSS":
            match = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
            if match:
                return int(match.group(1)) / 1024
        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def build_conversations(system_prompt: str, questions: Sequence[str], count: int) -> list[list[dict[str, str]]]:
    """`count` two-message chats as the bot builds them (system prompt, then "Name: text"), cycling the questions."""
    return [
        [{"role": "system", "content": system_prompt}, {"role": "user", "content": questions[i % len(questions)]}]
        for i in range(count)
    ]


def read_questions(path: Path | None) -> list[str]:
    if path is None:
        return list(QUESTIONS)
    questions = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not questions:
        raise SystemExit(f"--prompts {path} holds no non-empty line")
    return questions


def run_baseline(
    loaded: LoadedModel, conversations: list[list[dict[str, str]]], new_tokens: int, result: PathResult
) -> None:
    """The seed's way: one `pipeline` call per conversation, one after another."""
    from transformers import pipeline
    from transformers.generation.streamers import BaseStreamer

    class FirstTokenClock(BaseStreamer):
        """`generate` puts the prompt first, then each new token: time the first and count them all."""

        def __init__(self) -> None:
            self.prompt_seen = False
            self.prompt_tokens = 0
            self.first_token_at: float | None = None
            self.tokens = 0

        def put(self, value: torch.Tensor) -> None:
            if not self.prompt_seen:
                self.prompt_seen, self.prompt_tokens = True, value.numel()
                return
            if self.first_token_at is None:
                self.first_token_at = perf_counter()
            self.tokens += value.numel()

        def end(self) -> None:
            pass

    generator = pipeline("text-generation", model=loaded.model, tokenizer=loaded.tokenizer)
    for messages in conversations:
        clock = FirstTokenClock()
        start = perf_counter()
        generator(
            messages,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            return_full_text=False,
            streamer=clock,
        )
        end = perf_counter()
        if clock.first_token_at is None:
            raise RuntimeError("the baseline generated no token")
        result.requests.append(
            RequestTiming(clock.first_token_at - start, end - start, clock.prompt_tokens, clock.tokens)
        )
        result.wall_s += end - start


async def run_engine(
    engine: AsyncEngine, conversations: list[list[dict[str, str]]], new_tokens: int, result: PathResult
) -> None:
    """All conversations at once, each streamed to the end as the bot streams a reply."""
    from bot.engine.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=new_tokens)

    async def one(messages: list[dict[str, str]]) -> RequestTiming:
        start = perf_counter()
        prompt = await engine.prepare(messages, new_tokens)
        submitted = perf_counter()
        stream = engine.generate(prompt, params)
        async for _ in stream:
            pass
        end = perf_counter()
        metrics = stream.metrics
        if metrics.ttft_s is None:
            raise RuntimeError(f"the engine generated no token (finish reason {metrics.finish_reason})")
        return RequestTiming(
            submitted - start + metrics.ttft_s,
            end - start,
            prompt.num_tokens,
            metrics.generated_tokens,
            metrics.cached_prompt_tokens,
        )

    start = perf_counter()
    timings = await asyncio.gather(*(one(messages) for messages in conversations))
    result.wall_s += perf_counter() - start
    result.requests.extend(timings)


def build_engine(loaded: LoadedModel, settings: Settings, max_concurrency: int, max_prompt_tokens: int) -> AsyncEngine:
    """The engine as `AsyncEngine.from_settings` builds it, sized for this workload, on the already loaded model."""
    from bot.engine.local.executor import AsyncEngine
    from bot.engine.templating import PromptBuilder

    context_length = loaded.model.config.max_position_embeddings
    longest = max_prompt_tokens + settings.max_new_tokens
    return AsyncEngine(
        loaded.model,
        loaded.tokenizer,
        max_batch_size=max_concurrency,
        max_queued_requests=0,
        max_sequence_tokens=longest,
        cache_tokens=cache_tokens_for(max_concurrency, longest, loaded.device),
        prompt_builder=PromptBuilder(
            loaded.tokenizer, max_prompt_tokens=max_prompt_tokens, context_length=context_length
        ),
    )


def cache_tokens_for(conversations: int, longest: int, device: torch.device) -> int:
    """A KV cache that runs `conversations` requests of `longest` tokens at once: the executor reserves each request
    whole pages and one more (`blocks_for`), so `conversations * longest` tokens would run fewer at once (under half
    with CUDA's 256-token pages and 336-token requests) and queue the rest."""
    from bot.engine.local.kv_cache import blocks_for, page_size_for

    page_size = page_size_for(device)
    return conversations * blocks_for(longest, page_size) * page_size


def environment(loaded: LoadedModel, random_weights_config: str | None, attention: str) -> dict[str, Any]:
    import torch
    import transformers

    from bot import __version__

    device_name = torch.cuda.get_device_name(loaded.device) if loaded.device.type == "cuda" else cpu_model()
    return {
        "device": str(loaded.device),
        "device_name": device_name,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "model": f"random weights, {random_weights_config} config" if random_weights_config else loaded.source,
        "parameters": loaded.model.num_parameters(),
        "attention": attention,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "llamacord": __version__,
        "platform": platform.platform(),
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


Column = tuple[str, str, Callable[[dict[str, Any]], str]]  # header, alignment, cell of a row

COLUMNS: list[Column] = [
    ("path", "---", lambda row: row["path"]),
    ("concurrent", "---:", lambda row: str(row["concurrency"])),
    ("requests", "---:", lambda row: str(row["requests"])),
    ("prompt tokens", "---:", lambda row: f"{row['prompt_tokens_mean']:.0f}"),
    ("total tok/s", "---:", lambda row: f"{row['total_tok_s']:.1f}"),
    ("tok/s per stream", "---:", lambda row: _fmt(row["stream_tok_s"], ".1f")),
    ("TTFT p50", "---:", lambda row: _ms(row["ttft_p50_s"])),
    ("TTFT p95", "---:", lambda row: _ms(row["ttft_p95_s"])),
    ("e2e p50", "---:", lambda row: _ms(row["e2e_p50_s"])),
    ("e2e p95", "---:", lambda row: _ms(row["e2e_p95_s"])),
    ("peak MiB", "---:", lambda row: _fmt(row["peak_memory_mib"], ".0f")),
    ("× baseline", "---:", lambda row: _fmt(row.get("ratio_to_baseline"), ".2f", suffix="×")),
]
SHORT = "⚠"  # marks a server row whose replies were shorter than asked


def against_columns(new_tokens: int) -> list[Column]:
    """The table's columns with `--against`: the prefix cache's share, the tokens each reply really had, and the
    engine's figures as multiples of the server's."""

    def generated(row: dict[str, Any]) -> str:
        per_request = row["generated_tokens"] / row["requests"]
        return (
            f"{per_request:.1f} of {new_tokens} {SHORT}" if row.get("fewer_tokens_than_asked") else f"{per_request:.0f}"
        )

    columns = list(COLUMNS)
    columns[4:4] = [
        ("cached prompt tokens", "---:", lambda row: _fmt(row["cached_prompt_tokens_mean"], ".0f")),
        ("new tokens", "---:", generated),
    ]
    return [
        *columns,
        ("tok/s × server", "---:", lambda row: _fmt(row.get("ratio_to_server"), ".2f", suffix="×")),
        ("TTFT p50 × server", "---:", lambda row: _fmt(row.get("ttft_p50_ratio_to_server"), ".2f", suffix="×")),
    ]


def markdown_table(report: dict[str, Any]) -> str:
    env = report["environment"]
    server = report["server"]
    head = [
        f"- date: {report['date']}",
        f"- command: `{report['command']}`",
        f"- device: {env['device']} ({env['device_name']}, {env['cpu_count']} CPUs, {env['torch_threads']} torch "
        f"threads), {env['dtype']}, attention {env['attention']}",
        f"- model: {env['model']} ({env['parameters'] / 1e6:.1f}M parameters)",
        f"- versions: Python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, "
        f"llamacord {env['llamacord']}",
        f"- load average (1, 5, 15 min) at start {report['load_average_start']}, at end {report['load_average_end']}",
        f"- greedy, {report['new_tokens']} new tokens per conversation, {report['rounds']} round(s); "
        f"memory: {report['memory_kind']}",
    ]
    rows = [report["baseline"]] if report["baseline"] else []
    columns = COLUMNS
    if server is None:
        rows += report["engine"]
    else:
        columns = against_columns(report["new_tokens"])
        rows += [row for pair in zip(report["engine"], server["rows"], strict=True) for row in pair]
        head += server_lines(server)
    head += [
        "",
        "| " + " | ".join(header for header, _, _ in columns) + " |",
        "| " + " | ".join(alignment for _, alignment, _ in columns) + " |",
        *("| " + " | ".join(cell(row) for _, _, cell in columns) + " |" for row in rows),
    ]
    if server is not None and any(row["fewer_tokens_than_asked"] for row in server["rows"]):
        head += [
            "",
            f"{SHORT} The server generated fewer tokens than asked (by the usage it reported): its model stopped at an "
            "end-of-sequence token. Its tok/s count only what it generated, and its replies were shorter than the "
            "engine's, so the × server figures do not compare like with like.",
        ]
    return "\n".join(head) + "\n"


def server_lines(server: dict[str, Any]) -> list[str]:
    """The table's head lines about the server: what it said about itself and how it was asked."""
    models = ", ".join(
        f"{entry['id']} (max_model_len {entry['max_model_len'] or 'not reported'})" for entry in server["models"]
    )
    lines = [
        f"- server: {server['base_url']}, model {server['model']}; GET /v1/models: {models}",
        f"- server requests: the engine's rendered chat messages, with `{json.dumps(server['request_options'])}`",
    ]
    refused = server["refused"]
    if refused is not None:
        lines.append(
            f"- the server refused {' and '.join(refused['fields'])} ({refused['reply']}): its requests went without "
            "them"
        )
    return lines


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


async def _bench(settings: Settings, args: argparse.Namespace, command: str) -> dict[str, Any]:
    if not args.against:
        return await _measure(settings, args, command, None)
    from benchmarks.against import Server, ServerError
    from bot.engine.remote import NO_API_KEY

    api_key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else NO_API_KEY
    try:
        # Before the model loads, so that a wrong URL or model name fails in a second.
        server = await Server.connect(args.against, args.against_model, args.new_tokens, api_key)
        try:
            return await _measure(settings, args, command, server)
        finally:
            await server.close()
    except ServerError as error:
        raise SystemExit(f"--against {args.against}: {error}") from None


async def _measure(settings: Settings, args: argparse.Namespace, command: str, server: Server | None) -> dict[str, Any]:
    from bot.engine.local.loader import load_model
    from bot.engine.local.threads import in_passing_thread

    loaded = await in_passing_thread(load_model, settings)
    memory = PeakMemory(loaded.device)
    levels = args.concurrency
    questions = read_questions(args.prompts)
    conversations = build_conversations(settings.system_prompt, questions, max(levels))
    baseline_conversations = conversations[: args.baseline_requests or max(levels)]
    max_prompt_tokens = _longest_prompt(loaded, conversations)
    load_start = load_average()

    baseline = PathResult("baseline (pipeline, one at a time)", 1) if args.baseline else None
    engine_results = {n: PathResult("engine", n) for n in levels}
    server_results = {n: PathResult(server.name, n) for n in levels} if server is not None else {}
    if baseline is not None:  # warm-up, then the first round's memory before the engine's cache exists
        await in_passing_thread(run_baseline, loaded, conversations[:1], 2, PathResult("warm-up", 1))
        memory.reset()
        await in_passing_thread(run_baseline, loaded, baseline_conversations, args.new_tokens, baseline)
        baseline.peak_memory_mib = memory.peak_mib()

    memory.reset()
    # The engine stops on its model's EOS ids: with none, every request generates exactly --new-tokens.
    eos_token_id = loaded.model.generation_config.eos_token_id
    loaded.model.generation_config.eos_token_id = []
    engine = build_engine(loaded, settings, max(levels), max_prompt_tokens)
    try:
        await engine.start()
        await run_engine(engine, conversations[:1], 2, PathResult("warm-up", 1))
        rendered: list[list[dict[str, str]]] = []
        if server is not None:
            # The chat messages the engine renders its prompts from (after its token budget), as the server gets them.
            rendered = [(await engine.prepare(messages, args.new_tokens)).messages for messages in conversations]
            await server.warm_up(rendered[0])
        for round_index in range(args.rounds):
            if baseline is not None and round_index > 0:
                await in_passing_thread(run_baseline, loaded, baseline_conversations, args.new_tokens, baseline)
            server_first = round_index % 2 == 1  # neither side always runs right after the other
            for n in levels:
                if server is not None and server_first:
                    await server.run(rendered[:n], server_results[n])
                await run_engine(engine, conversations[:n], args.new_tokens, engine_results[n])
                if server is not None and not server_first:
                    await server.run(rendered[:n], server_results[n])
        engine_peak = memory.peak_mib()
    finally:
        await engine.shutdown()
        loaded.model.generation_config.eos_token_id = eos_token_id

    baseline_summary = baseline.summary() if baseline is not None else None
    engine_rows, server_rows = [], []
    for n in levels:
        engine_results[n].peak_memory_mib = engine_peak
        row = engine_results[n].summary()
        if baseline_summary is not None:
            row["ratio_to_baseline"] = row["total_tok_s"] / baseline_summary["total_tok_s"]
        if server is not None:
            server_rows.append(server.row(server_results[n]))
            row["ratio_to_server"] = row["total_tok_s"] / server_rows[-1]["total_tok_s"]
            row["ttft_p50_ratio_to_server"] = row["ttft_p50_s"] / server_rows[-1]["ttft_p50_s"]
        engine_rows.append(row)
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "environment": environment(loaded, args.random_weights_config, engine.attention.describe()),
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "memory_kind": memory.kind,
        "baseline": baseline_summary,
        "engine": engine_rows,
        "server": None if server is None else server.report() | {"rows": server_rows},
    }


def _longest_prompt(loaded: LoadedModel, conversations: list[list[dict[str, str]]]) -> int:
    """The prompt budget: the longest rendered conversation, so the budget never trims one."""
    lengths = [
        len(
            loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        )
        for messages in conversations
    ]
    return max(64, max(lengths) + 16)


def bench_command(settings: Settings, args: argparse.Namespace, argv: Sequence[str]) -> None:
    """Run the benchmark and write `bench.json` and `bench.md` (the table for docs/benchmarks.md) to `--out`."""
    command = "llamacord " + shlex.join(argv)
    settings = settings.model_copy(update={"max_new_tokens": args.new_tokens})
    with tempfile.TemporaryDirectory(prefix="llamacord-bench-") as scratch:
        if args.random_weights_config:
            from benchmarks.random_llama import save_random_llama
            from bot.engine.local.loader import pick_device_and_dtype

            device, dtype = pick_device_and_dtype(settings.device, settings.dtype)
            corpus = [settings.system_prompt, *read_questions(args.prompts), "system user assistant"]
            directory = save_random_llama(
                args.random_weights_config, Path(scratch), corpus, device=str(device), dtype=dtype
            )
            settings = settings.model_copy(update={"model": str(directory)})
        report = asyncio.run(_bench(settings, args, command))
    write_report(args.out, "bench", report, markdown_table(report))


def write_report(out: Path, stem: str, report: dict[str, Any], table: str) -> None:
    """`<stem>.json` (every figure) and `<stem>.md` (the table for docs/benchmarks.md) in `out`; print the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / f"{stem}.md").write_text(table, encoding="utf-8")
    print(table)
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')}")


def concurrency_list(text: str) -> list[int]:
    """`1,8,32` → [1, 8, 32] (argparse type)."""
    try:
        levels = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers, got {text!r}") from None
    if not levels or levels[0] < 1:
        raise argparse.ArgumentTypeError("concurrency levels must be integers >= 1")
    return levels


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


EXAMPLE_URL = "http://127.0.0.1:8000/v1"


def base_url(text: str) -> str:
    """argparse type: an http(s) URL with a host, such as EXAMPLE_URL."""
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"expected a server's base URL such as {EXAMPLE_URL}, got {text!r}")
    return text.rstrip("/")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `bench` sub-command's options (`--model` is added by the CLI for every sub-command)."""
    parser.add_argument(
        "--concurrency", type=concurrency_list, default=[1, 8], help="conversations at once (default 1,8)"
    )
    parser.add_argument(
        "--new-tokens", type=positive_int, default=64, help="tokens generated per conversation (default 64)"
    )
    parser.add_argument("--prompts", type=Path, help="text file, one user message per line (default: 16 built in)")
    parser.add_argument(
        "--baseline", action=argparse.BooleanOptionalAction, default=True, help="run the pipeline baseline too"
    )
    parser.add_argument(
        "--baseline-requests",
        type=positive_int,
        help="conversations for the baseline (default: the largest concurrency)",
    )
    parser.add_argument(
        "--against",
        type=base_url,
        metavar="URL",
        help=f"also measure this OpenAI-compatible server (its base URL, e.g. {EXAMPLE_URL}), alternating with the "
        "engine at each concurrency",
    )
    parser.add_argument(
        "--against-model", metavar="NAME", help="the model to ask the server for (default: the first it lists)"
    )
    parser.add_argument(
        "--rounds", type=positive_int, default=1, help="alternate baseline, engine and server this many times"
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results/engine"), help="where bench.json/.md go")
    parser.add_argument("--device", help="override DEVICE (auto, cpu, cuda, cuda:N, mps)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="override DTYPE")
    parser.add_argument(
        "--random-weights-config",
        choices=["llama-3.2-1b", "tiny"],
        help="benchmark this architecture with random weights and an offline tokenizer instead of MODEL",
    )
