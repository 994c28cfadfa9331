"""What `SQLiteStore.open` does with the file it is given: create, migrate, or refuse with a clear StoreError; and
that deleted text leaves the file.

Every refusal must leave the file byte-for-byte untouched (and create no -wal/-shm files beside it).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage import ChannelSettings, ReplyMode, Role, SQLiteStore, StoreError
from storage.schema import LATEST_VERSION
from tests.support import REPO

# The version-1 schema exactly as version 1 of llamacord wrote it: written out here on purpose (not imported
# from storage.schema), so that editing the migration history by mistake makes this test fail.
V1_SCHEMA = """
CREATE TABLE channels (
    channel_id      INTEGER PRIMARY KEY,
    system_prompt   TEXT,
    temperature     REAL,
    top_p           REAL,
    max_new_tokens  INTEGER,
    reply_mode      TEXT CHECK (reply_mode IN ('mention', 'all')),
    updated_by      INTEGER,
    updated_at      TEXT
);
CREATE TABLE messages (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    channel_id   INTEGER NOT NULL REFERENCES channels (channel_id),
    role         TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    author_id    INTEGER,
    author_name  TEXT,
    content      TEXT NOT NULL,
    message_id   INTEGER,
    created_at   TEXT NOT NULL
);
CREATE INDEX messages_by_channel ON messages (channel_id, id);
PRAGMA user_version = 1;
"""


def fingerprint(path: Path) -> tuple[str, list[str]]:
    """The file's bytes (hashed) and the directory listing, to prove nothing was touched."""
    return hashlib.sha256(path.read_bytes()).hexdigest(), sorted(p.name for p in path.parent.iterdir())


def make_v1_database(path: Path) -> None:
    raw = sqlite3.connect(path)
    raw.executescript(V1_SCHEMA)
    raw.execute("PRAGMA journal_mode = WAL")  # v1 also ran in WAL mode
    raw.executemany(
        "INSERT INTO channels (channel_id, system_prompt, temperature, top_p, max_new_tokens, reply_mode, "
        "updated_by, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (10, "Speak like a pirate. 🏴‍☠️", 0.3, None, 128, "all", 77, "2025-01-02T03:04:05.000006+00:00"),
            (20, None, None, None, None, None, None, None),
        ],
    )
    raw.executemany(
        "INSERT INTO messages (channel_id, role, author_id, author_name, content, message_id, created_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            (10, "user", 1, "Ann", "ahoy\x00 שלום", 1001, "2025-01-02T03:04:06.000000+00:00"),
            (20, "user", 2, "Bob", "hello", None, "2025-01-02T03:04:07.000000+00:00"),
            (10, "assistant", None, None, "Arr!", 1002, "2025-01-02T03:04:08.000000+00:00"),
            (20, "assistant", None, None, "hi Bob", None, "2025-01-02T03:04:09.000000+00:00"),
        ],
    )
    raw.commit()
    raw.close()


async def test_fresh_database_is_created_at_the_latest_version_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "new.sqlite3"
    async with SQLiteStore.open(path) as store:
        await store.append_message(1, "user", "x")
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == LATEST_VERSION
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        columns = {row[1] for row in raw.execute("PRAGMA table_info(channels)")}
        indexes = {row[1] for row in raw.execute("PRAGMA index_list(messages)")}
        tables = {row[0] for row in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"history_start_id", "reset_at", "reset_by", "window_start_id"} <= columns
    assert {"messages_by_channel", "messages_by_reply", "messages_by_author"} <= indexes
    assert {"channels", "messages", "discord_messages"} <= tables


async def test_empty_file_is_a_new_database(tmp_path: Path) -> None:
    path = tmp_path / "touched.sqlite3"
    path.touch()
    async with SQLiteStore.open(path) as store:
        assert await store.load_history(1, 5) == []


