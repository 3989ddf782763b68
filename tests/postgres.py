"""A real PostgreSQL server for the library tests: ``initdb`` in a temporary folder (as ``nobody`` when the
tests run as root, since PostgreSQL refuses to run as root), ``pg_ctl start`` on a free loopback port, stopped
and removed after the session. Each test gets a database of its own on it."""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

PG_BIN_DIRS = ("/usr/lib/postgresql/15/bin", "/usr/local/bin", "/usr/bin")
_counter = itertools.count()


def pg_tool(name: str) -> str:
    for folder in PG_BIN_DIRS:
        if (Path(folder) / name).exists():
            return str(Path(folder) / name)
    found = shutil.which(name)
    if not found:  # make test and .ci/run install Debian's postgresql: missing is a broken set-up, not a skip
        raise FileNotFoundError(f"{name} not found: install Debian's postgresql package")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_user() -> dict:
    if os.geteuid() != 0:
        return {}
    return {"user": "nobody", "group": "nogroup"}


@pytest.fixture(scope="session")
def postgres_server():
    """The base URL (without a database name) of a PostgreSQL server on 127.0.0.1."""
    import pwd

    base = Path(tempfile.mkdtemp(prefix="pinsface-pg-"))
    who = _as_user()
    if who:
        entry = pwd.getpwnam(who["user"])
        os.chown(base, entry.pw_uid, entry.pw_gid)
    data, log, port = base / "data", base / "server.log", free_port()
    run = {"check": True, "capture_output": True, "timeout": 120, **who}
    subprocess.run(
        [pg_tool("initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"], **run
    )
    options = f"-h 127.0.0.1 -p {port} -k {base} -F"
    subprocess.run(
        [pg_tool("pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o", options, "start"], **run
    )
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run([pg_tool("pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"], **{**run, "check": False})
        shutil.rmtree(base, ignore_errors=True)


def new_database(server: str) -> str:
    import psycopg

    name = f"lib_{os.getpid()}_{next(_counter)}"
    with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return f"{server}/{name}"


@pytest.fixture(params=["sqlite", "postgresql"])
def library_url(request, tmp_path) -> str:
    """A fresh, empty library database: a SQLite file, or a database on the test PostgreSQL server."""
    if request.param == "sqlite":
        return str(tmp_path / "library.db")
    return new_database(request.getfixturevalue("postgres_server"))
