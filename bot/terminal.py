"""`llamacord chat`, `ask` and `info`: the model in a terminal, on the same engine and store as the bot.

`chat` answers through the same turn pipeline as Discord and keeps its conversation in the bot's database as a
channel of its own (`TERMINAL_CHANNEL_ID`), so it survives restarts, follows that channel's system prompt and
sampling settings, and `/reset` works as in Discord. Lines are read in a daemon thread: the loop keeps streaming
tokens meanwhile. Ctrl-C stops a reply (as the Stop button does); at the prompt, Ctrl-C or Ctrl-D quits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import logging
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import TextIO

from bot.chat.conversation import build_chat
from bot.chat.pipeline import Reply, Speaker, TurnPipeline, UserTurn, waiting_text
from bot.engine.api import Engine
from bot.engine.backend import create_engine
from bot.engine.errors import EngineError, ModelLoadError
from bot.engine.sampling import SamplingParams
from bot.logs import configure_logging
from bot.metrics import Metrics
from bot.settings import Settings
from storage import Role, Store, StoreError, open_store

log = logging.getLogger(__name__)

# Discord ids are never 0, so the terminal's conversation cannot collide with a Discord channel's.
TERMINAL_CHANNEL_ID = 0
PROMPT = "> "
HELP = (
    "Commands: /reset (forget this conversation), /system TEXT (set the system prompt; /system alone shows it), "
    "/info (model and tokenizer), /quit. Start a line with a space to send text that begins with '/'."
)

ReadLine = Callable[[str], Awaitable[str | None]]  # shows a prompt, returns the line, or None at end of input


def chat_command(settings: Settings, args: argparse.Namespace) -> None:
    configure_logging(settings.log_level, secrets=settings.secret_values())
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_chat(settings))


def ask_command(settings: Settings, args: argparse.Namespace) -> None:
    question = args.question.strip()
    if not question:
        sys.exit("llamacord ask: the question is empty.")
    configure_logging(settings.log_level, secrets=settings.secret_values())
    try:
        asyncio.run(_ask(settings, question, sys.stdout))
    except KeyboardInterrupt:
        sys.exit(130)  # a script must not take a cut-off answer for a whole one


def info_command(settings: Settings, args: argparse.Namespace) -> None:
    configure_logging(settings.log_level, secrets=settings.secret_values())
    asyncio.run(_info(settings, sys.stdout))


async def start_engine(settings: Settings) -> Engine:
    """The BACKEND's engine, sized for one person: a batch of one, so a local KV cache holds one conversation."""
    try:
        return await create_engine(settings.model_copy(update={"max_batch_size": 1}))
    except ModelLoadError as error:
        raise SystemExit(f"Cannot load the model: {error}") from None


async def _ask(settings: Settings, question: str, out: TextIO) -> None:
    engine = await start_engine(settings)
    try:
        chat = [*build_chat(settings.system_prompt, []), {"role": Role.USER.value, "content": question}]
        prompt = await engine.prepare(chat, settings.max_new_tokens)
        async for delta in engine.generate(prompt, SamplingParams.from_settings(settings)):
            out.write(delta)
            out.flush()
        out.write("\n")
    except EngineError as error:
        log.exception("llamacord ask failed")
        raise SystemExit(f"llamacord ask: {error}") from None
    finally:
        await engine.shutdown()


async def _info(settings: Settings, out: TextIO) -> None:
    engine = await start_engine(settings)
    try:
        out.write("\n".join(engine.info.lines()) + "\n")
    finally:
        await engine.shutdown()


async def _chat(settings: Settings) -> None:
    try:
        store = await open_store(settings.database)
    except StoreError as error:
        raise SystemExit(f"Cannot use the database: {error}") from None
    try:
        engine = await start_engine(settings)
        try:
            session = TerminalChat(engine, store, settings, sys.stdout)
            main = asyncio.current_task()
            loop = asyncio.get_running_loop()

            def on_interrupt() -> None:
                if not session.interrupt() and main is not None:
                    main.cancel()

            with contextlib.suppress(NotImplementedError):  # no loop signal handlers on Windows: Ctrl-C quits
                loop.add_signal_handler(signal.SIGINT, on_interrupt)
            try:
                await session.run(StdinLines(sys.stdout))
            except asyncio.CancelledError:
                sys.stdout.write("\n")
            finally:
                with contextlib.suppress(NotImplementedError):
                    loop.remove_signal_handler(signal.SIGINT)
        finally:
            await engine.shutdown()
    finally:
        await store.close()


