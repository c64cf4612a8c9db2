"""The agent's state tables: transactions and services (and, from
`agent.store.switches`, `current` switches and crash loops).

`Store.open` opens the agent's one SQLite file (`agent.store.base.connect`: WAL,
synchronous=FULL, one statement per write) and makes its command log
(`store.commands`, agent/store/commands.py). The steps record transactions, what
runs, and every `current` switch; the crash guard records crash loops, so a restarted
agent leaves such a service down.

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
from agent.store.base import connect
from agent.store.commands import CommandLog
from agent.store.switches import SwitchTable
from shared.messages import Health
from shared.specs import ServiceVersion

TxnState = Literal[
    "preparing", "prepared", "no", "committed", "commit_failed", "aborted", "reverted",
    "revert_failed",
]  # fmt: skip


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


class Store(SwitchTable):
    """The agent's SQLite store; open with `await Store.open(path)`."""

    def __init__(self, db: aiosqlite.Connection, commands: CommandLog) -> None:
        self._db = db
        self.commands = commands
        """The durable command log, in the same file and on the same connection."""
        self._services: dict[str, ServiceRow] = {}
        """The services table, written through (this process alone writes it)."""

    @classmethod
    async def open(cls, path: Path) -> Store:
        db = await connect(path)
        store = cls(db, await CommandLog.load(db))
        rows = await db.execute_fetchall("SELECT * FROM services")
        store._services = {row["service"]: _service(row) for row in rows}
        await store._load_switches()
        return store

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

    async def set_txn_state(self, deployment_id: str, service: str, state: TxnState) -> None:
        await self._db.execute(
            "UPDATE txns SET state = ?, updated_at = ? WHERE deployment_id = ? AND service = ?",
            (state, time.time(), deployment_id, service),
        )

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
        self._services[row.service] = row

    async def set_health(self, service: str, health: Health) -> None:
        await self._db.execute(
            "UPDATE services SET health = ? WHERE service = ?", (health, service)
        )
        row = self._services.get(service)
        if row is not None:
            self._services[service] = replace(row, health=health)

    async def delete_service(self, service: str) -> None:
        await self._db.execute("DELETE FROM services WHERE service = ?", (service,))
        self._services.pop(service, None)

    async def services(self) -> list[ServiceRow]:
        return [self._services[name] for name in sorted(self._services)]

    async def service(self, name: str) -> ServiceRow | None:
        return self._services.get(name)


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