async def test_version_1_database_is_migrated_and_keeps_its_data(tmp_path: Path) -> None:
    path = tmp_path / "v1.sqlite3"
    make_v1_database(path)

    async with SQLiteStore.open(path) as store:
        pirate = await store.load_history(10, 50)
        assert [(m.role, m.author_name, m.content, m.message_id) for m in pirate] == [
            (Role.USER, "Ann", "ahoy\x00 שלום", 1001),
            (Role.ASSISTANT, None, "Arr!", 1002),
        ]
        assert [m.content for m in await store.load_history(20, 50)] == ["hello", "hi Bob"]
        assert pirate[0].created_at.isoformat() == "2025-01-02T03:04:06+00:00"
        settings = await store.get_channel_settings(10)
        assert settings.system_prompt == "Speak like a pirate. 🏴‍☠️"
        assert (settings.temperature, settings.top_p, settings.max_new_tokens) == (0.3, None, 128)
        assert settings.reply_mode is ReplyMode.ALL and settings.updated_by == 77
        assert await store.get_channel_settings(20) == ChannelSettings(channel_id=20)

        # What version 3 added works on the upgraded data: the Discord ids of old turns were copied into
        # discord_messages (so deleting the message deletes the turn), older replies answer no known turn.
        assert [m.reply_to_id for m in pirate] == [None, None]
        assert await store.get_window_start(10) == 0
        assert await store.edit_discord_message(1001, lambda stored: "ahoy, edited") is True
        assert await store.delete_discord_messages([1002]) == 1
        assert [m.content for m in await store.load_history(10, 50)] == ["ahoy, edited"]

        # What version 2 added works on the upgraded data: reset archives, new ids continue after the old.
        assert await store.reset(10) == 1
        assert await store.load_history(10, 50) == []
        new = await store.append_message(10, "user", "after the upgrade")
        assert new.id > max(m.id for m in pirate)
        assert await store.load_history(10, 50) == [new]

    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == LATEST_VERSION
        assert raw.execute("SELECT count(*) FROM messages").fetchone()[0] == 4  # archived, not deleted (one was)
        assert raw.execute("SELECT history_start_id FROM channels WHERE channel_id = 20").fetchone()[0] == 0

    async with SQLiteStore.open(path) as again:  # opening an up-to-date database migrates nothing
        assert [m.content for m in await again.load_history(20, 50)] == ["hello", "hi Bob"]


@pytest.mark.parametrize("journal", ["delete", "wal", "wal-in-use"])
async def test_newer_schema_is_refused_and_left_untouched(tmp_path: Path, journal: str) -> None:
    path = tmp_path / "future.sqlite3"
    raw = sqlite3.connect(path)
    if journal != "delete":
        raw.execute("PRAGMA journal_mode = WAL")
        raw.execute("PRAGMA wal_autocheckpoint = 0")  # "wal-in-use": the newest data lives only in the -wal
    raw.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY, body BLOB, hologram TEXT)")
    raw.execute("INSERT INTO messages (body) VALUES (x'00ff')")
    raw.execute(f"PRAGMA user_version = {LATEST_VERSION + 1}")
    raw.commit()
    if journal != "wal-in-use":
        raw.close()  # a clean close checkpoints and removes the -wal
    before = fingerprint(path)
    try:
        with pytest.raises(StoreError) as caught:
            await SQLiteStore.open(path)
        message = str(caught.value)
        assert str(path) in message
        assert "newer" in message and f"version {LATEST_VERSION + 1}" in message
        assert fingerprint(path) == before
    finally:
        raw.close()


@pytest.mark.parametrize(
    "content",
    [
        b"DATABASE_PATH=oops\nthis is a text file, not SQLite\n" * 50,
        b"\x00",
        b"SQLite format 2\x00" + b"\x00" * 4080,
        b"SQLite format 3\x00" + os.urandom(4080),  # the right header, then garbage
        b"SQLite format 3\x00",  # the header and nothing else
    ],
    ids=["text", "one-byte", "other-header", "garbage-after-header", "header-only"],
)
async def test_a_file_that_is_not_sqlite_is_refused_and_left_untouched(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "llamacord.sqlite3"
    path.write_bytes(content)
    before = fingerprint(path)

    with pytest.raises(StoreError) as caught:
        await SQLiteStore.open(path)
    assert str(path) in str(caught.value)
    assert "not" in str(caught.value) and "SQLite" in str(caught.value)
    assert fingerprint(path) == before
    assert path.read_bytes() == content


async def test_another_applications_sqlite_database_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "someone-else.db"
    with sqlite3.connect(path) as raw:
        raw.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
        raw.execute("INSERT INTO invoices (total) VALUES (12.5)")
    before = fingerprint(path)
    with pytest.raises(StoreError, match="did not create") as caught:
        await SQLiteStore.open(path)
    assert str(path) in str(caught.value)
    assert fingerprint(path) == before


async def test_missing_directory_gives_a_clear_message_and_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "no" / "such" / "dir" / "llamacord.sqlite3"
    with pytest.raises(StoreError, match="does not exist") as caught:
        await SQLiteStore.open(path)
    assert str(path.parent) in str(caught.value)
    assert not (tmp_path / "no").exists()


async def test_a_directory_as_the_database_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="is a directory"):
        await SQLiteStore.open(tmp_path)


