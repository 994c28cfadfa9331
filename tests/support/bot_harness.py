"""Running the real bot against the fake Discord: settings, engine doubles and waiting helpers for the e2e tests.

The engine doubles wrap the real `AsyncEngine`: `RecordingEngine` only records what the engine was asked (each
prompt's chat and budget, each stream), `ScriptedEngine` streams a fixed text instead of generating (for the
splitting, no-ping and error tests, where the text itself is under test).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from bot.app import discord_bot
from bot.client import LlamacordBot
from bot.engine.api import RequestMetrics
from bot.engine.local.executor import AsyncEngine
from bot.metrics import ErrorKind, Metrics, ReplyOutcome
from bot.settings import Settings
from storage import Store, StoredMessage, open_store
from tests.support.fake_discord import BOT_TOKEN, DEFAULT_TIMEOUT, FakeDiscord, FakeInteraction, FakeUser, running
from tests.support.tiny_model import load_lively_llama

EDIT_INTERVAL = 0.05  # seconds; the bot's EDIT_INTERVAL_SECONDS in these tests


def save_lively_llama(tiny_model_dir: Path, directory: Path) -> Path:
    """The tiny Llama with lively weights (`load_lively_llama`), saved as a model directory."""
    load_lively_llama(tiny_model_dir).save_pretrained(directory)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(directory)
    return directory


@asynccontextmanager
async def engine_on(**values: Any) -> AsyncIterator[AsyncEngine]:
    """A real engine on the CPU with these settings (and no .env), shut down at the end."""
    engine = await AsyncEngine.from_settings(Settings(_env_file=None, device="cpu", **values))  # type: ignore[call-arg]
    try:
        yield engine
    finally:
        await engine.shutdown()


def lively_engine(
    tiny_model_dir: Path, directory: Path, *, max_batch_size: int = 4, max_queued_requests: int = 4
) -> AbstractAsyncContextManager[AsyncEngine]:
    """A real engine on the lively tiny Llama, sized for the e2e tests (its cache fits a 1,500-token reply)."""
    return engine_on(
        model=str(save_lively_llama(tiny_model_dir, directory)),
        max_batch_size=max_batch_size,
        max_queued_requests=max_queued_requests,
        max_prompt_tokens=512,
        max_new_tokens=1500,
    )


def smollm2_engine(cache_dir: Path) -> AbstractAsyncContextManager[AsyncEngine]:
    """A real engine on SmolLM2-135M-Instruct (MODEL=smollm2, converted into `cache_dir`), sized for the bot tests."""
    return engine_on(
        model="smollm2",
        model_cache_dir=cache_dir,
        max_batch_size=2,
        max_queued_requests=2,
        max_prompt_tokens=1024,
        max_new_tokens=64,
    )


def bot_settings(fake: FakeDiscord, database: Path, model: str = "unused", **overrides: Any) -> Settings:
    """Settings pointing at the fake, ignoring any .env in the working directory."""
    values: dict[str, Any] = {
        "discord_token": BOT_TOKEN,
        "discord_api_base_url": fake.api_base_url,
        "discord_gateway_url": fake.gateway_url,
        "database_path": database,
        "model": model,
        "device": "cpu",
        "edit_interval_seconds": EDIT_INTERVAL,
        "max_new_tokens": 24,
        "max_prompt_tokens": 512,
        "max_batch_size": 4,
        "max_queued_requests": 4,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


class RecordingEngine:
    """The real engine, keeping what it was asked: each prompt's chat and token budget, the prompt it made, and each
    stream."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self.prepared: list[list[dict[str, str]]] = []
        self.max_new_tokens: list[int] = []
        self.prompts: list[Any] = []  # every Prompt prepare() returned
        self.streams: list[Any] = []  # every stream generate() returned

    async def prepare(self, messages: Sequence[dict[str, str]], max_new_tokens: int) -> Any:
        self.prepared.append([dict(message) for message in messages])
        self.max_new_tokens.append(max_new_tokens)
        prompt = await self._engine.prepare(messages, max_new_tokens)
        self.prompts.append(prompt)
        return prompt

    def generate(self, prompt: Any, params: Any) -> Any:
        stream = self._engine.generate(prompt, params)
        self.streams.append(stream)
        return stream

    def prompt_with(self, text: str) -> list[dict[str, str]]:
        """The chat of the last prompt whose newest message contains `text`."""
        return next(chat for chat in reversed(self.prepared) if text in chat[-1]["content"])

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


