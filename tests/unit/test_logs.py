"""Logging: LOG_LEVEL is obeyed, every record is one parseable logfmt line, and the reply line's fields."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from bot.engine.api import FinishReason, RequestMetrics
from bot.logs import REPLY_LOGGER, LogfmtFormatter, configure_logging, log_reply, tokens_per_second
from bot.settings import Settings

CHATTY = ("httpx", "httpx2")  # huggingface_hub's client, and the OpenAI client's
BOT_TOKEN = "MTIzNDU2Nzg5MDEyMzQ1Njc4.GabcDE.bot-token-secret-part-0123456789"
INTERACTION_TOKEN = "aW50ZXJhY3Rpb246MTIzNDU2Nzg5MDEyMzQ1Njc4OnNlY3JldA"
PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|[^\s"]*)(?:\s|$)')


REQUEST = RequestMetrics(
    queue_wait_s=0.0123456,
    ttft_s=0.5,
    prompt_tokens=412,
    cached_prompt_tokens=384,
    generated_tokens=11,
    total_s=2.5,
    finish_reason=FinishReason.STOP,
)


def request(**changes: object) -> RequestMetrics:
    return dataclasses.replace(REQUEST, **changes)  # type: ignore[arg-type]


def parse_line(line: str) -> dict[str, str]:
    """A strict logfmt parser: the whole line must be key=value pairs."""
    assert "\n" not in line
    fields: dict[str, str] = {}
    position = 0
    while position < len(line):
        match = PAIR.match(line, position)
        assert match, f"not logfmt at {line[position:]!r}"
        key, raw = match.groups()
        fields[key] = json.loads(raw) if raw.startswith('"') else raw
        position = match.end()
    return fields


@contextmanager
def restored_logging() -> Iterator[None]:
    """The root logger's level and handlers, and the chatty loggers' levels, as they were before."""
    root = logging.getLogger()
    saved_level, saved_handlers = root.level, list(root.handlers)
    chatty_levels = {name: logging.getLogger(name).level for name in CHATTY}
    try:
        yield
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        for name, level in chatty_levels.items():
            logging.getLogger(name).setLevel(level)


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """Logging configured into a buffer at INFO."""
    stream = io.StringIO()
    with restored_logging():
        configure_logging("INFO", stream)
        yield stream


@pytest.fixture
def captured_debug() -> Iterator[io.StringIO]:
    """Logging configured into a buffer at DEBUG, knowing the bot token as a secret."""
    stream = io.StringIO()
    with restored_logging():
        configure_logging("DEBUG", stream, secrets=[BOT_TOKEN, ""])  # an empty secret must redact nothing
        yield stream


def lines(stream: io.StringIO) -> list[dict[str, str]]:
    return [parse_line(line) for line in stream.getvalue().splitlines()]


def test_reply_line_has_the_fields_and_no_others(captured: io.StringIO) -> None:
    log_reply(123456789012345678, request(), "completed")

    [line] = lines(captured)
    assert line.pop("time")
    assert line == {
        "level": "info",
        "logger": REPLY_LOGGER,
        "msg": "reply",
        "channel": "123456789012345678",
        "outcome": "completed",
        "finish_reason": "stop",
        "queue_wait_s": "0.012",
        "prompt_tokens": "412",
        "cached_prompt_tokens": "384",
        "generated_tokens": "11",
        "ttft_s": "0.5",
        "total_s": "2.5",
        "tokens_per_s": "5.0",  # 10 tokens after the first, in the 2 s after it
    }


def test_reply_line_without_tokens_keeps_every_key(captured: io.StringIO) -> None:
    log_reply(1, request(ttft_s=None, generated_tokens=0, finish_reason=None), "cancelled")

    [line] = lines(captured)
    assert line["ttft_s"] == ""
    assert line["tokens_per_s"] == ""
    assert line["finish_reason"] == ""
    assert line["outcome"] == "cancelled"


@pytest.mark.parametrize(
    ("request_metrics", "expected"),
    [
        (request(ttft_s=0.5, total_s=2.5, generated_tokens=11), 5.0),
        (request(ttft_s=0.1, total_s=0.6, generated_tokens=2), 2.0),
        (request(generated_tokens=1), None),  # one token: no interval to measure
        (request(ttft_s=None), None),
        (request(ttft_s=1.0, total_s=1.0), None),  # all tokens in one step
    ],
)
def test_tokens_per_second_is_decode_speed(request_metrics: RequestMetrics, expected: float | None) -> None:
    assert tokens_per_second(request_metrics) == expected


def test_log_level_is_obeyed() -> None:
    stream = io.StringIO()
    with restored_logging():
        configure_logging(Settings(_env_file=None, log_level="warning").log_level, stream)
        logging.getLogger("bot.test").info("hidden")
        logging.getLogger("bot.test").warning("shown")
        assert logging.getLogger().level == logging.WARNING
        configure_logging("DEBUG", stream)
        logging.getLogger("bot.test").debug("now shown")

    assert [line["msg"] for line in lines(stream)] == ["shown", "now shown"]


def test_reconfiguring_replaces_only_its_own_handler(captured: io.StringIO) -> None:
    root = logging.getLogger()
    foreign = logging.NullHandler()
    root.addHandler(foreign)
    try:
        configure_logging("INFO", captured)
        logging.getLogger("bot.test").info("once")
        assert foreign in root.handlers
    finally:
        root.removeHandler(foreign)

    assert [line["msg"] for line in lines(captured)] == ["once"]


@pytest.mark.parametrize("name", CHATTY)
def test_http_request_chatter_is_quiet_at_info(captured: io.StringIO, name: str) -> None:
    logging.getLogger(name).info('HTTP Request: GET https://huggingface.co/x "HTTP/1.1 200 OK"')
    logging.getLogger(name).warning("retrying")

    assert [line["msg"] for line in lines(captured)] == ["retrying"]


def test_awkward_values_stay_on_one_parseable_line(captured: io.StringIO) -> None:
    hostile = 'two\nlines msg=forged "quoted" back\\slash'
    logging.getLogger("bot.test").warning("user %s said hi", "Zoë Ω", extra={"author": hostile, "empty": ""})
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("bot.test").exception("failed")

    first, second = lines(captured)
    assert first["msg"] == "user Zoë Ω said hi"
    assert first["author"] == hostile
    assert first["empty"] == ""
    assert second["msg"] == "failed"
    assert second["exc"].startswith("Traceback (most recent call last):")
    assert second["exc"].endswith("ValueError: boom")


def test_extra_fields_cannot_overwrite_the_core_ones() -> None:
    record = logging.makeLogRecord({"name": "bot.test", "levelno": logging.INFO, "levelname": "INFO", "msg": "hi"})
    record.level = "forged"

    fields = parse_line(LogfmtFormatter().format(record))
    assert fields["level"] == "info"


def test_continuous_batching_logs_come_out_in_our_format_and_level(captured: io.StringIO) -> None:
    from transformers.generation.continuous_batching.utils import logger as cb_logger

    cb_logger.info("Paged cache initialized")
    cb_logger.warning("cache nearly full")

    assert [(line["logger"], line["msg"]) for line in lines(captured)] == [
        ("ContinuousBatchingLogger", "cache nearly full")
    ]


def test_interaction_tokens_are_redacted_even_at_debug(captured_debug: io.StringIO) -> None:
    """What discord.py logs at DEBUG: the interaction callback and webhook URLs, and the gateway's events."""
    http, gateway = logging.getLogger("discord.http"), logging.getLogger("discord.gateway")
    callback = f"https://discord.com/api/v10/interactions/1234/{INTERACTION_TOKEN}/callback?with_response=true"
    http.debug("%s %s with %s has returned %s", "POST", callback, '{"type": 4}', 204)
    http.debug(
        "PATCH https://discord.com/api/v10/webhooks/99/%s/messages/@original has returned 200", INTERACTION_TOKEN
    )
    event = {"t": "INTERACTION_CREATE", "op": 0, "d": {"id": "1234", "token": INTERACTION_TOKEN, "type": 2}}
    gateway.debug("For Shard ID %s: WebSocket Event: %s", None, event)
    gateway.debug("received %s", json.dumps(event))

    text = captured_debug.getvalue()
    assert INTERACTION_TOKEN not in text
    assert [line["msg"].count("[redacted]") for line in lines(captured_debug)] == [1, 1, 1, 1]
    assert "/interactions/1234/[redacted]/callback" in text and "/webhooks/99/[redacted]/messages/@original" in text