class StdinLines:
    """A `ReadLine` on standard input, read in a daemon thread so the loop keeps streaming meanwhile.

    It reads the file descriptor with `os.read`, not `input()`: a daemon thread blocked in `input()` holds the
    lock of `sys.stdin`'s buffer, and the interpreter aborts at exit when it cannot take that lock (Ctrl-C at the
    prompt). A blocked `os.read` holds no lock, so quitting never waits for Enter and never crashes.
    """

    def __init__(self, out: TextIO, fd: int | None = None) -> None:
        self._out = out
        self._fd = sys.stdin.fileno() if fd is None else fd
        self._encoding = sys.stdin.encoding or "utf-8"
        self._pending = b""

    async def __call__(self, prompt: str) -> str | None:
        self._out.write(prompt)
        self._out.flush()
        loop = asyncio.get_running_loop()
        line: asyncio.Future[str | None] = loop.create_future()

        def settle(value: str | None, error: BaseException | None) -> None:
            if line.done():
                return
            if error is None:
                line.set_result(value)
            else:
                line.set_exception(error)

        def read() -> None:
            try:
                value, error = self._read_line(), None
            except OSError as failure:  # a closed or unreadable stdin
                value, error = None, failure
            loop.call_soon_threadsafe(settle, value, error)

        threading.Thread(target=read, name="llamacord-stdin", daemon=True).start()
        return await line

    def _read_line(self) -> str | None:
        """The next line without its line break; a last line without one; None at end of input."""
        while b"\n" not in self._pending:
            chunk = os.read(self._fd, 4096)
            if not chunk:
                rest, self._pending = self._pending, b""
                return rest.decode(self._encoding, errors="replace") if rest else None
            self._pending += chunk
        raw, _, self._pending = self._pending.partition(b"\n")
        return raw.decode(self._encoding, errors="replace").removesuffix("\r")


class TerminalView:
    """A reply printed as it streams (`bot.chat.pipeline.ReplyView`)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.printed = 0  # characters of the reply already written

    def preparing(self) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()

    async def waiting(self, ahead: int) -> None:
        self.out.write(waiting_text(ahead) + "\n")
        self.out.flush()

    async def show(self, text: str) -> None:
        self.out.write(text[self.printed :])
        self.out.flush()
        self.printed = len(text)

    async def finish(self, text: str, *, retry: bool) -> list[int]:
        await self.show(text)
        self.out.write("\n")
        self.out.flush()
        return []

    async def abandon(self, text: str) -> None:
        if self.printed:
            self.out.write("\n")
            self.out.flush()


class TerminalChat:
    """The chat loop: commands, and one streamed reply per line through the same turn pipeline as Discord, on a
    channel of its own (`TERMINAL_CHANNEL_ID`)."""

    def __init__(self, engine: Engine, store: Store, settings: Settings, out: TextIO) -> None:
        self.engine = engine
        self.store = store
        self.settings = settings
        self.out = out
        self.pipeline = TurnPipeline(store, engine, settings, Metrics())
        self.speaker = Speaker(name=_user_name())
        self._reply: Reply | None = None
        self._stopping: set[asyncio.Task[None]] = set()

    def interrupt(self) -> bool:
        """Stop the reply being streamed, as Discord's Stop button does; False when none is (the caller then
        quits)."""
        if self._reply is None:
            return False
        task = asyncio.get_running_loop().create_task(self._reply.stop())
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)
        return True

    async def run(self, read_line: ReadLine) -> None:
        earlier = len(await self.store.load_history(TERMINAL_CHANNEL_ID, self.settings.history_limit))
        self._say(f"Chatting with {self.engine.info.source}. {HELP}")
        if earlier:
            self._say(f"(continuing a conversation of {earlier} messages; /reset starts over)")
        while True:
            line = await read_line(PROMPT)
            if line is None:
                self._say("")
                return
            try:
                if line.startswith("/"):
                    if not await self._command(line):
                        return
                elif line.strip():
                    await self._answer(line.strip())
            except (EngineError, StoreError) as error:
                log.exception("terminal reply failed")
                self._say(f"(error: {error})")

    async def _command(self, line: str) -> bool:
        """Run a slash command; False means quit."""
        name, _, argument = line.partition(" ")
        argument = argument.strip()
        if name in ("/quit", "/exit"):
            return False
        if name == "/reset":
            cleared = await self.store.reset(TERMINAL_CHANNEL_ID)
            self._say(f"(forgot {cleared} messages)")
        elif name == "/system" and argument:
            await self.pipeline.configs.update(TERMINAL_CHANNEL_ID, changed_by=None, system_prompt=argument)
            self._say("(system prompt set)")
        elif name == "/system":
            self._say(f"System prompt: {(await self.pipeline.config(TERMINAL_CHANNEL_ID)).system_prompt}")
        elif name == "/info":
            self._say("\n".join(self.engine.info.lines()))
        elif name == "/help":
            self._say(HELP)
        else:
            self._say(f"Unknown command {name}. {HELP}")
        return True

    async def _answer(self, text: str) -> None:
        """Answer one line through the turn pipeline; Ctrl-C meanwhile stops the reply."""

        def view(reply: Reply) -> TerminalView:
            self._reply = reply
            return TerminalView(self.out)

        try:
            await self.pipeline.answer(UserTurn(TERMINAL_CHANNEL_ID, text, self.speaker), view)
        finally:
            self._reply = None

    def _say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()


def _user_name() -> str:
    """The speaker's name in the prompt ("alice: hi"), as a Discord display name would be."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "user"
