"""The `llamacord` command line: one sub-command per way of running the bot.

Each sub-command's work lives in its own module and is imported lazily, so `llamacord --help` stays instant and
does not import torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from bot import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llamacord", description="Serve an open LLM (Llama 3.2 by default) to Discord, or chat with it here."
    )
    parser.add_argument("--version", action="version", version=f"llamacord {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--model", help="override the MODEL setting (hub id, directory, .gguf file or 'smollm2')")
        return sub

    add("run", "connect to Discord and serve every channel")
    add("chat", "chat in the terminal on the same engine and history (/reset, /system TEXT, /info, /quit)")
    ask = add("ask", "print one answer to a question, for scripts")
    ask.add_argument("question", help="the question to answer")
    add("info", "print the model and tokenizer info")
    from benchmarks.bench import add_arguments as add_bench_arguments  # stdlib-only at import: --help stays instant

    add_bench_arguments(add("bench", "measure the engine against the seed's pipeline, or an OpenAI-compatible server"))
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from bot.settings import load_settings

    overrides = {"model": args.model} if args.model else {}
    overrides |= {name: getattr(args, name) for name in ("device", "dtype") if getattr(args, name, None)}
    settings = load_settings(**overrides)
    if args.command == "run":
        from bot.app import run_bot

        run_bot(settings)
    elif args.command in {"chat", "ask", "info"}:
        from bot import terminal

        getattr(terminal, f"{args.command}_command")(settings, args)
    elif args.command == "bench":
        from benchmarks.bench import bench_command

        bench_command(settings, args, sys.argv[1:] if argv is None else list(argv))
    else:
        sys.exit(f"unknown command {args.command!r}")
