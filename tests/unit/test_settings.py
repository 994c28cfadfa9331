"""Settings: bad values stop start-up naming the setting; defaults; `.env.example` documents every field."""

from __future__ import annotations

from pathlib import Path

import pytest
from dotenv import dotenv_values

from bot.settings import Settings, SettingsError, load_settings
from tests.support import REPO

ENV_EXAMPLE = REPO / ".env.example"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No setting from the real environment or a developer's `.env` leaks into these tests."""
    monkeypatch.chdir(tmp_path)
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TEMPERATURE", "3.5"),
        ("TEMPERATURE", "hot"),
        ("TOP_P", "0"),
        ("MAX_NEW_TOKENS", "-1"),
        ("HISTORY_LIMIT", "lots"),
        ("DEVICE", "tpu"),
        ("DTYPE", "int3"),
        ("LOG_LEVEL", "LOUD"),
        ("METRICS_PORT", "70000"),
        ("MAX_BATCH_SIZE", "0"),
        ("DISCORD_REQUESTS_PER_SECOND", "-5"),
        ("ATTACHMENT_MAX_BYTES", "20000000"),  # past Discord's own upload limit
        ("ATTACHMENT_TIMEOUT_SECONDS", "0"),
    ],
)
def test_an_invalid_environment_value_exits_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as caught:
        load_settings()
    assert isinstance(caught.value, SettingsError)
    message = str(caught.value)
    assert variable in message
    assert value in message


def test_an_invalid_value_in_dotenv_exits_naming_the_setting(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("TEMPERATURE=9\n", encoding="utf-8")
    with pytest.raises(SettingsError, match="TEMPERATURE"):
        load_settings()


def test_several_invalid_values_are_all_named() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(top_p=2, max_batch_size=0)
    assert "TOP_P" in str(caught.value) and "MAX_BATCH_SIZE" in str(caught.value)


def test_default_database_path_is_in_the_working_directory() -> None:
    settings = load_settings()
    assert settings.database_path == Path("llamacord.sqlite3")
    assert not settings.database_path.is_absolute()


def test_database_path_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_PATH", "~/data/bot.sqlite3")
    assert load_settings().database_path == Path.home() / "data" / "bot.sqlite3"


def test_database_url_wins_over_database_path(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().database == Path("llamacord.sqlite3")
    url = "postgresql://llamacord:s3cret@db.internal:5432/llamacord"
    monkeypatch.setenv("DATABASE_PATH", "~/data/bot.sqlite3")
    monkeypatch.setenv("DATABASE_URL", f" {url} ")
    settings = load_settings()
    assert settings.database == url
    assert "s3cret" not in repr(settings) and "s3cret" not in str(settings)


@pytest.mark.parametrize("url", ["mysql://llamacord:s3cret@db/llamacord", "llamacord:s3cret@db", "s3cret"])
def test_a_bad_database_url_exits_naming_it_without_showing_it(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", url)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert "DATABASE_URL" in message and "postgresql://" in message
    assert "s3cret" not in message


def test_other_bad_values_are_still_shown() -> None:
    with pytest.raises(SettingsError, match="'hot'"):
        load_settings(temperature="hot")


def test_a_bad_url_is_shown_without_its_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "ftp://llamacord:s3cret@models.internal/v1?key=k")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert "OPENAI_BASE_URL" in message and "'ftp://models.internal/v1'" in message
    assert "s3cret" not in message and "key=k" not in message


def test_secret_values_are_every_secret_setting_that_is_set() -> None:
    settings = load_settings(discord_token="bot-token", openai_api_key="api-key", hf_token=None)
    assert sorted(settings.secret_values()) == ["api-key", "bot-token"]
    with_database = load_settings(database_url="postgresql://u:pw@db/llamacord")
    assert with_database.secret_values() == ["postgresql://u:pw@db/llamacord"]


def test_sharding_is_off_by_default() -> None:
    settings = load_settings()
    assert settings.shard_count is None and settings.shard_ids is None


@pytest.mark.parametrize(
    ("environment", "count", "ids"),
    [
        ({"SHARD_COUNT": "4"}, 4, None),
        ({"SHARD_COUNT": " Auto "}, "auto", None),
        ({"SHARD_COUNT": "4", "SHARD_IDS": "2, 3"}, 4, [2, 3]),
        ({"SHARD_COUNT": "2", "SHARD_IDS": "0,1"}, 2, [0, 1]),
    ],
)
def test_shard_settings_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, environment: dict[str, str], count: int | str, ids: list[int] | None
) -> None:
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    settings = load_settings()
    assert (settings.shard_count, settings.shard_ids) == (count, ids)


@pytest.mark.parametrize(
    ("environment", "named", "says"),
    [
        ({"SHARD_IDS": "0,1"}, "SHARD_IDS", "needs SHARD_COUNT"),
        ({"SHARD_COUNT": "auto", "SHARD_IDS": "0"}, "SHARD_IDS", "needs SHARD_COUNT"),
        ({"SHARD_COUNT": "2", "SHARD_IDS": "0,2"}, "SHARD_IDS", "shard 2 is out of range"),
        ({"SHARD_COUNT": "2", "SHARD_IDS": "1,1"}, "SHARD_IDS", "twice"),
        ({"SHARD_COUNT": "2", "SHARD_IDS": "zero"}, "SHARD_IDS", "comma-separated"),
        ({"SHARD_COUNT": "2", "SHARD_IDS": ","}, "SHARD_IDS", "no shard ids"),
        ({"SHARD_COUNT": "0"}, "SHARD_COUNT", "or auto"),
        ({"SHARD_COUNT": "many"}, "SHARD_COUNT", "or auto"),
    ],
)
def test_bad_shard_settings_exit_saying_what_is_wrong(
    monkeypatch: pytest.MonkeyPatch, environment: dict[str, str], named: str, says: str
) -> None:
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    problems = str(caught.value).splitlines()[1:-1]
    assert len(problems) == 1, problems  # one clear line, not one per member of a type union
    assert problems[0].strip().startswith(f"{named}:") and says in problems[0]


def example_values() -> dict[str, str | None]:
    values = dotenv_values(ENV_EXAMPLE)
    assert values, ".env.example is empty or unreadable"
    return values


@pytest.mark.parametrize("field", list(Settings.model_fields))
def test_every_setting_is_in_env_example_with_its_default(field: str) -> None:
    values = example_values()
    variable = field.upper()
    assert variable in values, f"{variable} is missing from .env.example"
    default = Settings.model_fields[field].get_default(call_default_factory=True)
    written = values[variable]
    if default is None:
        assert not written, f"{variable} defaults to empty (None), but .env.example gives {written!r}"
        return
    # Validate the written value exactly as the settings would read it, and compare with the default.
    parsed = getattr(Settings(_env_file=None, **{field: written}), field)
    expected = getattr(Settings(_env_file=None), field)
    shown = expected.get_secret_value() if hasattr(expected, "get_secret_value") else expected
    assert parsed == expected, f".env.example gives {variable}={written!r}, but the default is {shown!r}"


def test_env_example_has_no_unknown_settings() -> None:
    known = {name.upper() for name in Settings.model_fields}
    assert set(example_values()) - known == set()


def test_env_example_loads_to_exactly_the_defaults() -> None:
    assert Settings(_env_file=ENV_EXAMPLE) == Settings(_env_file=None)