# --- read-only locations ------------------------------------------------------------------------------------
# root ignores permission bits, so the check runs in a child process that drops to `nobody` when we are root.

CHILD = """
import asyncio, concurrent.futures.thread, os, sys
from storage import SQLiteStore, StoreError
if os.geteuid() == 0:
    try:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
    except PermissionError:
        print("CANNOT-DROP-ROOT")
        sys.exit(0)
async def main():
    try:
        store = await SQLiteStore.open(sys.argv[1])
    except StoreError as error:
        print("STOREERROR", error)
    else:
        await store.close()
        print("OPENED")
asyncio.run(main())
"""


def open_unprivileged(path: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(path)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    if result.stdout.strip() == "CANNOT-DROP-ROOT":
        pytest.skip("running as root without the right to drop to an unprivileged user, so nothing is read-only")
    return result.stdout.strip()


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory `nobody` can reach (pytest's tmp_path is private to the user running the tests)."""
    base = Path(tempfile.mkdtemp(prefix="llamacord-store-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        for directory in [base, *base.rglob("*")]:
            if directory.is_dir():
                directory.chmod(0o755)
        shutil.rmtree(base)


def test_read_only_directory_for_a_new_database(shared_dir: Path) -> None:
    read_only = shared_dir / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    path = read_only / "llamacord.sqlite3"
    output = open_unprivileged(path)
    assert output.startswith("STOREERROR"), output
    assert "read-only" in output and str(read_only) in output
    assert list(read_only.iterdir()) == []


async def test_read_only_directory_for_an_existing_database(shared_dir: Path) -> None:
    directory = shared_dir / "data"
    directory.mkdir()
    path = directory / "llamacord.sqlite3"
    async with SQLiteStore.open(path) as store:
        await store.append_message(1, "user", "keep me")
    path.chmod(0o666)  # the file itself is writable; only the directory is not
    directory.chmod(0o555)
    before = fingerprint(path)
    output = open_unprivileged(path)
    assert output.startswith("STOREERROR"), output
    assert "read-only" in output and str(directory) in output
    assert fingerprint(path) == before


async def test_read_only_database_file(shared_dir: Path) -> None:
    path = shared_dir / "llamacord.sqlite3"
    async with SQLiteStore.open(path) as store:
        await store.append_message(1, "user", "keep me")
    path.chmod(0o444)
    before = fingerprint(path)
    output = open_unprivileged(path)
    assert output.startswith("STOREERROR"), output
    assert "read-only" in output and str(path) in output
    assert fingerprint(path) == before


async def test_unprivileged_open_works_where_it_may(shared_dir: Path) -> None:
    """The child process itself is sound: in a writable place it opens the store."""
    writable = shared_dir / "rw"
    writable.mkdir()
    writable.chmod(0o777)
    assert open_unprivileged(writable / "llamacord.sqlite3") == "OPENED"


async def test_deleted_text_leaves_the_file(tmp_path: Path) -> None:
    """secure_delete: a deleted turn's text is overwritten in the file, not just unlinked (a privacy promise)."""
    path = tmp_path / "private.sqlite3"
    secret = "my-password-is-SWORDFISH-" * 4  # long enough to be stored whole on one page
    async with SQLiteStore.open(path) as store:
        for i in range(50):
            await store.append_message(1, "user", f"filler {i} " * 20, message_id=5000 + i)
        await store.append_message(1, "user", secret, author_id=7, message_id=42)
        await store.append_message(1, "user", secret.lower(), author_id=8)
    assert secret.encode() in path.read_bytes()  # so the check below can fail
    async with SQLiteStore.open(path) as store:
        # Set by the store on its connection: Debian's SQLite already defaults to it, most other builds do not.
        assert list(await store._conn().execute_fetchall("PRAGMA secure_delete")) == [(1,)]
        assert await store.delete_discord_messages([42]) == 1
        assert await store.forget_author(8) == 1
        assert len(await store.load_history(1, 100)) == 50
    # Closed: the WAL is checkpointed into the file and removed, so the file is the whole database.
    assert not path.with_name(path.name + "-wal").exists()
    data = path.read_bytes().lower()
    assert secret.lower().encode() not in data
    assert b"swordfish" not in data