class ScriptedStream:
    """Yields a fixed text in pieces, with a pause between them, like a stream of deltas; `cancel` ends it."""

    def __init__(self, text: str, piece: int, pause_s: float) -> None:
        self.text, self.piece, self.pause_s = text, piece, pause_s
        self.cancelled = False
        self.yielded = 0  # characters handed out so far
        self.metrics = RequestMetrics()  # what the bot records for the reply; no tokens, no timings

    def __aiter__(self) -> AsyncIterator[str]:
        return self._deltas()

    async def _deltas(self) -> AsyncIterator[str]:
        while self.yielded < len(self.text) and not self.cancelled:
            delta = self.text[self.yielded : self.yielded + self.piece]
            self.yielded += len(delta)
            yield delta
            await asyncio.sleep(self.pause_s)

    async def cancel(self) -> None:
        self.cancelled = True


class ScriptedEngine(RecordingEngine):
    """Real prompts (`prepare`), but every reply is `text`, streamed `piece` characters at a time."""

    def __init__(self, engine: AsyncEngine, text: str, *, piece: int = 40, pause_s: float = 0.005) -> None:
        super().__init__(engine)
        self.text, self.piece, self.pause_s = text, piece, pause_s

    def generate(self, prompt: Any, params: Any) -> ScriptedStream:
        stream = ScriptedStream(self.text, self.piece, self.pause_s)
        self.streams.append(stream)
        return stream


class HeldStream(ScriptedStream):
    """A scripted stream that yields nothing until `release` is set, so its reply holds the channel's lock."""

    def __init__(self, text: str, release: asyncio.Event) -> None:
        super().__init__(text, piece=40, pause_s=0.005)
        self.release = release

    async def _deltas(self) -> AsyncIterator[str]:
        await self.release.wait()
        async for delta in super()._deltas():
            yield delta


class HeldEngine(ScriptedEngine):
    def __init__(self, engine: AsyncEngine, text: str) -> None:
        super().__init__(engine, text)
        self.release = asyncio.Event()

    def generate(self, prompt: Any, params: Any) -> HeldStream:
        stream = HeldStream(self.text, self.release)
        self.streams.append(stream)
        return stream


@dataclass
class RunningBot:
    """A bot connected to the fake, and what it was built from."""

    client: LlamacordBot
    store: Store
    engine: Any
    metrics: Metrics = field(default_factory=Metrics)


@asynccontextmanager
async def running_bot(
    settings: Settings, engine: Any, *, metrics: Metrics | None = None, **options: Any
) -> AsyncIterator[RunningBot]:
    """The bot SHARD_COUNT asks for, wired as `llamacord run` wires it, on its own store (settings.database_path),
    connected to the fake and ready. `options` go to discord.py's bot."""
    metrics = metrics if metrics is not None else Metrics()
    async with open_store(settings.database) as store:
        client = discord_bot(settings, store, engine, metrics, guild_ready_timeout=0.05, **options)
        async with running(client):
            yield RunningBot(client, store, engine, metrics)


async def eventually(
    predicate: Callable[[], Awaitable[Any]], *, timeout_s: float = DEFAULT_TIMEOUT, what: str = "condition"
) -> Any:
    """Poll an async predicate (the store, say, which the fake cannot watch) until it is truthy."""
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                result = await predicate()
                if result:
                    return result
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout_s}s waiting for {what}") from None


def counted(bot: RunningBot, metric: str, label: str, values: type[StrEnum]) -> dict[str, float]:
    samples = {value: bot.metrics.registry.get_sample_value(metric, {label: value}) for value in values}
    return {str(value): count for value, count in samples.items() if count}


def replies_counted(bot: RunningBot) -> dict[str, float]:
    """The bot's nonzero `llamacord_replies_total` by outcome."""
    return counted(bot, "llamacord_replies_total", "outcome", ReplyOutcome)


def errors_counted(bot: RunningBot) -> dict[str, float]:
    """The bot's nonzero `llamacord_errors_total` by kind."""
    return counted(bot, "llamacord_errors_total", "kind", ErrorKind)


