"""The store on PostgreSQL (asyncpg), which standby coordinators share (issue 10).

`coordinator.store.db.open_db` opens it for a `postgresql://` URL; asyncpg comes with
the extra `lockstep[postgres]`. Any query parameter of the URL that asyncpg does not
know is a server setting (`?search_path=mine` keeps a test's tables in a schema of its
own). The store's SQL is SQLite's; `translate` rewrites the few spellings PostgreSQL
has other words for, once per statement. One connection, used by one call at a time;
a write opens a transaction and `commit` ends it, as in SQLite. The fence takes the
lease row `FOR SHARE`, so a takeover (which updates that row) waits for a commit that
passed the check, and every later commit of the former leader sees the new epoch.

A lost connection (PostgreSQL restarted, the network) loses the open transaction, as
a crash would: the call raises `StoreUnavailable` (transient: the delivery that caused
it is requeued), and the next call connects again.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any

import asyncpg

from coordinator.store.db import Db, Row
from shared.errors import StoreUnavailable

LOST = (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
        asyncpg.CannotConnectNowError)  # fmt: skip
"""What a lost or refused connection raises."""
CONNECT_TIMEOUT = 10.0
SCHEMA_LOCK = 0x6C6F636B  # "lock": the advisory lock that migrations take


class PostgresDb(Db):
    dialect = "postgresql"
    now_sql = "extract(epoch from clock_timestamp())::float8"
    fence_sql = "SELECT epoch FROM lease WHERE name = 'coordinator' FOR SHARE"

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        self._conn: asyncpg.Connection | None = None
        self._tx: Any = None
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, url: str) -> PostgresDb:
        db = cls(url)
        async with db._lock:
            await db._connection()
        return db

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._tx = None
            try:
                self._conn = await asyncpg.connect(self.url, timeout=CONNECT_TIMEOUT)
            except LOST as e:
                raise StoreUnavailable(f"PostgreSQL: {e}") from e
        return self._conn

    async def _run(self, write: bool, call: Any) -> Any:
        """`call(connection)`, alone; in a transaction opened first if `write`."""
        async with self._lock:
            conn = await self._connection()
            try:
                if write and self._tx is None:
                    self._tx = conn.transaction()
                    await self._tx.start()
                return await call(conn)
            except LOST as e:
                self._tx = None
                await _close(conn)
                raise StoreUnavailable(f"PostgreSQL: {e}") from e
            except BaseException:
                await self._rollback(conn)
                raise

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        text = translate(sql)
        return list(await self._run(_writes(text), lambda c: c.fetch(text, *args)))

    async def execute(self, sql: str, *args: Any) -> int:
        text = translate(sql)
        status = await self._run(True, lambda c: c.execute(text, *args))
        count = str(status).rsplit(" ", 1)[-1]
        return int(count) if count.isdigit() else 0

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        text, args = translate(sql), list(rows)
        if args:
            await self._run(True, lambda c: c.executemany(text, args))

    @property
    def in_transaction(self) -> bool:
        return self._tx is not None

    async def _commit(self) -> None:
        async def commit(_: asyncpg.Connection) -> None:
            tx, self._tx = self._tx, None
            if tx is not None:
                await tx.commit()

        await self._run(False, commit)

    async def rollback(self) -> None:
        async with self._lock:
            if self._conn is not None:
                await self._rollback(self._conn)

    async def _rollback(self, conn: asyncpg.Connection) -> None:
        tx, self._tx = self._tx, None
        if tx is not None and not conn.is_closed():
            try:
                await tx.rollback()
            except LOST:
                await _close(conn)

    async def lock_schema(self) -> None:
        await self.execute("SELECT pg_advisory_xact_lock(?)", SCHEMA_LOCK)

    async def close(self) -> None:
        async with self._lock:
            if self._conn is not None:
                await self._rollback(self._conn)
                await _close(self._conn)
                self._conn = None


async def _close(conn: asyncpg.Connection) -> None:
    try:
        await asyncio.wait_for(conn.close(), 2.0)
    except (*LOST, TimeoutError):
        conn.terminate()


_MAX2 = re.compile(r"\bMAX\(([^(),]+),([^(),]+)\)")
_IGNORE = re.compile(r"^\s*INSERT OR IGNORE INTO", re.IGNORECASE)


@lru_cache(maxsize=512)
def translate(sql: str) -> str:
    """SQLite's spelling of `sql` in PostgreSQL's: `$n` placeholders, GREATEST for a
    two-argument MAX, `ON CONFLICT DO NOTHING` for INSERT OR IGNORE. Pure."""
    text = _MAX2.sub(r"GREATEST(\1,\2)", sql)
    if _IGNORE.match(text):
        text = _IGNORE.sub("INSERT INTO", text) + " ON CONFLICT DO NOTHING"
    out, n, quoted = [], 0, False
    for ch in text:
        if ch == "'":
            quoted = not quoted
        if ch == "?" and not quoted:
            n += 1
            out.append(f"${n}")
        else:
            out.append(ch)
    return "".join(out)


def _writes(sql: str) -> bool:
    """Whether a statement that returns rows writes too (INSERT ... RETURNING)."""
    return not sql.lstrip().upper().startswith("SELECT")
