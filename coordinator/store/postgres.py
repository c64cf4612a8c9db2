"""The store on PostgreSQL (asyncpg), which standby coordinators share (issue 10).

`coordinator.store.db.open_db` opens it for a `postgresql://` URL; asyncpg comes with
the extra `lockstep[postgres]`. Any query parameter of the URL that asyncpg does not
know is a server setting (`?search_path=mine` keeps a test's tables in a schema of its
own). The store's SQL is SQLite's; `translate` rewrites the few spellings PostgreSQL
has other words for, once per statement. One connection, used by one call at a time;
a write opens a transaction and `commit` ends it, as in SQLite (each store method's
transaction is alone on the connection: `coordinator.store.db`). The fence takes the
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
from shared.errors import Fenced, StoreUnavailable

LOST = (OSError, TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
        asyncpg.OperatorInterventionError)  # fmt: skip
"""What a lost, refused, timed-out or administratively ended connection raises
(OperatorInterventionError: the server shutting down, or cannot connect now)."""
CONNECT_TIMEOUT = 10.0
COMMAND_TIMEOUT = 30.0
"""A statement that has not answered by then counts as a lost connection."""
SETTINGS = {"idle_in_transaction_session_timeout": "5000"}
"""A coordinator stalled inside a transaction (SIGSTOP between the fence check and the
commit) would hold the lease row against a standby's takeover: the server ends such a
session after 5 s."""
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
            self._tx = None  # a transaction open on it died with it
            try:
                self._conn = await asyncpg.connect(
                    self.url, timeout=CONNECT_TIMEOUT, command_timeout=COMMAND_TIMEOUT,
                    server_settings=SETTINGS,
                )  # fmt: skip
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
                result = await call(conn)
            except LOST as e:
                self._tx = None
                await _close(conn)
                raise StoreUnavailable(f"PostgreSQL: {e}") from e
            except BaseException:
                await self._rollback(conn)
                raise
            return result

    async def _fetch(self, sql: str, *args: Any) -> list[Row]:
        text = translate(sql)
        return list(await self._run(_writes(text), lambda c: c.fetch(text, *args)))

    async def _execute(self, sql: str, *args: Any) -> int:
        text = translate(sql)
        status = await self._run(True, lambda c: c.execute(text, *args))
        count = str(status).rsplit(" ", 1)[-1]
        return int(count) if count.isdigit() else 0

    async def _executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        text, args = translate(sql), list(rows)
        if args:
            await self._run(True, lambda c: c.executemany(text, args))

    @property
    def in_transaction(self) -> bool:
        return self._tx is not None

    async def _commit(self) -> None:
        await self._run(False, self._end)

    async def _fenced_commit(self) -> None:
        """The epoch check and the commit in one go: no other call between them."""

        async def check_and_commit(conn: asyncpg.Connection) -> None:
            if self.epoch is not None:
                row = await conn.fetchrow(self.fence_sql)
                held = None if row is None else row["epoch"]
                if held != self.epoch:
                    raise Fenced(self.epoch, held)  # rolled back by _run
            await self._end(conn)

        try:
            await self._run(False, check_and_commit)
        except Fenced as e:
            self._refused(e.held)

    async def _end(self, _: asyncpg.Connection) -> None:
        tx, self._tx = self._tx, None
        if tx is not None:
            await tx.commit()

    async def rollback(self) -> None:
        async with self._lock:
            if self._conn is not None:
                await self._rollback(self._conn)

    async def _rollback(self, conn: asyncpg.Connection) -> None:
        tx, self._tx = self._tx, None
        if tx is None:
            return
        if not conn.is_closed():
            try:
                await tx.rollback()
            except LOST:
                await _close(conn)

    async def lock_schema(self) -> None:
        await self._execute("SELECT pg_advisory_xact_lock(?)", SCHEMA_LOCK)

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


_MAX2 = re.compile(r"\bMAX\(([^(),]+),([^(),]+)\)", re.IGNORECASE)
_IGNORE = re.compile(r"^\s*INSERT OR IGNORE INTO", re.IGNORECASE)
_RETURNING = re.compile(r"\s+RETURNING\s", re.IGNORECASE)


@lru_cache(maxsize=512)
def translate(sql: str) -> str:
    """SQLite's spelling of `sql` in PostgreSQL's: `$n` placeholders, GREATEST for a
    two-argument MAX of plain arguments (GREATEST ignores a NULL where SQLite's MAX
    returns NULL: the store never passes one), `ON CONFLICT DO NOTHING` for INSERT OR
    IGNORE (before a RETURNING clause). Pure."""
    text = _MAX2.sub(r"GREATEST(\1,\2)", sql)
    if _IGNORE.match(text):
        text = _IGNORE.sub("INSERT INTO", text)
        found = _RETURNING.search(text)
        at = found.start() if found else len(text.rstrip().rstrip(";"))
        text = f"{text[:at]} ON CONFLICT DO NOTHING{text[at:]}"
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
