"""The store suite runs on both backends: `database` is an empty SQLite file or an empty PostgreSQL database, and
`store` is open on it. Tests of one backend's own behaviour (files, pragmas, the server) ask for that backend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from storage import Store
from tests.support.databases import Database


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    if request.param == "sqlite":
        return Database("sqlite", tmp_path / "llamacord.sqlite3")
    return Database("postgres", request.getfixturevalue("postgres_url"))  # only now: SQLite runs need no server


@pytest_asyncio.fixture(loop_scope="function")
async def store(database: Database) -> AsyncIterator[Store]:
    async with database.open() as opened:
        yield opened
