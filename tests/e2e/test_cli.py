from __future__ import annotations

import asyncio
import io
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from bot.cli import main
from bot.engine.api import Engine
from bot.engine.errors import BUSY_MESSAGE, EngineBusyError
from bot.engine.sampling import SamplingParams
from bot.settings import Settings
from bot.terminal import TERMINAL_CHANNEL_ID, StdinLines, TerminalChat, start_engine
from storage import Role, Store, open_store
from tests.support.bot_harness import save_lively_llama

TIMEOUT = 60


def settings(model: Path | str, tmp_path: Path, **values: object) -> Settings:
    return Settings(  # type: ignore[call-arg]
        _env_file=None, model=str(model), database_path=tmp_path / "chat.sqlite3", device="cpu", **values
    )


def scripted(lines: Iterable[str]) -> tuple[list[str], object]:
    """A `read_line` that answers with `lines`, then end of input; it records the prompts it was shown."""
    pending = list(lines)
    prompts: list[str] = []

    async def read_line(prompt: str) -> str | None:
        prompts.append(prompt)
        return pending.pop(0) if pending else None

    return prompts, read_line


@pytest_asyncio.fixture(loop_scope="function")  # the engine must live on the test's own loop
async def engine_and_store(tiny_model_dir: Path, tmp_path: Path) -> AsyncIterator[tuple[Engine, Store, Settings]]:
    # Lively weights: the plain tiny model answers with blank lines, which are not stored as a reply.
    config = settings(
        save_lively_llama(tiny_model_dir, tmp_path / "lively"), tmp_path, temperature=0.0, max_new_tokens=24
    )
    engine = await asyncio.wait_for(start_engine(config), TIMEOUT)
    store = await open_store(config.database_path)
    try:
        yield engine, store, config
    finally:
        await asyncio.wait_for(engine.shutdown(), TIMEOUT)
        await store.close()


async def test_chat_commands_and_replies_are_stored_in_the_terminal_channel(
    engine_and_store: tuple[Engine, Store, Settings],
) -> None:
    engine, store, config = engine_and_store
    out = io.StringIO()
    session = TerminalChat(engine, store, config, out)
    prompts, read_line = scripted(
        ["hello there", "/system Be brief.", "/system", "/info", "/bogus", "/reset", "  ", " /not a command"]
    )

    await asyncio.wait_for(session.run(read_line), TIMEOUT)

    text = out.getvalue()
    assert len(prompts) == 9  # every line read, then end of input
    assert "System prompt: Be brief." in text
    assert f"vocab size:     {engine.info.vocab_size}" in text
    assert "Unknown command /bogus" in text
    assert "(forgot 2 messages)" in text
    history = await store.load_history(TERMINAL_CHANNEL_ID, 10)
    assert [(m.role, m.author_name) for m in history] == [(Role.USER, session.speaker.name), (Role.ASSISTANT, None)]
    assert history[0].content == "/not a command"
    assert history[1].content and history[1].content + "\n" in text  # what was streamed is what was stored
    assert (await store.get_channel_settings(TERMINAL_CHANNEL_ID)).system_prompt == "Be brief."

    again = io.StringIO()  # a later `llamacord chat` goes on with the stored conversation
    await asyncio.wait_for(TerminalChat(engine, store, config, again).run(scripted([])[1]), TIMEOUT)
    assert "continuing a conversation of 2 messages" in again.getvalue()


