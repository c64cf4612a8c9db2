"""A PostgreSQL database per test session and a schema per test, made and dropped.

The machine's PostgreSQL (127.0.0.1:5432, trust auth) holds one database per test
session (`session_database`), dropped at the end; each test that asks gets a schema of
its own in it (`schema`): its URL carries `?search_path=...`, which asyncpg passes to
the server as a setting, so the store's tables land in that schema and every process
given the URL (a coordinator, its standby) sees the same ones.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager

import asyncpg

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
