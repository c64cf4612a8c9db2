"""The store's event log: what happened, for `lockstep events` (and recovery reading).

Part of `coordinator.store.Store`. `_add_events` writes inside the caller's
transaction (a deployment's phase change and its events are saved together);
`add_events` is a transaction of its own.
"""

from __future__ import annotations

import json
import time
from typing import Any

from coordinator.records import EventRecord
from coordinator.store.base import Table, transaction


class EventLog(Table):
    async def _add_events(
        self, deployment_id: str | None, events: list[tuple[str, dict[str, Any]]]
    ) -> None:
        now = time.time()
        await self._db.executemany(
            "INSERT INTO events (ts, type, deployment_id, data) VALUES (?, ?, ?, ?)",
            [(now, kind, deployment_id, json.dumps(data)) for kind, data in events],
        )

    @transaction
    async def add_events(
        self, deployment_id: str | None, events: list[tuple[str, dict[str, Any]]]
    ) -> None:
        await self._add_events(deployment_id, events)

    async def events(self, after: int = 0, limit: int = 1000) -> list[EventRecord]:
        rows = await self._rows(
            "SELECT * FROM events WHERE seq > ? ORDER BY seq LIMIT ?", after, limit
        )
        return [
            EventRecord(r["seq"], r["ts"], r["type"], r["deployment_id"], json.loads(r["data"]))
            for r in rows
        ]
