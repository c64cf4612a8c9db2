"""Writes to a coordinator store behind its back, for either backend (`store_at`)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import asyncpg

from coordinator.store.postgres import translate


async def behind(where: str | Path, sql: str) -> None:
    """Run `sql` (SQLite's spelling) on its own connection to the store at `where`, and
    commit: what another process, or an older lockstep, would have written."""
    if isinstance(where, Path):
        with sqlite3.connect(where) as db:
            db.executescript(sql)
        return
    conn = await asyncpg.connect(where)
    try:
        await conn.execute(translate(sql))
    finally:
        await conn.close()
