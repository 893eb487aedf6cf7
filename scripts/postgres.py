"""A throwaway PostgreSQL server on 127.0.0.1 for the feedback store's tests and benchmarks.

    with postgres() as server:
        server.database("t1")          # postgresql://postgres@127.0.0.1:PORT/t1, made empty
        server.restart(immediate=True) # as after a crash: no shutdown checkpoint, WAL replayed
        server.sql("SELECT 1")

Debian's `postgresql` package: `initdb` and the server run as the unprivileged `postgres` user
(initdb refuses root), with their data in a new temporary folder, on a free loopback port, with
its socket in that folder; `fsync` stays on, as in production. The server is stopped however the
`with` block ends, and its folder removed.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

USER = "postgres"


def bindir() -> Path | None:
    """The newest Debian PostgreSQL's bin folder, or None when it is not installed."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Postgres:
    def __init__(self, folder: Path, port: int) -> None:
        self.folder, self.port, self.bin = folder, port, bindir()
        self.data, self.log = folder / "data", folder / "server.log"

    def _as_user(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        assert self.bin is not None
        return subprocess.run(["runuser", "-u", USER, "--", str(self.bin / args[0]), *args[1:]],
                              capture_output=True, text=True, check=check, timeout=120)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c max_connections=200"
        self._as_user("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._as_user("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop", check=False)

    def restart(self, immediate: bool = False) -> None:
        self.stop("immediate" if immediate else "fast")
        self.start()

    def sql(self, statement: str, database: str = "postgres") -> str:
        done = self._as_user("psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", USER, "-d", database,
                             "-tAc", statement)
        return done.stdout.strip()

    def database(self, name: str) -> str:
        """A new empty database `name`; its URL."""
        self.sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.sql(f'CREATE DATABASE "{name}"')
        return self.url(name)


@contextlib.contextmanager
def postgres() -> Iterator[Postgres]:
    if bindir() is None:
        raise RuntimeError("PostgreSQL is not installed (Debian's package `postgresql`)")
    folder = Path(tempfile.mkdtemp(prefix="mnist-pg-"))
    user = pwd.getpwnam(USER)
    os.chown(folder, user.pw_uid, user.pw_gid)
    server = Postgres(folder, free_port())
    try:
        server._as_user("initdb", "-D", str(server.data), "-A", "trust", "-U", USER, "--no-sync")
        server.start()
        yield server
    finally:
        server.stop("immediate")
        shutil.rmtree(folder, ignore_errors=True)
