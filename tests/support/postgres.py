"""A throwaway PostgreSQL cluster: `initdb` into a folder, a server on a free port of 127.0.0.1 (and a unix socket in
that folder), and at the end the server stopped and the folder deleted. The tests, `.ci/run` and the store benchmark
all start it this way:

    python3 -m tests.support.postgres start DIR [--durable]   # prints the URL of a superuser, with its password
    python3 -m tests.support.postgres stop DIR

Standard library only: `.ci/run` runs it before the virtual environment exists. It uses Debian's `postgresql`
package (`/usr/lib/postgresql/N/bin`) or whatever `initdb` is on PATH. PostgreSQL refuses to run as root, so as
root the cluster belongs to the `postgres` user, which the package creates. Without `--durable` the server skips
fsync (`fsync`, `synchronous_commit` and `full_page_writes` off): fast for tests, and safe as long as the machine
stays up, which is all a throwaway cluster needs; the benchmark runs `--durable`, as a real server would.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import socket
import subprocess
import sys
from pathlib import Path

USER = "llamacord"  # the cluster's superuser
SYSTEM_USER = "postgres"  # who runs the server when we are root
START_TIMEOUT_S = 60


def bin_dir() -> Path | None:
    """Where initdb and pg_ctl are: on PATH, else the newest of Debian's /usr/lib/postgresql/N/bin; None if absent."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]), reverse=True)
    return versions[0].parent if versions else None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _as_owner() -> dict[str, object]:
    """subprocess options that run a command as the cluster's owner: ourselves, or `postgres` when we are root."""
    return {"user": SYSTEM_USER, "group": SYSTEM_USER} if os.geteuid() == 0 else {}


def _run(*command: object, timeout: float = START_TIMEOUT_S) -> None:
    result = subprocess.run(
        [str(part) for part in command], capture_output=True, text=True, timeout=timeout, **_as_owner()
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, command))} failed:\n{result.stdout}{result.stderr}")


def start(directory: Path, *, durable: bool = False) -> str:
    """Create and start a cluster in `directory` (created if needed, must be empty); return its URL."""
    binaries = bin_dir()
    if binaries is None:
        raise FileNotFoundError("PostgreSQL is not installed (no initdb): apt-get install postgresql")
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    password = secrets.token_urlsafe(18)
    (directory / "password").write_text(password + "\n")
    (directory / "password").chmod(0o600)
    if os.geteuid() == 0:
        shutil.chown(directory, SYSTEM_USER, SYSTEM_USER)
        shutil.chown(directory / "password", SYSTEM_USER, SYSTEM_USER)
    data = directory / "data"
    _run(
        binaries / "initdb",
        f"--pgdata={data}",
        f"--username={USER}",
        f"--pwfile={directory / 'password'}",
        "--auth-local=trust",  # the unix socket lives in `directory`, which only the owner can enter
        "--auth-host=scram-sha-256",  # TCP needs the password, as a real server would
        "--encoding=UTF8",
        "--locale=C",
        "--no-sync",
    )
    settings = {
        "listen_addresses": "'127.0.0.1'",
        "unix_socket_directories": f"'{directory}'",
        "max_connections": "200",
    }
    if not durable:
        settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
    for _attempt in range(3):  # a free port can be taken by someone else before the server binds it
        port = free_port()
        config = "".join(f"{name} = {value}\n" for name, value in {**settings, "port": str(port)}.items())
        (data / "postgresql.auto.conf").write_text(config)
        if os.geteuid() == 0:
            shutil.chown(data / "postgresql.auto.conf", SYSTEM_USER, SYSTEM_USER)
        try:
            _run(binaries / "pg_ctl", "start", f"--pgdata={data}", f"--log={directory / 'log'}", "--wait")
        except RuntimeError:
            continue
        return f"postgresql://{USER}:{password}@127.0.0.1:{port}/postgres"
    log = directory / "log"
    raise RuntimeError(f"PostgreSQL did not start in {directory}:\n{log.read_text() if log.exists() else ''}")


def stop(directory: Path) -> None:
    """Stop the cluster in `directory` at once and delete the folder. Safe when it never started."""
    binaries = bin_dir()
    data = directory / "data"
    if binaries is not None and (data / "postmaster.pid").exists():
        _run(binaries / "pg_ctl", "stop", f"--pgdata={data}", "--mode=immediate", "--wait")
    shutil.rmtree(directory, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--durable", action="store_true", help="fsync every commit, as a production server does")
    args = parser.parse_args(argv)
    if args.action == "start":
        print(start(args.directory, durable=args.durable))
    else:
        stop(args.directory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
