"""Secrets and content stay out of the logs: `llamacord run` at LOG_LEVEL=DEBUG, BACKEND=openai against the real
`transformers serve` with a password in OPENAI_BASE_URL, on the fake Discord. A message and /info later, its log
holds no bot token, interaction token, password or API key at any level, and no message text above DEBUG.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from bot.settings import Settings
from tests.support.bot_harness import eventually, reply_done
from tests.support.fake_discord import FakeDiscord
from tests.support.openai_server import OpenAIServer

TIMEOUT_S = 90.0  # the bot's start (transformers' import included) on a busy machine
BOT_TOKEN = "MTIzNDU2Nzg5MDEyMzQ1Njc4.GabcDE.e2e-bot-token-0123456789abcdef"
PASSWORD = "hunter2-e2e-password"
API_KEY = "sk-e2e-api-key-0123456789"
SECRET_TEXT = "my locker code is swordfish"  # message text: at DEBUG only
LEVEL = re.compile(r"^time=\S+ level=(\w+) ")


async def test_a_debug_run_logs_no_secret_and_no_message_text_above_debug(
    openai_server: OpenAIServer, tmp_path: Path
) -> None:
    log_path = tmp_path / "bot.log"
    async with FakeDiscord() as fake:
        fake.token = BOT_TOKEN
        with log_path.open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bot",
                "run",
                cwd=tmp_path,
                env=bot_environment(fake, openai_server, tmp_path),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            await fake.wait_for_ready(timeout_s=TIMEOUT_S)
            sent = await fake.send_message(fake.alice, SECRET_TEXT, mention_bot=True)
            await fake.wait_until(lambda: reply_done(fake, int(sent["id"])), timeout_s=TIMEOUT_S, what="a reply")
            interaction = await fake.slash("info", user=fake.alice)
            info = (await fake.wait_for_response(interaction, timeout_s=TIMEOUT_S))["embeds"][0]["description"]
            await logged(log_path, f"/interactions/{interaction.id}/")  # discord.py logs the call once answered
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.wait(), TIMEOUT_S)

    assert openai_server.base_url in info and PASSWORD not in info
    text = log_path.read_text(encoding="utf-8", errors="replace")
    # The run logged what the checks look for: the interaction's callback URL, and the message at DEBUG.
    assert f"/interactions/{interaction.id}/[redacted]/callback" in text
    lines = text.splitlines()
    levels = [match[1] if (match := LEVEL.match(line)) else "(not a log record)" for line in lines]
    assert any(level == "debug" and SECRET_TEXT in line for line, level in zip(lines, levels, strict=True))

    for secret in (BOT_TOKEN, interaction.token, PASSWORD, API_KEY):
        assert secret not in text, f"{secret!r} is in the log"
    above_debug = [line for line, level in zip(lines, levels, strict=True) if level != "debug" and "swordfish" in line]
    assert above_debug == [], "message text was logged above DEBUG"


async def logged(log_path: Path, text: str) -> None:
    """Wait until the bot's log holds `text`."""

    async def found() -> bool:
        return text in await asyncio.to_thread(log_path.read_text, encoding="utf-8", errors="replace")

    await eventually(found, timeout_s=TIMEOUT_S, what=f"{text!r} in the log")


def bot_environment(fake: FakeDiscord, server: OpenAIServer, tmp_path: Path) -> dict[str, str]:
    """`llamacord run`'s environment: no setting inherited, the fake Discord, the server with a password."""
    env = {key: value for key, value in os.environ.items() if key.lower() not in Settings.model_fields}
    env.update(
        DISCORD_TOKEN=BOT_TOKEN,
        DISCORD_API_BASE_URL=fake.api_base_url,
        DISCORD_GATEWAY_URL=fake.gateway_url,
        DATABASE_PATH=str(tmp_path / "bot.sqlite3"),
        BACKEND="openai",
        OPENAI_BASE_URL=server.base_url.replace("http://", f"http://llamacord:{PASSWORD}@"),
        OPENAI_API_KEY=API_KEY,
        OPENAI_MODEL=server.model,
        MAX_NEW_TOKENS="8",
        EDIT_INTERVAL_SECONDS="0.05",
        LOG_LEVEL="DEBUG",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env
