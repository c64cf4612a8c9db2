"""The store's one connection to its database, SQLite or PostgreSQL, behind one interface.

`coordinator.store.Store.open` calls `open_db` with `--db`: a path (SQLite through
aiosqlite, the embedded default) or a `postgresql://` URL (asyncpg, the extra
`lockstep[postgres]`, which standby coordinators share; `coordinator.store.postgres`).
The tables' SQL is written once, in SQLite's dialect with `?` placeholders;
`coordinator.store.postgres` translates the few spellings PostgreSQL has its own
words for.

Transactions: every store method that writes runs in `transaction()` (the
`coordinator.store.base.transaction` decorator), one at a time: the connection is
shared by many coroutines, and while one method's transaction is open no other
coroutine's statement runs on it (it waits its turn), so a transaction holds the
writes of that one method only, and nobody reads them before they are committed. The
method's statements are committed together when it returns, and rolled back together
if it raises (a failed statement, a lost connection, `Fenced`): no half-written
method is ever saved, and its caller always learns of the failure. A statement outside
any transaction (a read, mostly) also waits for its turn, and a write there commits
at once.

Fencing (SPEC 5, issue 10): once a coordinator holds the lease (`coordinator.lease`)
its epoch is set here (`fence`), and every commit first checks, inside the same
transaction, that the lease still carries that epoch. A stalled former leader whose
lease was taken over finds its transaction rolled back and `Fenced` raised: none of
its writes land, and it sends nothing that depends on them.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn, Protocol

import aiosqlite

from shared.errors import Fenced, StoreUnavailable


class Row(Protocol):
    """A result row, read by column name (sqlite3.Row, asyncpg.Record)."""

    def __getitem__(self, key: str, /) -> Any: ...


class Db(abc.ABC):
    """One database connection: statements, transactions, and the fence on commit."""

    dialect: str
    now_sql: str
    """The database's clock in SQL, as Unix seconds (the lease is judged by it)."""
    fence_sql = "SELECT epoch FROM lease WHERE name = 'coordinator'"

    def __init__(self) -> None:
        self.epoch: int | None = None
        """The lease epoch every commit is conditional on (None: not fenced)."""
        self.on_fenced: Callable[[], None] | None = None
        self._turn = asyncio.Lock()
        self._owner: asyncio.Task[Any] | None = None
        """The task whose transaction is open (its statements need no turn)."""

    def fence(self, epoch: int | None, on_fenced: Callable[[], None] | None = None) -> None:
        """Make every later commit conditional on the lease's `epoch`; `on_fenced` is
        called when one is refused."""
        self.epoch, self.on_fenced = epoch, on_fenced

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """The calling task's statements, alone on the connection, committed (fenced)
        when the block ends, rolled back if it raises. Inside another transaction of
        the same task, part of that one."""
        task = asyncio.current_task()
        if task is not None and task is self._owner:
            yield
            return
        async with self._turn:
            self._owner = task
            try:
                try:
                    yield
                except BaseException:
                    with contextlib.suppress(Exception):
                        await self.rollback()
                    raise
                await self.commit()
            finally:
                self._owner = None

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        async with self._statement():
            return await self._fetch(sql, *args)

    async def execute(self, sql: str, *args: Any) -> int:
        """Run one statement; the number of rows it changed."""
        async with self._statement():
            return await self._execute(sql, *args)

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        async with self._statement():
            await self._executemany(sql, rows)

    async def insert(self, sql: str, *args: Any) -> int:
        """Run an INSERT that ends `RETURNING id`; the new row's id."""
        rows = await self.fetch(sql, *args)
        return int(rows[0]["id"])

    @contextlib.asynccontextmanager
    async def _statement(self) -> AsyncIterator[None]:
        """One statement: in the caller's transaction, or, outside one, in its own turn
        (a write there committed at once, a failure rolled back)."""
        task = asyncio.current_task()
        if task is not None and task is self._owner:
            yield
            return
        async with self._turn:
            try:
                yield
            except BaseException:
                if self.in_transaction:
                    with contextlib.suppress(Exception):
                        await self.rollback()
                raise
            if self.in_transaction:
                await self.commit()

    async def commit(self) -> None:
        """End the open transaction, if any: refused (`Fenced`, rolled back) when the
        lease moved past `epoch`."""
        if self.in_transaction:
            await self._fenced_commit()

    async def _fenced_commit(self) -> None:
        """Check the epoch in the open transaction, then commit it (or roll it back)."""
        if self.epoch is not None:
            rows = await self._fetch(self.fence_sql)
            held = rows[0]["epoch"] if rows else None
            if held != self.epoch:
                await self.rollback()
                self._refused(held)
        await self._commit()

    def _refused(self, held: int | None) -> NoReturn:
        assert self.epoch is not None
        if self.on_fenced is not None:
            self.on_fenced()
        raise Fenced(self.epoch, held)

    @abc.abstractmethod
    async def _fetch(self, sql: str, *args: Any) -> list[Row]: ...

    @abc.abstractmethod
    async def _execute(self, sql: str, *args: Any) -> int: ...

    @abc.abstractmethod
    async def _executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...

    @property
    @abc.abstractmethod
    def in_transaction(self) -> bool: ...

    @abc.abstractmethod
    async def _commit(self) -> None: ...

    @abc.abstractmethod
    async def rollback(self) -> None: ...

    @abc.abstractmethod
    async def lock_schema(self) -> None:
        """Inside a transaction: hold the schema alone until it ends (migrations)."""

    @abc.abstractmethod
    async def close(self) -> None: ...


