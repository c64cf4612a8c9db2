"""The coordinator store's schema, its one connection, and what every table shares.

`coordinator.store.Store.open` calls `connect`; each concern's methods live in a
module of their own (catalog, deployments, agents, events) on top of `Table`, and all
of them share the one aiosqlite connection, so a transaction may span concerns (a
deployment's outcome, its release and its events are saved together).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiosqlite

_SCHEMA = """
CREATE TABLE IF NOT EXISTS catalog (
    name TEXT NOT NULL, version TEXT NOT NULL, spec TEXT NOT NULL, digest TEXT NOT NULL,
    registered_at REAL NOT NULL, PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS releases (
    id INTEGER PRIMARY KEY AUTOINCREMENT, services TEXT NOT NULL, state TEXT NOT NULL,
    created_at REAL NOT NULL, deployment_id TEXT);
CREATE TABLE IF NOT EXISTS fleet (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS deployments (
    id TEXT PRIMARY KEY, request_id TEXT UNIQUE, release_id INTEGER, from_release_id INTEGER,
    trigger TEXT NOT NULL, state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '',
    services TEXT NOT NULL, plan TEXT NOT NULL, machine TEXT NOT NULL,
    started_at REAL NOT NULL, ended_at REAL,
    kind TEXT NOT NULL DEFAULT 'deploy', new_release INTEGER NOT NULL DEFAULT 1,
    requested_by TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS participants (
    deployment_id TEXT NOT NULL, host TEXT NOT NULL, service TEXT NOT NULL,
    version TEXT NOT NULL, from_version TEXT, phase TEXT NOT NULL, reason TEXT NOT NULL,
    PRIMARY KEY (deployment_id, host, service));
CREATE TABLE IF NOT EXISTS agents (
    host_id TEXT PRIMARY KEY, labels TEXT NOT NULL, services TEXT NOT NULL,
    last_seen REAL NOT NULL, first_seen REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'alive', overwrite INTEGER NOT NULL DEFAULT 0,
    reported_at REAL NOT NULL DEFAULT 0, public_key TEXT NOT NULL DEFAULT '',
    key_state TEXT NOT NULL DEFAULT 'pending', heartbeat_interval REAL);
CREATE TABLE IF NOT EXISTS timers (
    deployment_id TEXT NOT NULL, token TEXT NOT NULL, due_at REAL NOT NULL,
    PRIMARY KEY (deployment_id, token));
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, type TEXT NOT NULL,
    deployment_id TEXT, data TEXT NOT NULL);
"""

_ADDED_COLUMNS = {
    "agents": (
        ("public_key", "TEXT NOT NULL DEFAULT ''"),
        ("key_state", "TEXT NOT NULL DEFAULT 'pending'"),
        ("heartbeat_interval", "REAL"),
    ),
    "deployments": (("requested_by", "TEXT NOT NULL DEFAULT ''"),),
}
"""Columns added after a table first shipped: added to an older database on open."""


async def connect(path: Path) -> aiosqlite.Connection:
    """Open the database at `path`: WAL, `synchronous=FULL`, the schema created and an
    older database's tables given the columns added since (`_ADDED_COLUMNS`)."""
    db = await aiosqlite.connect(path)
    db.row_factory = aiosqlite.Row
    await db.execute("PRAGMA journal_mode=WAL")
    await db.execute("PRAGMA synchronous=FULL")
    await db.executescript(_SCHEMA)
    for table, columns in _ADDED_COLUMNS.items():
        async with db.execute(f"PRAGMA table_info({table})") as cursor:
            have = {row["name"] for row in await cursor.fetchall()}
        for name, decl in columns:
            if name not in have:
                await db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")
    await db.commit()
    return db


class Table:
    """What every part of the store shares: the connection and a query helper."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db
        self.agents_changed = 0
        """Bumped by every write to the agents table but the liveness flush: a reader
        that keeps agent records knows when to read them again (coordinator.liveness)."""

    async def _rows(self, sql: str, *args: Any) -> list[aiosqlite.Row]:
        return list(await self._db.execute_fetchall(sql, args))
