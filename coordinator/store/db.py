"""The store's one connection to its database, SQLite or PostgreSQL, behind one interface.

`coordinator.store.Store.open` calls `open_db` with `--db`: a path (SQLite through
aiosqlite, the embedded default) or a `postgresql://` URL (asyncpg, the extra
`lockstep[postgres]`, which standby coordinators share; `coordinator.store.postgres`).
The tables' SQL is written once, in SQLite's dialect with `?` placeholders;
`coordinator.store.postgres` translates the few spellings PostgreSQL has its own
words for.

Both behave like Python's sqlite3: a write opens a transaction, `commit` ends it, and
a statement that fails (or a lost connection) rolls back the whole transaction it was
part of, so a caller's half-written transaction can never be committed by whoever
commits next (PostgreSQL refuses anything after a failed statement anyway). Both are
used by many coroutines at once, each call whole, so one transaction may hold the
writes of several store methods; a method whose writes were rolled back that way
learns it at its `commit` (`StoreUnavailable`, transient: the delivery it was
handling is requeued), never from a commit that silently saved nothing.

Fencing (SPEC 5, issue 10): once a coordinator holds the lease (`coordinator.lease`)
its epoch is set here (`fence`), and every commit first checks, inside the same
transaction, that the lease still carries that epoch. A stalled former leader whose
lease was taken over finds its transaction rolled back and `Fenced` raised: none of
its writes land, and it sends nothing that depends on them.
"""

from __future__ import annotations

import abc
import asyncio
import sqlite3
import weakref
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn, Protocol

import aiosqlite

from shared.errors import Fenced, StoreUnavailable

LOST_KEPT = 1000
"""How many rolled-back transactions are remembered (their writers commit soon after)."""


class Row(Protocol):
    """A result row, read by column name (sqlite3.Row, asyncpg.Record)."""

    def __getitem__(self, key: str, /) -> Any: ...


class Db(abc.ABC):
    """One database connection: statements, transactions, and the fence on commit."""

    dialect: str
    now_sql: str
    """The database's clock in SQL, as Unix seconds (the lease is judged by it)."""

    def __init__(self) -> None:
        self.epoch: int | None = None
        """The lease epoch every commit is conditional on (None: not fenced)."""
        self.on_fenced: Callable[[], None] | None = None
        self._open = 0
        """The number of the transaction open now (0: none)."""
        self._numbered = 0
        self._lost: set[int] = set()
        """Transactions rolled back by a failure (the newest LOST_KEPT)."""
        self._joined: weakref.WeakKeyDictionary[asyncio.Task[Any], int] = (
            weakref.WeakKeyDictionary()
        )
        """The transaction each task last ran a statement in."""

    def _joins(self, in_transaction: bool) -> None:
        """After a statement: the calling task took part in the open transaction."""
        if not in_transaction:
            return
        if not self._open:
            self._numbered += 1
            self._open = self._numbered
        task = asyncio.current_task()
        if task is not None:
            self._joined[task] = self._open

    def _ends(self, *, lost: bool) -> None:
        """The open transaction was committed, or (`lost`) rolled back."""
        if self._open and lost:
            self._lost.add(self._open)
            if len(self._lost) > LOST_KEPT:
                self._lost.discard(min(self._lost))
        self._open = 0

    def fence(self, epoch: int | None, on_fenced: Callable[[], None] | None = None) -> None:
        """Make every later commit conditional on the lease's `epoch`; `on_fenced` is
        called when one is refused."""
        self.epoch, self.on_fenced = epoch, on_fenced

    @abc.abstractmethod
    async def fetch(self, sql: str, *args: Any) -> list[Row]: ...

    @abc.abstractmethod
    async def execute(self, sql: str, *args: Any) -> int:
        """Run one statement; the number of rows it changed."""

    @abc.abstractmethod
    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...

    async def insert(self, sql: str, *args: Any) -> int:
        """Run an INSERT that ends `RETURNING id`; the new row's id."""
        rows = await self.fetch(sql, *args)
        return int(rows[0]["id"])

    async def commit(self) -> None:
        """End the open transaction, if any: refused (`Fenced`, rolled back) when the
        lease moved past `epoch`; `StoreUnavailable` if the calling task's writes were
        in a transaction that a failure rolled back."""
        task = asyncio.current_task()
        joined = self._joined.pop(task, None) if task is not None else None
        if joined is not None and joined in self._lost:
            raise StoreUnavailable(
                "this write's transaction was rolled back (a statement failed, or the "
                "connection was lost): nothing of it was saved"
            )
        if not self.in_transaction:
            return
        await self._fenced_commit()

    async def _fenced_commit(self) -> None:
        """Check the epoch in the open transaction, then commit it (or roll it back)."""
        if self.epoch is not None:
            rows = await self.fetch(self.fence_sql)
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

    fence_sql = "SELECT epoch FROM lease WHERE name = 'coordinator'"

    @property
    @abc.abstractmethod
    def in_transaction(self) -> bool: ...

    @abc.abstractmethod
    async def _commit(self) -> None: ...

    @abc.abstractmethod
    async def rollback(self) -> None: ...

    @abc.abstractmethod
    async def lock_schema(self) -> None:
        """Open a transaction that holds the schema alone until it ends (migrations)."""

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

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        try:
            rows: list[Row] = list(await self._db.execute_fetchall(sql, args))
        except Exception as e:
            await self.rollback()
            raise _translated(e) from e
        self._joins(self._db.in_transaction)
        return rows

    async def execute(self, sql: str, *args: Any) -> int:
        try:
            cursor = await self._db.execute(sql, args)
        except Exception as e:
            await self.rollback()
            raise _translated(e) from e
        self._joins(self._db.in_transaction)
        return cursor.rowcount

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        try:
            await self._db.executemany(sql, rows)
        except Exception as e:
            await self.rollback()
            raise _translated(e) from e
        self._joins(self._db.in_transaction)

    @property
    def in_transaction(self) -> bool:
        return self._db.in_transaction

    async def _commit(self) -> None:
        try:
            await self._db.commit()
        except Exception as e:
            await self.rollback()
            raise _translated(e) from e
        self._ends(lost=False)

    async def rollback(self) -> None:
        await self._db.rollback()
        self._ends(lost=True)

    async def lock_schema(self) -> None:
        await self.execute("BEGIN IMMEDIATE")

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
