"""The agent's record of every `current` switch, and of services left down after a
crash loop (part of `agent.store.Store`).

The steps record each switch of `current` and settle it once the switched service
became healthy or failed; an agent that died in between finds the switch still open
and resumes from it (I5). The crash guard records a crash loop, so a restarted agent
leaves such a service down. The open switches and the crash loops are few and this
process alone writes them, so they are also kept in memory: reading them costs no
query, and settling or clearing what is not there writes nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import aiosqlite

SwitchKind = Literal["commit", "revert", "stop"]


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


class SwitchTable:
    """The `switches` and `crash_loops` tables, their open and looping rows in memory."""

    _db: aiosqlite.Connection
    _open: dict[str, Switch]
    """Per service, its newest switch still open (at most one is: see add_switch)."""
    _crash_loops: dict[str, str]
    """Service -> the version left down after a crash loop."""

    async def _load_switches(self) -> None:
        rows = await self._db.execute_fetchall(
            "SELECT * FROM switches WHERE settled_at IS NULL ORDER BY id"
        )
        self._open = {row["service"]: Switch(**dict(row)) for row in rows}
        loops = await self._db.execute_fetchall("SELECT service, version FROM crash_loops")
        self._crash_loops = {row["service"]: row["version"] for row in loops}

    # --- crash loops ------------------------------------------------------------

    async def set_crash_loop(self, service: str, version: str, exits: int) -> None:
        await self._db.execute(
            "INSERT OR REPLACE INTO crash_loops VALUES (?, ?, ?, ?)",
            (service, version, exits, time.time()),
        )
        self._crash_loops[service] = version

    async def clear_crash_loop(self, service: str) -> None:
        if service in self._crash_loops:
            await self._db.execute("DELETE FROM crash_loops WHERE service = ?", (service,))
            del self._crash_loops[service]

    async def crash_looped(self, service: str) -> str | None:
        """The version of `service` left down after a crash loop, if any."""
        return self._crash_loops.get(service)

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
        service over): the same statement settles it (trigger `switch_supersedes`), so
        no crash finds the service with no open switch while `current` moved."""
        now = time.time()
        cursor = await self._db.execute(
            "INSERT INTO switches (ts, service, from_version, to_version, kind, deployment_id)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (now, service, from_version, to_version, kind, deployment_id),
        )
        switch_id = int(cursor.lastrowid or 0)
        self._open[service] = Switch(switch_id, now, service, from_version, to_version, kind,
                                     deployment_id)  # fmt: skip
        return switch_id

    async def settle_switch(self, switch_id: int) -> None:
        """The switched service became healthy or failed: the switch is over."""
        await self._db.execute(
            "UPDATE switches SET settled_at = ? WHERE id = ?", (time.time(), switch_id)
        )
        for service, switch in list(self._open.items()):
            if switch.id == switch_id:
                del self._open[service]

    async def open_switch(
        self, service: str, deployment_id: str, kind: SwitchKind
    ) -> Switch | None:
        """The newest switch of `service` by this step that never settled (the agent died
        between switching `current` and the service becoming healthy or failing)."""
        switch = self._open.get(service)
        if switch is None or (switch.deployment_id, switch.kind) != (deployment_id, kind):
            return None
        return switch

    async def switching(self, service: str) -> Switch | None:
        """The switch of `service` still open, if any (see `open_switch`)."""
        return self._open.get(service)

    async def switches(self, service: str | None = None) -> list[Switch]:
        where, args = ("WHERE service = ?", (service,)) if service else ("", ())
        rows = await self._db.execute_fetchall(f"SELECT * FROM switches {where} ORDER BY id", args)
        return [Switch(**dict(row)) for row in rows]