async def counts_settle(bot: RunningBot, expected: dict[str, float]) -> None:
    """Wait for the replies counted by outcome to be `expected` (a reply is counted just after it is stored)."""

    async def settled() -> bool:
        return replies_counted(bot) == expected

    await eventually(settled, what=f"replies counted as {expected}, not {replies_counted(bot)}")


def reply_done(fake: FakeDiscord, message_id: int) -> list[dict[str, Any]] | None:
    """The bot's finished reply to a message (its messages, first to last), or None while it is still going.

    A reply is its first message (which replies to the user's) and the continuations after it, up to the next
    message that replies to something. Finished means none of them carries the Stop button (the last may carry
    Retry). (For a moment while
    a long reply moves the button to its next message, that is true too: `wait_for_reply` also waits for the
    stored answer.)
    """
    first = fake.replies_to(message_id)
    if not first:
        return None
    later = [m for m in fake.bot_messages(int(first[0]["channel_id"])) if int(m["id"]) > int(first[0]["id"])]
    messages = [first[0]]
    for message in later:
        if message.get("message_reference"):
            break
        messages.append(message)
    return None if any("Stop" in buttons(m) for m in messages) else messages


def buttons(message: dict[str, Any]) -> list[str]:
    """The labels of a message's buttons, as it stands on the fake (or as a body sent to it)."""
    return [
        component.get("label", "") for row in message.get("components") or [] for component in row.get("components", [])
    ]


async def wait_for_reply(
    fake: FakeDiscord, store: Store, message: dict[str, Any], *, timeout_s: float = DEFAULT_TIMEOUT
) -> tuple[list[dict[str, Any]], StoredMessage]:
    """Wait until the bot has answered `message` on Discord and stored the answer; return both."""
    message_id, channel_id = int(message["id"]), int(message["channel_id"])
    posted = await fake.wait_until(
        lambda: reply_done(fake, message_id), timeout_s=timeout_s, what=f"the reply to {message['content']!r}"
    )

    async def stored() -> StoredMessage | None:
        history = await store.load_history(channel_id, 1000)
        return next((m for m in history if m.message_id == int(posted[0]["id"])), None)

    answer = await eventually(stored, timeout_s=timeout_s, what="the stored reply")
    # Stored after the final edit, so the messages are final now (the button moves between messages on the way).
    final = reply_done(fake, message_id)
    assert final is not None
    return final, answer


def has_no_pings(body: dict[str, Any]) -> bool:
    mentions = body.get("allowed_mentions")
    return (
        mentions is not None
        and mentions.get("parse") == []
        and not mentions.get("users")
        and not mentions.get("roles")
        and not mentions.get("replied_user")
    )


def message_bodies(fake: FakeDiscord) -> list[tuple[str, dict[str, Any]]]:
    """(path, message body) of every REST call that posted or edited a message: channel messages, interaction
    responses with a message, follow-ups and @original edits."""
    bodies = []
    for call in fake.calls:
        if call.method in ("POST", "PATCH") and ("/messages" in call.path or call.path.startswith("/webhooks/")):
            bodies.append((call.path, call.json or {}))
        elif call.path.endswith("/callback") and (call.json or {}).get("type") in (4, 7):
            bodies.append((call.path, call.json.get("data") or {}))
    return bodies


def stop_button(fake: FakeDiscord, message: dict[str, Any]) -> tuple[int, str] | None:
    """The bot's message that carries the Stop button of its reply to `message` (the button moves to a long reply's
    newest message), and the button's custom id; None while there is none."""
    replies = fake.replies_to(int(message["id"]))
    if not replies:
        return None
    channel, first = int(replies[0]["channel_id"]), int(replies[0]["id"])
    reply = [replies[0]] + [
        m for m in fake.bot_messages(channel) if int(m["id"]) > first and not m.get("message_reference")
    ]
    for posted in reply:
        for row in posted.get("components") or []:
            for component in row.get("components", []):
                if component.get("label") == "Stop":
                    return int(posted["id"]), component["custom_id"]
    return None


async def press_stop(fake: FakeDiscord, message: dict[str, Any], user: FakeUser) -> FakeInteraction:
    """`user` presses Stop on the bot's reply to `message`, once the button is there."""
    message_id, custom_id = await fake.wait_until(lambda: stop_button(fake, message), what="the Stop button")
    return await fake.press_button(message_id, custom_id, user=user)