def test_secrets_are_redacted_from_arguments_fields_and_tracebacks(captured_debug: io.StringIO) -> None:
    log = logging.getLogger("bot.test")
    log.debug("identify with %s", {"token": BOT_TOKEN}, extra={"header": f"Bot {BOT_TOKEN}"})
    try:
        raise RuntimeError(f"login failed for {BOT_TOKEN} at http://llamacord:hunter2@127.0.0.1:8000/v1?key=k")
    except RuntimeError:
        log.exception("start-up failed")
    log.warning("cannot reach %s", "http://llamacord:hunter2@127.0.0.1:8000/v1?key=k")

    text = captured_debug.getvalue()
    assert BOT_TOKEN not in text and "hunter2" not in text and "key=k" not in text
    identify, failed, warned = lines(captured_debug)
    assert identify["header"] == "Bot [redacted]"
    assert failed["exc"].endswith("RuntimeError: login failed for [redacted] at http://127.0.0.1:8000/v1")
    assert warned["msg"] == "cannot reach http://127.0.0.1:8000/v1"


def test_a_record_whose_arguments_do_not_fit_is_still_written_redacted(captured_debug: io.StringIO) -> None:
    logging.getLogger("bot.test").warning("one %s two %s", BOT_TOKEN)

    [line] = lines(captured_debug)
    assert BOT_TOKEN not in line["msg"] and "[redacted]" in line["msg"]
