"""The agent store's one SQLite connection: opened, its tables created and migrated.

`agent.store.tables.Store.open` calls `connect`. The connection is in autocommit
mode (`isolation_level=None`): each write is ONE statement that commits itself, so it
costs one trip to aiosqlite's thread and one fsync (WAL, `synchronous=FULL`), not an
`execute` and a `commit`. A fleet benchmark worker hosts hundreds of agents in one
process, where every trip wakes one of hundreds of threads (measured here: 47 us of
CPU a trip for one connection, 200 us or more with 250 busy ones). What must change
together is written by one statement (a trigger records a command's id with it).
"""

from __future__ import annotations

from pathlib import Path

import aiosqlite

from agent.schema import ADDED_COLUMNS, SCHEMA


async def connect(path: Path) -> aiosqlite.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = await aiosqlite.connect(path, isolation_level=None)
    db.row_factory = aiosqlite.Row
    await db.execute("PRAGMA journal_mode=WAL")
    await db.execute("PRAGMA synchronous=FULL")
    await db.executescript(SCHEMA)
    await _add_columns(db)
    return db


async def _add_columns(db: aiosqlite.Connection) -> None:
    for table, columns in ADDED_COLUMNS.items():
        have = {row["name"] for row in await db.execute_fetchall(f"PRAGMA table_info({table})")}
        for name, decl in columns:
            if name not in have:
                await db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")
