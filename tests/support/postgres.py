"""A PostgreSQL database per test session and a schema per test, made and dropped;
and a private PostgreSQL server for a test that restarts it.

The machine's PostgreSQL (127.0.0.1:5432, trust auth) holds one database per test
session (`session_database`), dropped at the end; each test that asks gets a schema of
its own in it (`schema`): its URL carries `?search_path=...`, which asyncpg passes to
the server as a setting, so the store's tables land in that schema and every process
given the URL (a coordinator, its standby) sees the same ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from tests.support.artifacts import free_port

SERVER = os.environ.get("LOCKSTEP_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")


async def _admin(sql: str, database: str = "postgres") -> None:
    conn = await asyncpg.connect(f"{SERVER}/{database}", timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _admin_now(sql: str, database: str = "postgres") -> None:
    """`_admin`, from synchronous code that may run inside an event loop (a fixture)."""
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, _admin(sql, database)).result()


@contextmanager
def session_database() -> Iterator[str]:
    """A fresh database; yields its URL and drops it (and every connection to it) after."""
    name = f"lockstep_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    _admin_now(f'CREATE DATABASE "{name}"')
    try:
        yield f"{SERVER}/{name}"
    finally:
        _admin_now(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@asynccontextmanager
async def schema(database_url: str, label: str) -> AsyncIterator[str]:
    """A fresh schema in the session's database; yields a URL whose tables live in it."""
    name, database = _schema_name(label), database_url.rsplit("/", 1)[1]
    await _admin(f'CREATE SCHEMA "{name}"', database)
    try:
        yield f"{database_url}?search_path={name}"
    finally:
        await _admin(f'DROP SCHEMA "{name}" CASCADE', database)


@contextmanager
def schema_now(database_url: str, label: str) -> Iterator[str]:
    """`schema`, for synchronous tests (the end-to-end and HA tiers). Stop every process
    that uses it before leaving."""
    name, database = _schema_name(label), database_url.rsplit("/", 1)[1]
    _admin_now(f'CREATE SCHEMA "{name}"', database)
    try:
        yield f"{database_url}?search_path={name}"
    finally:
        _admin_now(f'DROP SCHEMA "{name}" CASCADE', database)


def _schema_name(label: str) -> str:
    return f"t_{label[:30].lower().replace('-', '_')}_{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class Server:
    """A PostgreSQL server of a test's own (`private_server`): restart it at will."""

    data: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def ctl(self, *args: str) -> None:
        _as_postgres([_bin("pg_ctl"), "-D", str(self.data), "-w", "-t", "60", *args])

    def restart(self) -> None:
        """Stop at once (no clean shutdown: connections are cut, as in a crash) and
        start again."""
        self.ctl("-m", "immediate", "stop")
        self.start()

    def start(self) -> None:
        self.ctl("-o", f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1",
                 "-l", str(self.data / "server.log"), "start")  # fmt: skip


@contextmanager
def private_server() -> Iterator[Server]:
    """initdb in a temp dir of its own (owned by the postgres user: PostgreSQL refuses to
    run as root, and a test's tmp_path is closed to other users), trust auth on
    127.0.0.1, a free port; stopped and removed afterwards."""
    data = Path(tempfile.mkdtemp(prefix="lockstep-pg-"))
    try:
        if os.geteuid() == 0:
            shutil.chown(data, "postgres")
        _as_postgres([_bin("initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"])
        server = Server(data, free_port())
        server.start()
        try:
            yield server
        finally:
            with contextlib.suppress(subprocess.CalledProcessError):
                server.ctl("-m", "immediate", "stop")
    finally:
        shutil.rmtree(data, ignore_errors=True)


def _as_postgres(command: list[str]) -> None:
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    subprocess.run([*prefix, *command], check=True, capture_output=True, timeout=120)


def _bin(name: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if not found:
        raise RuntimeError(f"no PostgreSQL {name} under /usr/lib/postgresql")
    return str(found[-1])
