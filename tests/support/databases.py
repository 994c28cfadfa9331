"""The databases the store's tests run on: an empty SQLite file, or an empty database on a real PostgreSQL server.

`LLAMACORD_TEST_DATABASE_URL` names the PostgreSQL server (a superuser's URL, which may create databases); `.ci/run`
sets it, and then a server that cannot be reached fails the tests rather than skipping them. Without it, the tests
start a throwaway cluster of their own (`tests/support/postgres.py`), or skip when PostgreSQL is not installed.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from storage import Opening, Store, open_store
from storage.postgres import APPLICATION_NAME

SERVER_ENV = "LLAMACORD_TEST_DATABASE_URL"
CONNECT_TIMEOUT_S = 10


def database_url(server_url: str, name: str) -> str:
    """The server's URL with another database name."""
    return urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))


@asynccontextmanager
async def fresh_database(server_url: str) -> AsyncIterator[str]:
    """A new, empty database on the server, dropped (with any connection still open to it) afterwards."""
    try:
        admin = await asyncpg.connect(server_url, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError, asyncpg.PostgresError) as error:
        raise RuntimeError(
            f"The PostgreSQL test server cannot be reached ({error}); check {SERVER_ENV} or the throwaway cluster"
        ) from error
    name = f"test_{uuid.uuid4().hex}"
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        try:
            yield database_url(server_url, name)
        finally:
            await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
    finally:
        await admin.close()


async def cut_store_connections(connection: asyncpg.Connection) -> int:
    """What a server restart or a network cut does to the stores' connections to this database: each is closed
    under it (not `connection`). Returns how many."""
    # MATERIALIZED: the filter runs first, so no other backend is terminated.
    return await connection.fetchval(
        "WITH ours AS MATERIALIZED (SELECT pid FROM pg_stat_activity WHERE application_name = $1 "
        "AND datname = current_database() AND pid <> pg_backend_pid()) "
        "SELECT count(*) FROM ours WHERE pg_terminate_backend(pid)",
        APPLICATION_NAME,
    )


@dataclass(frozen=True)
class Database:
    """One empty database of one backend: open stores on it, and read it behind the store's back."""

    backend: str  # "sqlite" or "postgres"
    location: str | Path

    def open(self) -> Opening[Store]:
        return open_store(self.location)

    async def fetch(self, sql: str) -> list[tuple[Any, ...]]:
        """The rows of a plain query (no parameters), text columns as str in both backends."""
        if isinstance(self.location, Path):
            with sqlite3.connect(self.location) as raw:
                return raw.execute(sql).fetchall()
        connection = await asyncpg.connect(self.location, timeout=CONNECT_TIMEOUT_S)
        try:
            rows = await connection.fetch(sql)
        finally:
            await connection.close()
        return [tuple(v.decode() if isinstance(v, bytes) else v for v in row) for row in rows]

    async def count(self, table: str) -> int:
        [(count,)] = await self.fetch(f"SELECT count(*) FROM {table}")
        return count
