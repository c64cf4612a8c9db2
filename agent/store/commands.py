"""The agent's durable command log and the ids of every command it received.

`agent.service` records a command here before the transport acks it (`add` is
idempotent by envelope id and by (deployment, service, step)), marks it done with the
report it sent, and, after a restart, runs again what is still `received`; the ids
(`seen`) refuse a replayed command for as long as it would be valid. `Store.open`
makes the one `CommandLog` of a store, on the store's own SQLite connection.
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

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    async def seen(self, id: str) -> bool:
        """Whether a command with this envelope id was received before (replay check)."""
        return bool(await self._db.execute_fetchall("SELECT 1 FROM seen WHERE id = ?", (id,)))

    async def received_at(self, id: str) -> float | None:
        """When the command with this envelope id was received (time.time())."""
        rows = await self._db.execute_fetchall("SELECT at FROM seen WHERE id = ?", (id,))
        return next((float(row["at"]) for row in rows), None)

    async def forget_seen(self, older_than: float) -> None:
        """Forget command ids received before `older_than` (time.time()): long expired."""
        await self._db.execute("DELETE FROM seen WHERE at < ?", (older_than,))
        await self._db.commit()

    async def add(
        self, id: str, deployment_id: str, service: str, step: str, body: str
    ) -> CommandRecord:
        """Record a received command and its id; an existing one (same id or step) is
        returned as is, and its id remembered too."""
        await self._db.execute(
            "INSERT OR IGNORE INTO seen (id, at) VALUES (?, ?)", (id, time.time())
        )
        existing = await self._one(
            "id = ? OR (deployment_id = ? AND service = ? AND step = ?)",
            (id, deployment_id, service, step),
        )
        if existing is not None:
            await self._db.commit()
            return existing
        await self._db.execute(
            "INSERT INTO commands (id, deployment_id, service, step, body, state)"
            " VALUES (?, ?, ?, ?, ?, 'received')",
            (id, deployment_id, service, step, body),
        )
        await self._db.commit()
        return CommandRecord(id, deployment_id, service, step, body, "received", None)

    async def drop(self, id: str) -> None:
        """Remove a received command that failed verification when read back."""
        await self._db.execute("DELETE FROM commands WHERE id = ? AND state = 'received'", (id,))
        await self._db.commit()

    async def finish(self, id: str, result: dict[str, Any]) -> None:
        await self._db.execute(
            "UPDATE commands SET state = 'done', result = ? WHERE id = ?", (json.dumps(result), id)
        )
        await self._db.commit()

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