class SqliteDb(Db):
    """aiosqlite: WAL, `synchronous=FULL` (a saved decision survives a power cut)."""

    dialect = "sqlite"
    now_sql = "((julianday('now') - 2440587.5) * 86400.0)"

    def __init__(self, db: aiosqlite.Connection) -> None:
        super().__init__()
        self._db = db

    @classmethod
    async def open(cls, path: Path) -> SqliteDb:
        db = await aiosqlite.connect(path)
        db.row_factory = aiosqlite.Row
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=FULL")
        await db.execute("PRAGMA busy_timeout=10000")  # a standby on the same file
        return cls(db)

    async def _fetch(self, sql: str, *args: Any) -> list[Row]:
        try:
            rows: list[Row] = list(await self._db.execute_fetchall(sql, args))
        except Exception as e:
            raise _translated(e) from e
        return rows

    async def _execute(self, sql: str, *args: Any) -> int:
        try:
            cursor = await self._db.execute(sql, args)
        except Exception as e:
            raise _translated(e) from e
        return cursor.rowcount

    async def _executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        try:
            await self._db.executemany(sql, rows)
        except Exception as e:
            raise _translated(e) from e

    @property
    def in_transaction(self) -> bool:
        return self._db.in_transaction

    async def _commit(self) -> None:
        try:
            await self._db.commit()
        except Exception as e:
            with contextlib.suppress(Exception):
                await self._db.rollback()
            raise _translated(e) from e

    async def rollback(self) -> None:
        await self._db.rollback()

    async def lock_schema(self) -> None:
        await self._execute("BEGIN IMMEDIATE")

    async def close(self) -> None:
        await self._db.close()


def _translated(error: Exception) -> Exception:
    """SQLite's "locked" or "busy" (another process holds the file: a coordinator on the
    same file, a backup) as a transient `StoreUnavailable`; anything else as it is."""
    text = str(error).lower()
    if isinstance(error, sqlite3.OperationalError) and ("locked" in text or "busy" in text):
        return StoreUnavailable(f"SQLite: {error}")
    return error


def is_url(where: str | Path) -> bool:
    """Whether `--db` names a PostgreSQL database rather than a SQLite file."""
    return isinstance(where, str) and where.startswith(("postgresql://", "postgres://"))


async def open_db(where: str | Path) -> Db:
    """The database `where` names: a `postgresql://` URL, else a SQLite file's path."""
    if is_url(where):
        from coordinator.store import postgres  # asyncpg: only with lockstep[postgres]

        return await postgres.PostgresDb.open(str(where))
    return await SqliteDb.open(Path(where))
