"""The agent's state tables: transactions, services, crash loops, `current` switches.

`Store.open` opens the agent's one SQLite file (WAL, synchronous=FULL), creates and
migrates its tables (`agent.schema`) and makes its command log (`store.commands`,
agent/store/commands.py). The steps record transactions, what runs, and every
`current` switch; the crash guard records crash loops, so a restarted agent leaves
such a service down.

One agent process owns its store, so what runs (the `services` table, read by every
heartbeat and most steps) is also kept in memory, written through: reads cost no
query. Reads that do query take one trip to the connection's thread
(`execute_fetchall`), not three (execute, fetch, close).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import aiosqlite

from agent.driver import ProcessRecord
from agent.schema import ADDED_COLUMNS, SCHEMA
from agent.store.commands import CommandLog
from shared.messages import Health
from shared.specs import ServiceVersion

TxnState = Literal[
    "preparing", "prepared", "no", "committed", "commit_failed", "aborted", "reverted",
    "revert_failed",
]  # fmt: skip
SwitchKind = Literal["commit", "revert", "stop"]


@dataclass(frozen=True)
class Txn:
    deployment_id: str
    service: str
    version: str
    from_version: str | None
    spec: ServiceVersion
    state: TxnState
    staged_path: str | None
    rollback: bool = False
    """Prepared for a rollback: its commit runs the running release's before_rollback."""
    updated_at: float = 0.0
    """When the transaction last changed state (time.time(); set by the store)."""


@dataclass(frozen=True)
class ServiceRow:
    service: str
    version: str
    spec: ServiceVersion
    process: ProcessRecord | None
    release_dir: str
    health: Health


@dataclass(frozen=True)
class Switch:
    id: int
    ts: float
    service: str
    from_version: str | None
    to_version: str | None
    kind: SwitchKind
    deployment_id: str | None
    settled_at: float | None = None
    """When the switched service became healthy or failed (None while switching)."""


