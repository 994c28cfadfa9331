"""Logging: LOG_LEVEL is obeyed, every record is one parseable logfmt line, and the reply line's fields."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from bot.engine.api import FinishReason, RequestMetrics
from bot.logs import REPLY_LOGGER, LogfmtFormatter, configure_logging, log_reply, tokens_per_second
from bot.settings import Settings

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


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """Logging configured into a buffer; the root logger's level and handlers are restored afterwards."""
    root = logging.getLogger()
    saved_level, saved_handlers = root.level, list(root.handlers)
    httpx_level = logging.getLogger("httpx").level
    stream = io.StringIO()
    configure_logging("INFO", stream)
    yield stream
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)
    logging.getLogger("httpx").setLevel(httpx_level)


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
    root = logging.getLogger()
    saved_level, saved_handlers = root.level, list(root.handlers)
    httpx_level = logging.getLogger("httpx").level
    stream = io.StringIO()
    try:
        configure_logging(Settings(_env_file=None, log_level="warning").log_level, stream)
        logging.getLogger("bot.test").info("hidden")
        logging.getLogger("bot.test").warning("shown")
        assert root.level == logging.WARNING
        configure_logging("DEBUG", stream)
        logging.getLogger("bot.test").debug("now shown")
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        logging.getLogger("httpx").setLevel(httpx_level)

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


def test_http_request_chatter_is_quiet_at_info(captured: io.StringIO) -> None:
    logging.getLogger("httpx").info('HTTP Request: GET https://huggingface.co/x "HTTP/1.1 200 OK"')
    logging.getLogger("httpx").warning("retrying")

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
