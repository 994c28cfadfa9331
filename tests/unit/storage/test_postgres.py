"""What only the PostgreSQL store does, on a real server: its schema version table, refusing databases it must not
touch, clear start-up errors without the password, reconnecting after lost connections, and the row locks that keep
shard processes on different hosts correct without any lock of their own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest
import pytest_asyncio

from storage import PostgresStore, Role, StoreError, open_store
from storage.postgres import VERSION_TABLE, hide_passwords
from storage.schema import LATEST_VERSION
from tests.support.databases import cut_store_connections, database_url
from tests.support.postgres import free_port

CHANNEL = 1_100_000_000_000_000_001
WAIT_S = 0.3  # how long an operation that should be blocked is watched before it is let go
TIMEOUT_S = 30


@pytest_asyncio.fixture(loop_scope="function")
async def raw(postgres_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection to the test database: another process, as far as the store can tell."""
    connection = await asyncpg.connect(postgres_url, timeout=TIMEOUT_S)
    try:
        yield connection
    finally:
        await connection.close()


async def tables(raw: asyncpg.Connection) -> set[str]:
    rows = await raw.fetch("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
    return {row[0] for row in rows}


# --- schema versions ------------------------------------------------------------------------------------------


async def test_a_new_database_gets_the_latest_schema_and_a_reopen_changes_nothing(
    postgres_url: str, raw: asyncpg.Connection
) -> None:
    async with PostgresStore.open(postgres_url) as store:
        written = await store.append_message(CHANNEL, Role.USER, "kept")
    assert await tables(raw) == {VERSION_TABLE, "channels", "messages", "discord_messages"}
    assert await raw.fetch(f"SELECT version FROM {VERSION_TABLE}") == [(LATEST_VERSION,)]
    async with PostgresStore.open(postgres_url) as again:
        assert await again.load_history(CHANNEL, 10) == [written]
    assert await raw.fetch(f"SELECT version FROM {VERSION_TABLE}") == [(LATEST_VERSION,)]


async def test_processes_starting_together_migrate_once(postgres_url: str, raw: asyncpg.Connection) -> None:
    stores = await asyncio.gather(*(PostgresStore.open(postgres_url) for _ in range(4)))
    try:
        ids = [(await store.append_message(CHANNEL, Role.USER, f"from {i}")).id for i, store in enumerate(stores)]
    finally:
        await asyncio.gather(*(store.close() for store in stores))
    assert ids == sorted(ids)
    assert await raw.fetchval(f"SELECT count(*) FROM {VERSION_TABLE}") == 1


async def test_a_newer_schema_is_refused_and_left_untouched(postgres_url: str, raw: asyncpg.Connection) -> None:
    await raw.execute(f"CREATE TABLE {VERSION_TABLE} (version INTEGER NOT NULL)")
    await raw.execute(f"INSERT INTO {VERSION_TABLE} VALUES ({LATEST_VERSION + 1})")
    with pytest.raises(StoreError) as caught:
        await PostgresStore.open(postgres_url)
    message = str(caught.value)
    assert "DATABASE_URL" in message and "newer" in message and f"version {LATEST_VERSION + 1}" in message
    assert await tables(raw) == {VERSION_TABLE}
    assert await raw.fetch(f"SELECT version FROM {VERSION_TABLE}") == [(LATEST_VERSION + 1,)]


async def test_another_applications_tables_are_refused_and_left_untouched(
    postgres_url: str, raw: asyncpg.Connection
) -> None:
    await raw.execute("CREATE TABLE messages (id serial PRIMARY KEY, subject text)")
    await raw.execute("INSERT INTO messages (subject) VALUES ('an invoice')")
    with pytest.raises(StoreError, match="did not create") as caught:
        await PostgresStore.open(postgres_url)
    assert "messages" in str(caught.value) and "DATABASE_URL" in str(caught.value)
    assert await tables(raw) == {"messages"}
    assert await raw.fetch("SELECT subject FROM messages") == [("an invoice",)]


async def test_a_schema_of_its_own_through_search_path(postgres_url: str, raw: asyncpg.Connection) -> None:
    """The refusal's advice works: with another app's `messages` in public, a schema of llamacord's own is fine."""
    await raw.execute("CREATE TABLE messages (id serial PRIMARY KEY)")
    await raw.execute("CREATE SCHEMA llamacord")
    async with open_store(postgres_url + "?search_path=llamacord") as store:
        await store.append_message(CHANNEL, Role.USER, "in its own schema")
    assert await raw.fetchval("SELECT count(*) FROM llamacord.messages") == 1
    assert await raw.fetchval("SELECT count(*) FROM public.messages") == 0


# --- start-up errors --------------------------------------------------------------------------------------------


def with_password(url: str, password: str) -> str:
    scheme, _, rest = url.partition("://")
    credentials, _, location = rest.rpartition("@")
    return f"{scheme}://{credentials.partition(':')[0]}:{password}@{location}"


@pytest.mark.parametrize("problem", ["no server", "wrong password", "no such database", "bad port"])
async def test_an_unusable_database_gives_a_clear_message_without_the_password(
    problem: str, postgres_server: str
) -> None:
    secret = "hunter2-do-not-print"
    url = {
        "no server": f"postgresql://llamacord:{secret}@127.0.0.1:{free_port()}/llamacord",
        "wrong password": with_password(postgres_server, secret),
        "no such database": database_url(postgres_server, "no_such_database"),
        "bad port": f"postgresql://llamacord:{secret}@127.0.0.1:port/llamacord",
    }[problem]
    with pytest.raises(StoreError) as caught:
        await asyncio.wait_for(PostgresStore.open(url), TIMEOUT_S)
    message = str(caught.value)
    assert message.startswith("Cannot connect to the PostgreSQL database at DATABASE_URL=postgresql://llamacord:***@")
    assert secret not in message
    assert hide_passwords(postgres_server)[1].isdisjoint(message.split()), "the test server's password leaked"
    expected = {
        "no server": "Connect call failed",
        "wrong password": "password authentication failed",
        "no such database": 'database "no_such_database" does not exist',
        "bad port": "invalid literal",
    }[problem]
    assert expected in message


@pytest.mark.parametrize(
    ("url", "shown", "hidden"),
    [
        ("postgresql://bot:s3cret@db:5432/llamacord", "postgresql://bot:***@db:5432/llamacord", {"s3cret"}),
        ("postgres://bot:p%40ss@db/x?sslmode=require", "postgres://bot:***@db/x?sslmode=require", {"p%40ss", "p@ss"}),
        ("postgresql://bot:a@b@db/x", "postgresql://bot:***@db/x", {"a@b"}),
        ("postgresql://db/x?user=bot&password=pw&x=1", "postgresql://db/x?user=bot&password=***&x=1", {"pw"}),
        ("postgresql://bot@db/x", "postgresql://bot@db/x", set()),
        ("postgresql:///x?host=/run/postgresql", "postgresql:///x?host=/run/postgresql", set()),
    ],
)
def test_passwords_are_hidden_wherever_the_url_has_them(url: str, shown: str, hidden: set[str]) -> None:
    assert hide_passwords(url) == (shown, frozenset(hidden))


# --- lost connections ---------------------------------------------------------------------------------------------


async def test_a_lost_connection_fails_the_operation_in_flight_and_the_store_reconnects(
    postgres_url: str, raw: asyncpg.Connection
) -> None:
    async with PostgresStore.open(postgres_url) as store:
        kept = await store.append_message(CHANNEL, Role.USER, "before")
        # An operation in flight: the reset waits for the channel's row, which "another process" holds.
        async with raw.transaction():
            await raw.execute("SELECT 1 FROM channels WHERE channel_id = $1 FOR KEY SHARE", CHANNEL)
            in_flight = asyncio.create_task(store.reset(CHANNEL))
            await asyncio.sleep(WAIT_S)
            assert not in_flight.done()
            assert await cut_store_connections(raw) >= 1
            with pytest.raises(StoreError, match="DATABASE_URL=postgresql://llamacord:\\*\\*\\*@"):
                await asyncio.wait_for(in_flight, TIMEOUT_S)
        # Only that operation failed: nothing was reset, and the next operations get new connections.
        after = await asyncio.wait_for(store.append_message(CHANNEL, Role.USER, "after"), TIMEOUT_S)
        assert await store.load_history(CHANNEL, 10) == [kept, after]
        # Idle connections that were closed under the pool are replaced too.
        assert await cut_store_connections(raw) >= 1
        await asyncio.sleep(WAIT_S)  # the pool sees the closed sockets
        assert await asyncio.wait_for(store.load_history(CHANNEL, 10), TIMEOUT_S) == [kept, after]


async def test_right_after_a_cut_a_read_is_tried_again_and_the_next_write_gets_a_fresh_connection(
    postgres_url: str, raw: asyncpg.Connection
) -> None:
    async with PostgresStore.open(postgres_url) as store:
        kept = await store.append_message(CHANNEL, Role.USER, "before")
        await asyncio.gather(*(store.load_history(CHANNEL, 10) for _ in range(4)))  # several idle connections
        assert await cut_store_connections(raw) >= 2
        # At once, before the pool can have seen the closed sockets: the first use of a dead connection.
        assert await asyncio.wait_for(store.load_history(CHANNEL, 10), TIMEOUT_S) == [kept]
        after = await asyncio.wait_for(store.append_message(CHANNEL, Role.USER, "after"), TIMEOUT_S)
        assert await store.load_history(CHANNEL, 10) == [kept, after]


# --- several processes, no lock of their own ---------------------------------------------------------------------


async def test_a_reset_waits_for_an_append_in_flight_and_counts_it(postgres_url: str, raw: asyncpg.Connection) -> None:
    async with PostgresStore.open(postgres_url) as store:
        await store.append_message(CHANNEL, Role.USER, "first")
        # Another process's append, drawn its id but not yet committed; then a later append commits above it.
        async with raw.transaction():
            await raw.execute("SELECT 1 FROM channels WHERE channel_id = $1 FOR KEY SHARE", CHANNEL)
            await raw.execute(
                "INSERT INTO messages (channel_id, role, content, created_at) VALUES ($1, 'user', 'slow', now())",
                CHANNEL,
            )
            await store.append_message(CHANNEL, Role.USER, "fast")
            reset = asyncio.create_task(store.reset(CHANNEL))
            await asyncio.sleep(WAIT_S)
            assert not reset.done(), "the reset must wait for the append that holds the channel"
        assert await asyncio.wait_for(reset, TIMEOUT_S) == 3  # first, slow and fast: none hidden uncounted
        assert await store.load_history(CHANNEL, 10) == []


async def test_an_append_during_a_reset_lands_after_the_reset_point(postgres_url: str, raw: asyncpg.Connection) -> None:
    async with PostgresStore.open(postgres_url) as store:
        await store.append_message(CHANNEL, Role.USER, "before")
        # Another process's reset holds the channel; our append waits for it before it draws an id.
        async with raw.transaction():
            await raw.execute("SELECT 1 FROM channels WHERE channel_id = $1 FOR UPDATE", CHANNEL)
            append = asyncio.create_task(store.append_message(CHANNEL, Role.USER, "during"))
            await asyncio.sleep(WAIT_S)
            assert not append.done()
            reset_point = await raw.fetchval(
                "INSERT INTO messages (channel_id, role, content, created_at) VALUES ($1, 'user', 'x', now()) "
                "RETURNING id",
                CHANNEL,
            )
            await raw.execute("UPDATE channels SET history_start_id = $2 WHERE channel_id = $1", CHANNEL, reset_point)
        during = await asyncio.wait_for(append, TIMEOUT_S)
        assert during.id > reset_point
        assert await store.load_history(CHANNEL, 10) == [during]


async def test_deleting_a_question_takes_the_reply_being_stored_with_it(
    postgres_url: str, raw: asyncpg.Connection
) -> None:
    async with PostgresStore.open(postgres_url) as store:
        question = await store.append_message(CHANNEL, Role.USER, "q", message_id=1001)
        # Another process stores the reply (not yet committed) as the question is deleted.
        async with raw.transaction():
            await raw.execute(
                "INSERT INTO messages (channel_id, role, content, created_at, reply_to_id) "
                "VALUES ($1, 'assistant', 'a', now(), $2)",
                CHANNEL,
                question.id,
            )
            delete = asyncio.create_task(store.delete_discord_messages([1001]))
            await asyncio.sleep(WAIT_S)
            assert not delete.done()
        assert await asyncio.wait_for(delete, TIMEOUT_S) == 2
        assert await raw.fetchval("SELECT count(*) FROM messages") == 0
