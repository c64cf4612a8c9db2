"""The agent's durable command log and the ids of every command it received.

`agent.service` records a command here before the transport acks it (`add` is
idempotent by envelope id and by (deployment, service, step)), marks it done with the
report it sent, and, after a restart, runs again what is still `received`; the ids
(`seen`) refuse a replayed command for as long as it would be valid. `Store.open`
makes the one `CommandLog` of a store, on the store's own SQLite connection.

The received ids are also kept in memory (this process alone writes them), so the
replay check costs no query; logging a new command is one statement, whose trigger
records its id (agent/schema.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Literal

import aiosqlite


@dataclass(frozen=True)
class CommandRecord:
    id: str
    deployment_id: str
    service: str
    step: str
    body: str
    """The command's envelope as received (JSON)."""
    state: Literal["received", "done"]
    result: dict[str, Any] | None
    """The report body sent for it (JSON object), once done."""


class CommandLog:
    """The `commands` and `seen` tables of the agent's store."""

    def __init__(self, db: aiosqlite.Connection, seen: set[str]) -> None:
        self._db = db
        self._seen = seen
        """Every id in `seen` (written through)."""

    @classmethod
    async def load(cls, db: aiosqlite.Connection) -> CommandLog:
        rows = await db.execute_fetchall("SELECT id FROM seen")
        return cls(db, {row["id"] for row in rows})

    async def seen(self, id: str) -> bool:
        """Whether a command with this envelope id was received before (replay check)."""
        return id in self._seen

    async def received_at(self, id: str) -> float | None:
        """When the command with this envelope id was received (time.time())."""
        rows = await self._db.execute_fetchall("SELECT at FROM seen WHERE id = ?", (id,))
        return next((float(row["at"]) for row in rows), None)

    async def forget_seen(self, older_than: float) -> None:
        """Forget command ids received before `older_than` (time.time()): long expired."""
        await self._db.execute("DELETE FROM seen WHERE at < ?", (older_than,))
        self._seen = {row["id"] for row in await self._db.execute_fetchall("SELECT id FROM seen")}

    async def add(
        self, id: str, deployment_id: str, service: str, step: str, body: str
    ) -> CommandRecord:
        """Record a received command and its id; an existing one (same id or step) is
        returned as is, and its id remembered too."""
        cursor = await self._db.execute(
            "INSERT OR IGNORE INTO commands (id, deployment_id, service, step, body, state)"
            " VALUES (?, ?, ?, ?, ?, 'received')",
            (id, deployment_id, service, step, body),
        )
        if cursor.rowcount == 1:  # new: its id was recorded with it
            self._seen.add(id)
            return CommandRecord(id, deployment_id, service, step, body, "received", None)
        if id not in self._seen:
            await self._db.execute(
                "INSERT OR IGNORE INTO seen (id, at) VALUES (?, ?)", (id, time.time())
            )
            self._seen.add(id)
        existing = await self._one(
            "id = ? OR (deployment_id = ? AND service = ? AND step = ?)",
            (id, deployment_id, service, step),
        )
        if existing is None:
            raise RuntimeError(f"command {id} was neither logged nor found")
        return existing

    async def drop(self, id: str) -> None:
        """Remove a received command that failed verification when read back."""
        await self._db.execute("DELETE FROM commands WHERE id = ? AND state = 'received'", (id,))

    async def finish(self, id: str, result: dict[str, Any]) -> None:
        await self._db.execute(
            "UPDATE commands SET state = 'done', result = ? WHERE id = ?", (json.dumps(result), id)
        )

    async def pending(self) -> list[CommandRecord]:
        """Commands received but not done, in the order they arrived."""
        rows = await self._db.execute_fetchall(
            "SELECT * FROM commands WHERE state = 'received' ORDER BY rowid"
        )
        return [_command(row) for row in rows]

    async def _one(self, where: str, args: tuple[Any, ...]) -> CommandRecord | None:
        rows = await self._db.execute_fetchall(f"SELECT * FROM commands WHERE {where}", args)
        return next((_command(row) for row in rows), None)


def _command(row: aiosqlite.Row) -> CommandRecord:
    result = json.loads(row["result"]) if row["result"] else None
    return CommandRecord(
        row["id"], row["deployment_id"], row["service"], row["step"], row["body"],
        row["state"], result,
    )  # fmt: skip