class Store:
    """The agent's SQLite store; open with `await Store.open(path)`."""

    def __init__(self, db: aiosqlite.Connection, services: list[ServiceRow]) -> None:
        self._db = db
        self.commands = CommandLog(db)
        """The durable command log, in the same file and on the same connection."""
        self._services = {row.service: row for row in services}
        """The services table, written through (this process alone writes it)."""

    @classmethod
    async def open(cls, path: Path) -> Store:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(path)
        db.row_factory = aiosqlite.Row
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=FULL")
        await db.executescript(SCHEMA)
        await _add_columns(db)
        await db.commit()
        rows = await db.execute_fetchall("SELECT * FROM services")
        return cls(db, [_service(row) for row in rows])

    async def close(self) -> None:
        await self._db.close()

    # --- transactions -----------------------------------------------------------

    async def put_txn(self, txn: Txn) -> None:
        await self._db.execute(
            "INSERT OR REPLACE INTO txns (deployment_id, service, version, from_version, spec,"
            " state, staged_path, rollback, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                txn.deployment_id, txn.service, txn.version, txn.from_version,
                txn.spec.model_dump_json(), txn.state, txn.staged_path, int(txn.rollback),
                time.time(),
            ),
        )  # fmt: skip
        await self._db.commit()

    async def set_txn_state(self, deployment_id: str, service: str, state: TxnState) -> None:
        await self._db.execute(
            "UPDATE txns SET state = ?, updated_at = ? WHERE deployment_id = ? AND service = ?",
            (state, time.time(), deployment_id, service),
        )
        await self._db.commit()

    async def txn(self, deployment_id: str, service: str) -> Txn | None:
        rows = await self._db.execute_fetchall(
            "SELECT * FROM txns WHERE deployment_id = ? AND service = ?", (deployment_id, service)
        )
        return next((_txn(row) for row in rows), None)

    async def txns(self, service: str | None, states: tuple[TxnState, ...]) -> list[Txn]:
        """Transactions in one of `states`, of `service` (None: of every service)."""
        marks = ", ".join("?" for _ in states)
        where, args = f"state IN ({marks})", tuple[str, ...](states)
        if service is not None:
            where, args = f"service = ? AND {where}", (service, *states)
        rows = await self._db.execute_fetchall(
            f"SELECT * FROM txns WHERE {where} ORDER BY updated_at", args
        )
        return [_txn(row) for row in rows]

    # --- services ---------------------------------------------------------------

    async def put_service(self, row: ServiceRow) -> None:
        process = row.process
        await self._db.execute(
            "INSERT OR REPLACE INTO services VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row.service, row.version, row.spec.model_dump_json(),
                process.pid if process else None, process.pgid if process else None,
                process.start_time if process else None, row.release_dir, row.health,
            ),
        )  # fmt: skip
        await self._db.commit()
        self._services[row.service] = row

    async def set_health(self, service: str, health: Health) -> None:
        await self._db.execute(
            "UPDATE services SET health = ? WHERE service = ?", (health, service)
        )
        await self._db.commit()
        row = self._services.get(service)
        if row is not None:
            self._services[service] = replace(row, health=health)

    async def delete_service(self, service: str) -> None:
        await self._db.execute("DELETE FROM services WHERE service = ?", (service,))
        await self._db.commit()
        self._services.pop(service, None)

    async def services(self) -> list[ServiceRow]:
        return [self._services[name] for name in sorted(self._services)]

    async def service(self, name: str) -> ServiceRow | None:
        return self._services.get(name)

    # --- crash loops ------------------------------------------------------------

    async def set_crash_loop(self, service: str, version: str, exits: int) -> None:
        await self._db.execute(
            "INSERT OR REPLACE INTO crash_loops VALUES (?, ?, ?, ?)",
            (service, version, exits, time.time()),
        )
        await self._db.commit()

    async def clear_crash_loop(self, service: str) -> None:
        await self._db.execute("DELETE FROM crash_loops WHERE service = ?", (service,))
        await self._db.commit()

    async def crash_looped(self, service: str) -> str | None:
        """The version of `service` left down after a crash loop, if any."""
        rows = await self._db.execute_fetchall(
            "SELECT version FROM crash_loops WHERE service = ?", (service,)
        )
        return next((str(row["version"]) for row in rows), None)

    # --- switches ---------------------------------------------------------------

    async def add_switch(
        self,
        service: str,
        from_version: str | None,
        to_version: str | None,
        kind: SwitchKind,
        deployment_id: str | None,
    ) -> int:
        """Record a switch of `current`; its id, to mark when the service settled.

        An earlier switch of the service still open is over now (a later step took the
        service over), so it is settled in the same transaction."""
        await self._db.execute(
            "UPDATE switches SET settled_at = ? WHERE service = ? AND settled_at IS NULL",
            (time.time(), service),
        )
        cursor = await self._db.execute(
            "INSERT INTO switches (ts, service, from_version, to_version, kind, deployment_id)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (time.time(), service, from_version, to_version, kind, deployment_id),
        )
        await self._db.commit()
        return int(cursor.lastrowid or 0)

    async def settle_switch(self, switch_id: int) -> None:
        """The switched service became healthy or failed: the switch is over."""
        await self._db.execute(
            "UPDATE switches SET settled_at = ? WHERE id = ?", (time.time(), switch_id)
        )
        await self._db.commit()

    async def open_switch(
        self, service: str, deployment_id: str, kind: SwitchKind
    ) -> Switch | None:
        """The newest switch of `service` by this step that never settled (the agent died
        between switching `current` and the service becoming healthy or failing)."""
        rows = await self._db.execute_fetchall(
            "SELECT * FROM switches WHERE service = ? AND deployment_id = ? AND kind = ?"
            " AND settled_at IS NULL ORDER BY id DESC LIMIT 1",
            (service, deployment_id, kind),
        )
        return next((Switch(**dict(row)) for row in rows), None)

    async def switching(self, service: str) -> Switch | None:
        """The switch of `service` still open, if any (see `open_switch`)."""
        rows = await self._db.execute_fetchall(
            "SELECT * FROM switches WHERE service = ? AND settled_at IS NULL ORDER BY id DESC"
            " LIMIT 1",
            (service,),
        )
        return next((Switch(**dict(row)) for row in rows), None)

    async def switches(self, service: str | None = None) -> list[Switch]:
        where, args = ("WHERE service = ?", (service,)) if service else ("", ())
        rows = await self._db.execute_fetchall(f"SELECT * FROM switches {where} ORDER BY id", args)
        return [Switch(**dict(row)) for row in rows]


async def _add_columns(db: aiosqlite.Connection) -> None:
    for table, columns in ADDED_COLUMNS.items():
        async with db.execute(f"PRAGMA table_info({table})") as cursor:
            have = {row["name"] for row in await cursor.fetchall()}
        for name, decl in columns:
            if name not in have:
                await db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")


def _txn(row: aiosqlite.Row) -> Txn:
    spec = ServiceVersion.model_validate_json(row["spec"])
    return Txn(
        row["deployment_id"], row["service"], row["version"], row["from_version"], spec,
        row["state"], row["staged_path"], bool(row["rollback"]), row["updated_at"],
    )  # fmt: skip


def _service(row: aiosqlite.Row) -> ServiceRow:
    process = None
    if row["pid"] is not None:
        process = ProcessRecord(row["pid"], row["pgid"], row["start_time"])
    spec = ServiceVersion.model_validate_json(row["spec"])
    return ServiceRow(
        row["service"], row["version"], spec, process, row["release_dir"], row["health"]
    )
