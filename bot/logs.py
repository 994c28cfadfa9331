"""Logging: one logfmt line per record on stderr, at LOG_LEVEL, and the one line logged per reply.

logfmt (`key=value`, values with spaces or quotes JSON-quoted) reads well in `journalctl` and `docker logs` and
parses in Loki, Vector and friends. Values passed with `extra={...}` become fields of the line. A record is always
one line, tracebacks included, so a message can never forge a log line.

Privacy: message content is logged only at DEBUG. The reply line carries numbers and ids, never text. Secrets are
never logged, at any level: `Redactor` takes them out of every record (message, arguments, fields, traceback)
before it is written.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TextIO

from bot.redaction import public_urls

if TYPE_CHECKING:
    from bot.engine.api import RequestMetrics

REPLY_LOGGER = "llamacord.reply"

# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged as a field.
_RECORD_ATTRIBUTES = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
_BARE_VALUE = re.compile(r'[^\s="\\]+')
# Libraries that log every HTTP request at INFO (huggingface_hub's downloads go through httpx, the OpenAI client's
# requests through httpx2).
_CHATTY_LOGGERS = ("httpx", "httpx2", "ContinuousBatchingLogger")
# transformers' continuous batching gives its logger a handler of its own and stops propagation; we take it back so
# its lines come out in our format and at our level.
_OWN_HANDLER_LOGGERS = ("ContinuousBatchingLogger",)


class LogfmtFormatter(logging.Formatter):
    """`time=… level=… logger=… msg=… key=value…` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRIBUTES and key not in fields:
                fields[key] = value
        # exc_text: the traceback as `Redactor` left it
        exc = record.exc_text or (self.formatException(record.exc_info) if record.exc_info else None)
        if exc:
            fields["exc"] = exc
        if record.stack_info:
            fields["stack"] = self.formatStack(record.stack_info)
        return " ".join(f"{key}={_format_value(value)}" for key, value in fields.items())


def _format_value(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    if _BARE_VALUE.fullmatch(text) and text.isprintable():
        return text
    return json.dumps(text, ensure_ascii=False)


REDACTED = "[redacted]"
# An interaction's token lets anyone answer in its name for 15 minutes. discord.py logs it at DEBUG in the callback
# and webhook URLs (`/interactions/<id>/<token>/callback`, `/webhooks/<application id>/<token>/...`) and in the
# gateway's INTERACTION_CREATE events (`'token': '...'`).
_INTERACTION_TOKEN_IN_URL = re.compile(r"(/(?:interactions|webhooks)/\d+/)[^/?#\s'\"]+")
_TOKEN_FIELD = re.compile(r"""(['"]\w*token['"]\s*:\s*['"])[^'"]+""")


class Redactor(logging.Filter):
    """Takes secrets out of every record it sees: the given ones (the bot token, API keys: `Settings.secret_values`),
    interaction tokens, and user:password and query strings from URLs (`public_urls`). It rewrites the record, so
    handlers after it see the redacted record too."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._secrets = sorted({secret for secret in secrets if secret.strip()}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        text = _INTERACTION_TOKEN_IN_URL.sub(rf"\g<1>{REDACTED}", text)
        text = _TOKEN_FIELD.sub(rf"\g<1>{REDACTED}", text)
        return public_urls(text)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # arguments that do not fit the message: keep both, redacted, rather than fail the call
            message = f"{record.msg} {record.args!r}"
        record.msg, record.args = self.redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRIBUTES and isinstance(value, str):
                record.__dict__[key] = self.redact(value)
        return True


class _Handler(logging.StreamHandler[TextIO]):
    """Marks the handler `configure_logging` installed, so a second call replaces it instead of doubling lines."""


def configure_logging(level: str, stream: TextIO | None = None, secrets: Iterable[str] = ()) -> None:
    """Send every logger's records at `level` (LOG_LEVEL) and above to `stream` (stderr) as logfmt lines, with
    `secrets` (`Settings.secret_values()`) and interaction tokens redacted.

    Handlers that others installed on the root logger (pytest's, for one) are left in place.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(handler)
    handler = _Handler(stream if stream is not None else sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    handler.addFilter(Redactor(secrets))
    root.addHandler(handler)
    root.setLevel(level)
    quiet = logging.NOTSET if root.level <= logging.DEBUG else max(root.level, logging.WARNING)
    for name in _OWN_HANDLER_LOGGERS:
        own = logging.getLogger(name)
        for foreign in list(own.handlers):
            own.removeHandler(foreign)
        own.propagate = True
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(quiet)


def tokens_per_second(request: RequestMetrics) -> float | None:
    """Decode speed: tokens after the first over the seconds after the first. None when it cannot be measured."""
    if request.ttft_s is None or request.total_s is None or request.generated_tokens < 2:
        return None
    decode_s = request.total_s - request.ttft_s
    return (request.generated_tokens - 1) / decode_s if decode_s > 0 else None


def reply_fields(channel_id: int, request: RequestMetrics, outcome: str) -> dict[str, object]:
    """The fields of the reply line. Ids and numbers only: adding message text here would break the privacy rule."""
    speed = tokens_per_second(request)
    return {
        "channel": channel_id,
        "outcome": str(outcome),
        "finish_reason": request.finish_reason,
        "queue_wait_s": _seconds(request.queue_wait_s),
        "prompt_tokens": request.prompt_tokens,
        "cached_prompt_tokens": request.cached_prompt_tokens,
        "generated_tokens": request.generated_tokens,
        "ttft_s": _seconds(request.ttft_s),
        "total_s": _seconds(request.total_s),
        "tokens_per_s": round(speed, 1) if speed is not None else None,
    }


def log_reply(channel_id: int, request: RequestMetrics, outcome: str) -> None:
    """Log the one INFO line of a finished reply (`msg=reply`), from the engine's `RequestMetrics`."""
    logging.getLogger(REPLY_LOGGER).info("reply", extra=reply_fields(channel_id, request, outcome))


def _seconds(value: float | None) -> float | None:
    return round(value, 3) if value is not None else None
