"""Observability end to end: `llamacord run`'s `serve` with METRICS_PORT set, against the fake Discord.

/healthz is 503 while the model loads and 200 once the gateway is connected and the engine alive; /metrics moves
with a real reply; the reply logs its one structured line, with no message text at INFO.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import discord
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bot import app
from bot.cogs.chat import error_kind
from bot.engine.errors import EngineBusyError, GenerationError, PromptError
from bot.logs import REPLY_LOGGER, LogfmtFormatter
from bot.metrics import HEALTH_PATH, METRICS_PATH, ErrorKind
from bot.settings import Settings
from tests.support.bot_harness import bot_settings, eventually, reply_done
from tests.support.fake_discord import FakeDiscord

TIMEOUT_S = 60.0  # loading the tiny model included
SECRET = "my locker code is swordfish"  # message text that must never reach an INFO log line
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=5)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(scrape: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float | None:
    return scrape.get((name, frozenset(labels.items())))


@contextmanager
def engine_held_back(monkeypatch: pytest.MonkeyPatch) -> Iterator[asyncio.Event]:
    """`serve` loads its engine only once the event is set, so the test can look at /healthz while it "loads"."""
    release = asyncio.Event()
    create_engine = app.create_engine

    async def held_back(settings: Settings) -> Any:
        await release.wait()
        return await create_engine(settings)

    monkeypatch.setattr(app, "create_engine", held_back)
    yield release


class Endpoint:
    def __init__(self, http: aiohttp.ClientSession, port: int) -> None:
        self.http, self.base = http, f"http://127.0.0.1:{port}"

    async def health(self) -> tuple[int, dict[str, Any]]:
        async with self.http.get(self.base + HEALTH_PATH) as response:
            return response.status, await response.json()

    async def scrape(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        async with self.http.get(self.base + METRICS_PATH) as response:
            assert response.status == 200
            return samples(await response.text())

    async def until(self, check: Callable[[], Any], what: str) -> Any:
        """Poll until `await check()` is truthy; connection errors (not serving yet) count as not yet."""

        async def attempt() -> Any:
            try:
                return await check()
            except aiohttp.ClientConnectionError:
                return None

        return await eventually(attempt, timeout_s=TIMEOUT_S, what=what)


async def test_metrics_and_health_follow_an_end_to_end_reply(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    port = free_port()
    async with FakeDiscord() as fake, aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
        settings = bot_settings(fake, tmp_path / "bot.sqlite3", model=str(tiny_model_dir), metrics_port=port)
        endpoint = Endpoint(http, port)
        with engine_held_back(monkeypatch) as release:
            task = asyncio.create_task(app.serve(settings))
            try:
                status, body = await endpoint.until(endpoint.health, "the metrics server")
                assert (status, body["engine_alive"], body["gateway_connected"]) == (503, False, False)
                assert value(await endpoint.scrape(), "llamacord_requests_waiting") is None, "no engine yet"

                release.set()
                await fake.wait_for_ready(timeout_s=TIMEOUT_S)

                async def healthy() -> dict[str, Any] | None:
                    status, body = await endpoint.health()
                    return body if status == 200 else None

                body = await endpoint.until(healthy, "/healthz to say healthy")
                assert body["gateway_connected"] is True and body["engine_alive"] is True

                before = await endpoint.scrape()
                assert value(before, "llamacord_max_batch_size") == settings.max_batch_size  # engine gauges wired
                sent = await fake.send_message(fake.alice, SECRET, mention_bot=True)
                await fake.wait_until(lambda: reply_done(fake, int(sent["id"])), timeout_s=TIMEOUT_S, what="a reply")

                async def moved() -> dict[tuple[str, frozenset[tuple[str, str]]], float] | None:
                    after = await endpoint.scrape()
                    return after if value(after, "llamacord_replies_total", outcome="completed") == 1 else None

                after = await endpoint.until(moved, "the reply to be counted")
                follow_up = await fake.send_message(fake.alice, "and another thing", mention_bot=True)
                await fake.wait_until(
                    lambda: reply_done(fake, int(follow_up["id"])), timeout_s=TIMEOUT_S, what="a second reply"
                )

                async def counted_twice() -> dict[tuple[str, frozenset[tuple[str, str]]], float] | None:
                    second = await endpoint.scrape()
                    return second if value(second, "llamacord_replies_total", outcome="completed") == 2 else None

                second = await endpoint.until(counted_twice, "the second reply to be counted")
            finally:
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await asyncio.wait_for(task, TIMEOUT_S)

    generated = value(after, "llamacord_generated_tokens_total")
    assert value(before, "llamacord_generated_tokens_total") == 0 and generated is not None and generated > 0
    assert value(after, "llamacord_prompt_tokens_total") > 0
    assert value(before, "llamacord_time_to_first_token_seconds_count") == 0
    assert value(after, "llamacord_time_to_first_token_seconds_count") == 1
    assert value(after, "llamacord_reply_duration_seconds_count") == 1
    assert all(value(after, "llamacord_errors_total", kind=kind) == 0 for kind in ErrorKind)

    # The second turn's prompt begins as the first one did: its cached pages are reused, and counted.
    assert value(after, "llamacord_prompt_tokens_cached_total") == 0
    cached = value(second, "llamacord_prompt_tokens_cached_total")
    assert cached is not None and cached > 0
    assert cached + value(second, "llamacord_prompt_tokens_computed_total") == value(
        second, "llamacord_prompt_tokens_total"
    )

    lines = [record for record in caplog.records if record.name == REPLY_LOGGER]
    assert len(lines) == 2, "one structured line per reply"
    assert (lines[0].cached_prompt_tokens, lines[1].cached_prompt_tokens) == (0, cached)
    line = lines[0]
    assert (line.getMessage(), line.levelno, line.channel, line.outcome) == (
        "reply",
        logging.INFO,
        fake.general_id,
        "completed",
    )
    assert line.generated_tokens == generated
    formatter = LogfmtFormatter()
    leaked = [
        formatter.format(r) for r in caplog.records if r.levelno >= logging.INFO and "swordfish" in formatter.format(r)
    ]
    assert leaked == [], "message text was logged at INFO or above"


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (EngineBusyError("busy"), ErrorKind.BUSY),
        (GenerationError("failed"), ErrorKind.GENERATION),
        (PromptError("too long"), ErrorKind.GENERATION),
        (discord.HTTPException(SimpleNamespace(status=500, reason="Server Error"), "boom"), ErrorKind.DISCORD),
        (ValueError("a bug"), ErrorKind.INTERNAL),
    ],
)
def test_errors_are_counted_by_kind(error: Exception, kind: ErrorKind) -> None:
    assert error_kind(error) is kind
