"""All of llamacord's settings, read from the environment and `.env`.

Every field here is documented in `.env.example` and in the README's configuration table; a test checks both,
so a new setting cannot ship undocumented.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import ByteSize, Field, SecretStr, TypeAdapter, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from bot.redaction import public_urls
from storage import is_postgres_url
from storage.models import MAX_NEW_TOKENS_RANGE, TEMPERATURE_RANGE, TOP_P_RANGE

DEFAULT_MODEL = "meta-llama/Llama-3.2-1B-Instruct"
ATTACHMENT_BYTES_LIMIT = 10 * 1024 * 1024  # the largest file anyone may upload to Discord without Nitro
_BYTE_SIZE = TypeAdapter(ByteSize)
DEFAULT_SYSTEM_PROMPT = (
    "You are Llamacord, a helpful assistant chatting on Discord. Each user message begins with the "
    "speaker's name and a colon. Reply directly, without a name in front. Be concise; Discord markdown works."
)


def _comma_separated_ids(value: object, what: str) -> object:
    """ "0, 1" from the environment as [0, 1]; anything else as given, for pydantic to check."""
    if not isinstance(value, str):
        return value
    parts = [part.strip() for part in value.split(",") if part.strip()]
    if not all(part.isdigit() for part in parts):
        raise ValueError(f"must be comma-separated {what}")
    return [int(part) for part in parts]


class Settings(BaseSettings):
    """The process-wide configuration. Field names map to upper-case environment variables."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        env_ignore_empty=True,
        case_sensitive=False,
    )

    # Discord
    discord_token: SecretStr | None = None
    discord_api_base_url: str = "https://discord.com/api/v10"
    discord_gateway_url: str = "wss://gateway.discord.gg"
    dev_guild_id: int | None = None
    user_cooldown_seconds: float = Field(default=0.0, ge=0)
    edit_interval_seconds: float = Field(default=1.0, gt=0)
    # Text files attached to a message: read up to this size by Discord's count (larger ones are named, not fetched;
    # at most Discord's own upload limit), all of a message's files fetched within one timeout.
    attachment_max_bytes: int = Field(default=65_536, ge=0, le=ATTACHMENT_BYTES_LIMIT)
    attachment_timeout_seconds: float = Field(default=10.0, gt=0)
    # On SIGTERM, how long replies in progress may finish before the rest are interrupted: within `docker stop`'s
    # 10 seconds, with time left to edit and store the interrupted ones.
    shutdown_grace_seconds: float = Field(default=5.0, ge=0)
    # This process's budget of REST requests a second, under Discord's global 50 (0: no pacing).
    discord_requests_per_second: float = Field(default=40.0, ge=0)
    # Sharding: None is one gateway connection; a number or "auto" runs discord.py's AutoShardedBot.
    shard_count: int | Literal["auto"] | None = None
    shard_ids: Annotated[list[int] | None, NoDecode] = None  # "0,1" in the environment
    # Who may talk to the bot: direct messages at all, and users it ignores everywhere ("123,456").
    allow_dms: bool = True
    blocked_user_ids: Annotated[frozenset[int], NoDecode] = frozenset()

    # Storage: SQLite at DATABASE_PATH, unless DATABASE_URL names a PostgreSQL database (shared by processes on many
    # hosts), which then wins.
    database_path: Path = Path("llamacord.sqlite3")
    database_url: SecretStr | None = None
    history_limit: int = Field(default=100, ge=1, le=10_000)
    # Stored messages older than this many days are deleted for good (archived ones too); 0 keeps everything.
    retention_days: int = Field(default=0, ge=0, le=36_500)

    # Model
    model: str = DEFAULT_MODEL
    hf_token: SecretStr | None = None
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    model_cache_dir: Path = Path.home() / ".cache" / "llamacord"
    chat_template_path: Path | None = None

    # Generation defaults (a channel may override the sampling ones with /config)
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    temperature: float = Field(default=0.7, ge=TEMPERATURE_RANGE[0], le=TEMPERATURE_RANGE[1])
    top_p: float = Field(default=0.9, gt=TOP_P_RANGE[0], le=TOP_P_RANGE[1])
    max_new_tokens: int = Field(default=512, ge=MAX_NEW_TOKENS_RANGE[0], le=MAX_NEW_TOKENS_RANGE[1])
    max_prompt_tokens: int = Field(default=4096, ge=64)

    # Backend: the in-process model (local) or an OpenAI-compatible server (openai: vLLM, SGLang, llama.cpp, ...)
    backend: Literal["local", "openai"] = "local"
    openai_base_url: str = "http://127.0.0.1:8000/v1"
    openai_api_key: SecretStr | None = None
    openai_model: str | None = None
    openai_timeout_seconds: float = Field(default=60.0, gt=0)

    # Executor
    max_batch_size: int = Field(default=32, ge=1, le=1024)
    max_queued_requests: int = Field(default=64, ge=0)
    # Fair turns: one user's requests generating at once while others wait, and waiting at most (past it: busy).
    max_active_per_user: int = Field(default=4, ge=1)
    max_waiting_per_user: int = Field(default=8, ge=0)
    # A message that waits this long for its turn gets a placeholder saying its place in line.
    queue_notice_seconds: float = Field(default=2.0, ge=0)
    # The local engine's KV cache: "auto" (CUDA: most of the memory left after the weights; CPU: a modest share of
    # the available memory) or a size such as 2GiB or 512MiB.
    kv_cache_memory: Literal["auto"] | ByteSize = "auto"

    # Operations
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    metrics_host: str = Field(default="127.0.0.1", min_length=1)

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        value = value.strip().lower()
        if value in {"auto", "cpu", "cuda", "mps"} or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError("must be auto, cpu, cuda, cuda:N or mps")

    @field_validator("openai_base_url")
    @classmethod
    def _check_base_url(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if value.startswith(("http://", "https://")):
            return value
        raise ValueError("must be an http:// or https:// URL, such as http://127.0.0.1:8000/v1")

    @field_validator("discord_api_base_url")
    @classmethod
    def _check_discord_api_base_url(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if value.startswith(("http://", "https://")):
            return value
        raise ValueError("must be an http:// or https:// URL, such as https://discord.com/api/v10")

    @field_validator("discord_gateway_url")
    @classmethod
    def _check_discord_gateway_url(cls, value: str) -> str:
        value = value.strip()
        if value.startswith(("ws://", "wss://")):
            return value
        raise ValueError("must be a ws:// or wss:// URL, such as wss://gateway.discord.gg")

    @field_validator("shard_count", mode="before")
    @classmethod
    def _parse_shard_count(cls, value: object) -> object:
        # One message for every bad value, rather than pydantic's one per member of the union.
        if value is None:
            return None
        text = str(value).strip().lower()
        if text == "auto":
            return text
        if text.isdigit() and int(text) >= 1:
            return int(text)
        raise ValueError("must be a number of shards (1 or more), or auto for Discord's recommendation")

    @field_validator("shard_ids", mode="before")
    @classmethod
    def _parse_shard_ids(cls, value: object) -> object:
        return _comma_separated_ids(value, "shard ids, such as 0,1")

    @field_validator("blocked_user_ids", mode="before")
    @classmethod
    def _parse_blocked_user_ids(cls, value: object) -> object:
        return _comma_separated_ids(value, "Discord user ids, such as 80351110224678912,123456789012345678")

    @field_validator("shard_ids")
    @classmethod
    def _check_shard_ids(cls, value: list[int] | None, info: ValidationInfo) -> list[int] | None:
        if value is None or "shard_count" not in info.data:  # unset, or SHARD_COUNT is already reported as bad
            return value
        count = info.data["shard_count"]
        if not isinstance(count, int):
            raise ValueError("needs SHARD_COUNT set to the total number of shards (a number, not auto or empty)")
        if not value:
            raise ValueError("lists no shard ids; leave it empty to run every shard")
        for shard_id in value:
            if not 0 <= shard_id < count:
                raise ValueError(
                    f"shard {shard_id} is out of range: with SHARD_COUNT={count} the ids are 0 to {count - 1}"
                )
        if len(set(value)) != len(value):
            raise ValueError("lists a shard id twice")
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or is_postgres_url(value.get_secret_value().strip()):
            return value
        raise ValueError("must be a postgresql:// URL, such as postgresql://llamacord:PASSWORD@db-host:5432/llamacord")

    @field_validator("database_path", "model_cache_dir", "chat_template_path")
    @classmethod
    def _expand_user(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @property
    def database(self) -> str | Path:
        """The store to open: DATABASE_URL when it is set, else DATABASE_PATH."""
        return self.database_path if self.database_url is None else self.database_url.get_secret_value().strip()

    @field_validator("kv_cache_memory", mode="before")
    @classmethod
    def _parse_kv_cache_memory(cls, value: object) -> object:
        # One message for every bad value, rather than pydantic's one per member of the union.
        text = str(value).strip()
        if text.lower() == "auto":
            return "auto"
        try:
            size = _BYTE_SIZE.validate_python(text)
        except ValidationError:
            size = 0
        if size <= 0:
            raise ValueError("must be auto or a size such as 2GiB, 512MiB or 1500MB")
        return size

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    def secret_values(self) -> list[str]:
        """The value of every secret setting (the bot token, API keys, a database URL with its password): what the
        logs must never show (`configure_logging`)."""
        values = (getattr(self, name) for name in type(self).model_fields if _is_secret(name))
        return [value.get_secret_value() for value in values if value is not None]


class SettingsError(SystemExit):
    """Start-up stops here, with a message that names each bad setting."""


def format_validation_error(error: ValidationError) -> str:
    lines = ["Invalid llamacord settings:"]
    for problem in error.errors():
        name = "_".join(str(part) for part in problem["loc"]).upper() or "(settings)"
        given = problem.get("input")
        secret = _is_secret(str(problem["loc"][0])) if problem["loc"] else False
        hidden = secret or isinstance(given, dict) or given is None
        shown = "" if hidden else f" (got {public_urls(repr(given))})"
        lines.append(f"  {name}: {problem['msg']}{shown}")
    lines.append("Fix them in the environment or in .env; .env.example lists every setting.")
    return "\n".join(lines)


def _is_secret(name: str) -> bool:
    """Whether a setting holds a secret (a token, a key, a URL with a password): its value is never shown."""
    field = Settings.model_fields.get(name)
    return field is not None and SecretStr in (field.annotation, *get_args(field.annotation))


def load_settings(**overrides: object) -> Settings:
    """Build the settings, turning a validation error into a clear exit that names the setting."""
    try:
        return Settings(**overrides)
    except ValidationError as error:
        raise SettingsError(format_validation_error(error)) from None