class Watching:
    """The engine, recording each request's chat and sampling; while `busy`, it refuses requests as a full one does."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.busy = False
        self.chats: list[list[dict[str, str]]] = []
        self.params: list[SamplingParams] = []

    async def prepare(self, messages: Any, max_new_tokens: int) -> Any:
        self.chats.append([dict(message) for message in messages])
        return await self._engine.prepare(messages, max_new_tokens)

    def generate(self, prompt: Any, params: SamplingParams) -> Any:
        if self.busy:
            raise EngineBusyError()
        self.params.append(params)
        return self._engine.generate(prompt, params)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


async def test_the_terminal_follows_the_channel_config_and_stores_a_line_once_accepted(
    engine_and_store: tuple[Engine, Store, Settings],
) -> None:
    engine, store, config = engine_and_store
    await store.update_channel_settings(
        TERMINAL_CHANNEL_ID, changed_by=None, system_prompt="Answer in French.", temperature=1.5, max_new_tokens=5
    )
    watching = Watching(engine)
    out = io.StringIO()
    session = TerminalChat(watching, store, config, out)  # type: ignore[arg-type]
    await asyncio.wait_for(session.run(scripted(["bonjour"])[1]), TIMEOUT)
    assert watching.chats[0][0] == {"role": "system", "content": "Answer in French."}
    assert watching.params == [SamplingParams(temperature=1.5, top_p=config.top_p, max_new_tokens=5)]

    watching.busy = True
    await asyncio.wait_for(session.run(scripted(["are you there?"])[1]), TIMEOUT)
    assert BUSY_MESSAGE in out.getvalue()
    history = await store.load_history(TERMINAL_CHANNEL_ID, 10)
    assert [m.content for m in history if m.role is Role.USER] == ["bonjour"], "a refused line was stored"


async def test_interrupting_a_reply_keeps_the_session_and_stores_what_was_shown(
    engine_and_store: tuple[Engine, Store, Settings],
) -> None:
    engine, store, config = engine_and_store
    config = config.model_copy(update={"max_new_tokens": 500})
    armed = False

    class InterruptOnFirstDelta(io.StringIO):
        def write(self, text: str) -> int:
            nonlocal armed
            written = super().write(text)
            if armed:
                armed = False
                assert session.interrupt()
            return written

    out = InterruptOnFirstDelta()
    session = TerminalChat(engine, store, config, out)
    lines = iter(["tell me a long story", "/quit"])

    async def read_line(prompt: str) -> str | None:
        nonlocal armed
        line = next(lines)
        armed = line == "tell me a long story"
        return line

    await asyncio.wait_for(session.run(read_line), TIMEOUT)

    assert "(stopped)" in out.getvalue()
    assert not session.interrupt()  # nothing streams now
    reply = (await store.load_history(TERMINAL_CHANNEL_ID, 10))[-1]
    assert reply.role is Role.ASSISTANT
    assert 0 < len(engine.tokenize(reply.content)) < 500
    assert engine.stats().running == engine.stats().waiting == 0


async def test_stdin_lines_splits_lines_and_ends_at_eof() -> None:
    read_fd, write_fd = os.pipe()
    os.write(write_fd, "first\r\nsécond 🦙\nlast without newline".encode())
    os.close(write_fd)
    out = io.StringIO()
    read_line = StdinLines(out, read_fd)
    try:
        lines = [await asyncio.wait_for(read_line(f"{n}> "), TIMEOUT) for n in range(4)]
    finally:
        os.close(read_fd)
    assert lines == ["first", "sécond 🦙", "last without newline", None]
    assert out.getvalue() == "0> 1> 2> 3> "


def test_ask_prints_one_answer(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MAX_NEW_TOKENS", "8")
    main(["ask", "--model", str(tiny_model_dir), "What is the capital of France?"])
    answer = capsys.readouterr().out
    assert answer.endswith("\n") and answer.strip()
    assert not (tmp_path / "llamacord.sqlite3").exists()  # no history


def test_info_prints_the_model_info(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    main(["info", "--model", str(tiny_model_dir)])
    text = capsys.readouterr().out
    from transformers import AutoModelForCausalLM

    parameters = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    assert f"({parameters:,})" in text
    assert "architecture:   LlamaForCausalLM" in text
    # The cache `llamacord chat` uses (a batch of one): at most four full batches of the longest requests.
    assert "kv cache:       8,192 tokens in 512 pages of 16 (0.00 GiB): 4 conversations of 2,048 tokens" in text


def test_a_model_that_cannot_load_exits_with_the_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for command in (["info"], ["ask", "hi"]):
        with pytest.raises(SystemExit, match=re.escape("Cannot load the model: MODEL=./missing does not exist")):
            main([command[0], "--model", "./missing", *command[1:]])


def test_ask_refuses_an_empty_question(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="empty"):
        main(["ask", "--model", "./never-loaded", "   "])


def cli_env(tmp_path: Path, **values: str) -> dict[str, str]:
    """The environment minus llamacord settings, offline, with a database of the test's own."""
    env = {name: value for name, value in os.environ.items() if name.lower() not in Settings.model_fields}
    return (
        env | {"HF_HUB_OFFLINE": "1", "DATABASE_PATH": str(tmp_path / "chat.sqlite3"), "LOG_LEVEL": "WARNING"} | values
    )


def run_cli(args: list[str], tmp_path: Path, stdin: str = "", **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bot", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=cli_env(tmp_path, **env),
        timeout=TIMEOUT * 2,
        check=False,
    )


def test_ctrl_c_at_the_prompt_quits_chat_cleanly(tiny_model_dir: Path, tmp_path: Path) -> None:
    stderr = tmp_path / "stderr.txt"
    model = save_lively_llama(tiny_model_dir, tmp_path / "lively")  # answers with text, so the reply is stored
    with stderr.open("w") as errors:  # a file, not a pipe: a full pipe would block the process
        process = subprocess.Popen(
            [sys.executable, "-m", "bot", "chat", "--model", str(model)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
            cwd=tmp_path,
            env=cli_env(tmp_path, TEMPERATURE="0", MAX_NEW_TOKENS="4"),
        )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()  # type: ignore[union-attr]
    try:
        assert process.stdin is not None
        process.stdin.write("hello\n/info\n")  # /info answers only after the reply is done
        process.stdin.flush()
        while "vocab size" not in lines.get(timeout=TIMEOUT):
            pass
        process.send_signal(signal.SIGINT)  # stdin stays open: the prompt is waiting for a line
        assert process.wait(timeout=TIMEOUT) == 0
    finally:
        process.kill()
    assert "Traceback" not in stderr.read_text()

    async def stored() -> list[Role]:
        async with open_store(tmp_path / "chat.sqlite3") as store:
            return [message.role for message in await store.load_history(TERMINAL_CHANNEL_ID, 10)]

    assert asyncio.run(stored()) == [Role.USER, Role.ASSISTANT]


@pytest.mark.smollm2
def test_info_smollm2_prints_about_135m_parameters_and_its_vocab(smollm2_cache_dir: Path, tmp_path: Path) -> None:
    result = run_cli(["info", "--model", "smollm2"], tmp_path, MODEL_CACHE_DIR=str(smollm2_cache_dir))
    assert result.returncode == 0, result.stderr
    millions = float(re.search(r"parameters:\s+([\d.]+)M", result.stdout).group(1))  # type: ignore[union-attr]
    assert 130 < millions < 140
    assert re.search(r"vocab size:\s+49152\b", result.stdout)


@pytest.mark.smollm2
def test_ask_smollm2_knows_the_capital_of_france(smollm2_cache_dir: Path, tmp_path: Path) -> None:
    result = run_cli(
        ["ask", "--model", "smollm2", "What is the capital of France?"],
        tmp_path,
        MODEL_CACHE_DIR=str(smollm2_cache_dir),
        TEMPERATURE="0",
        MAX_NEW_TOKENS="48",
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
