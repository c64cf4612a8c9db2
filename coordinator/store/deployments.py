"""The store's deployments: their records, their participants' rows, their outcome.

Part of `coordinator.store.Store`; called by intake (queue, start) and the runtime
(save after every batch of events). A deployment's header and only the participant
rows that changed are written in one transaction; when it ends, the writes that
`coordinator.outcome` decides (release state, fleet pointer, merged release) and its
events go in the same transaction.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from coordinator import outcome
from coordinator.deployment import TERMINAL, Deployment, Participant, from_dict, header_json
from coordinator.records import DeploymentRecord
from coordinator.store.base import transaction
from coordinator.store.catalog import CatalogTable
from coordinator.store.db import Row
from coordinator.store.events import EventLog


class DeploymentTable(CatalogTable, EventLog):
    @transaction
    async def save_deployment(
        self,
        machine: Deployment,
        events: list[tuple[str, dict[str, Any]]],
        changed: Sequence[Participant] | None = None,
        timers: Mapping[str, float] | None = None,
    ) -> None:
        """Persist the machine state (and, when it ended, the release outcome) with its
        events, in one transaction: its header, the participant rows in `changed`
        (every one `machine` lists, when None), and the deadlines of the timers it
        started (`timers`: token -> when it fires; a token stored before keeps its first
        deadline). A deployment that ended has no timers left."""
        phase = machine.phase
        ended = time.time() if phase in TERMINAL else None
        await self._db.execute(
            "UPDATE deployments SET machine = ?, state = ?, reason = ?, ended_at = ?, "
            "trigger = CASE WHEN ? != '' THEN ? ELSE trigger END WHERE id = ?",
            _header(machine), phase, machine.reason, ended, machine.cause, machine.cause,
            machine.id,
        )  # fmt: skip
        await self._write_participants(machine, changed)
        await self._db.executemany(
            "INSERT OR IGNORE INTO timers (deployment_id, token, due_at) VALUES (?, ?, ?)",
            [(machine.id, token, due) for token, due in (timers or {}).items()],
        )
        if ended is not None:
            await self._db.execute("DELETE FROM timers WHERE deployment_id = ?", machine.id)
            await self._finish_release(machine.id, phase)
        await self._add_events(machine.id, events)

    async def _write_participants(
        self, machine: Deployment, changed: Sequence[Participant] | None
    ) -> None:
        rows = machine.participants.values() if changed is None else changed
        await self._db.executemany(
            "INSERT INTO participants (deployment_id, host, service, version, from_version,"
            " phase, reason) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(deployment_id, host,"
            " service) DO UPDATE SET phase = excluded.phase, reason = excluded.reason",
            [(machine.id, p.host, p.service, p.version, p.from_version, p.phase, p.reason)
             for p in rows],
        )  # fmt: skip

    async def _records(
        self, rows: list[Row], *, participants: bool = True
    ) -> list[DeploymentRecord]:
        """The deployments of `rows`, each machine with its participants read from their
        rows (a deployment stored before participants had rows keeps the ones in its
        machine); without them if not `participants`."""
        if not rows or not participants:
            return [_deployment(r, None) for r in rows]
        ids = [r["id"] for r in rows]
        marks = ", ".join("?" for _ in ids)
        found = await self._rows(
            f"SELECT * FROM participants WHERE deployment_id IN ({marks}) ORDER BY rowid", *ids
        )
        by_deployment: dict[str, list[dict[str, Any]]] = {}
        for p in found:
            by_deployment.setdefault(p["deployment_id"], []).append({
                "host": p["host"], "service": p["service"], "version": p["version"],
                "from_version": p["from_version"], "phase": p["phase"], "reason": p["reason"],
            })  # fmt: skip
        return [_deployment(r, by_deployment.get(r["id"])) for r in rows]

    async def _record(self, rows: list[Row]) -> DeploymentRecord | None:
        return (await self._records(rows[:1]))[0] if rows else None

    async def _finish_release(self, deployment_id: str, phase: str) -> None:
        """Carry out what `coordinator.outcome` decides for a deployment that ended."""
        row = (await self._rows("SELECT * FROM deployments WHERE id = ?", deployment_id))[0]
        release_id, from_id = row["release_id"], row["from_release_id"]
        current_id, current = await self.current_release()
        decided = outcome.decide(
            outcome.Ended(phase=phase, kind=row["kind"], new_release=bool(row["new_release"]),
                          release_id=release_id, from_release_id=from_id,
                          current_release_id=current_id)
        )  # fmt: skip
        if decided.release_state is not None:
            await self._set_release_state(release_id, decided.release_state)
        if decided.fleet_to is None:
            return
        fleet_to = decided.fleet_to
        if decided.merge:
            mine = await self._release_services(release_id)
            base = {} if from_id is None else await self._release_services(from_id)
            merged = outcome.merge(current, mine, base)
            if merged is not None:
                fleet_to = await self._add_release(merged, "good", deployment_id)
                await self._db.execute(
                    "UPDATE deployments SET release_id = ? WHERE id = ?", fleet_to, deployment_id
                )
        await self._set_fleet(fleet_to)
        if decided.marks_bad is not None:
            await self._set_release_state(decided.marks_bad, "bad")

    @transaction
    async def queue_deployment(
        self,
        *,
        deployment_id: str,
        request_id: str,
        trigger: str,
        kind: str,
        target: dict[str, str],
        request: dict[str, Any],
        locks: list[str],
        machine: Deployment,
        requested_by: str = "",
    ) -> None:
        """Record an accepted request that starts when its services are free (FIFO)."""
        await self._db.execute(
            "INSERT INTO deployments (id, request_id, trigger, state, services, plan, machine, "
            "started_at, kind, new_release, requested_by) "
            "VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?, 0, ?)",
            deployment_id,
            request_id,
            trigger,
            json.dumps(target, sort_keys=True),
            json.dumps({"request": request, "locks": locks}),
            _header(machine),
            time.time(),
            kind,
            requested_by,
        )

    @transaction
    async def start_deployment(
        self,
        *,
        deployment_id: str,
        target: dict[str, str],
        from_release_id: int | None,
        release_id: int | None,
        plan: dict[str, Any],
        machine: Deployment,
    ) -> None:
        """A queued deployment starts: its release (new if `release_id` is None) and plan."""
        new_release = release_id is None
        if release_id is None:
            release_id = await self._add_release(target, "pending", deployment_id)
        row = (await self._rows("SELECT plan FROM deployments WHERE id = ?", deployment_id))[0]
        stored = {**json.loads(row["plan"]), **plan}
        await self._db.execute(
            "UPDATE deployments SET release_id = ?, from_release_id = ?, state = ?, services = ?, "
            "plan = ?, machine = ?, new_release = ? WHERE id = ?",
            release_id,
            from_release_id,
            machine.phase,
            json.dumps(target, sort_keys=True),
            json.dumps(stored),
            _header(machine),
            int(new_release),
            deployment_id,
        )
        await self._write_participants(machine, None)
        await self._add_events(deployment_id, [(f"deployment.{machine.phase}", {})])

    async def deadlines(self, deployment_id: str) -> dict[str, float]:
        """When each timer the deployment started fires (token -> time), as saved."""
        rows = await self._rows(
            "SELECT token, due_at FROM timers WHERE deployment_id = ?", deployment_id
        )
        return {r["token"]: r["due_at"] for r in rows}

    async def last_ended(self) -> float:
        rows = await self._rows("SELECT MAX(ended_at) AS t FROM deployments")
        return float(rows[0]["t"] or 0.0)

    async def deployment(self, deployment_id: str) -> DeploymentRecord | None:
        return await self._record(
            await self._rows("SELECT * FROM deployments WHERE id = ?", deployment_id)
        )

    async def deployment_by_request(self, request_id: str) -> DeploymentRecord | None:
        return await self._record(
            await self._rows("SELECT * FROM deployments WHERE request_id = ?", request_id)
        )

    async def in_flight(self, *, participants: bool = True) -> list[DeploymentRecord]:
        """Every deployment not ended, queued ones included, newest first (no cap:
        recovery and the lock sets must see them all); without their participants when
        `participants` is False (what the lock sets need)."""
        rows = await self._rows(
            "SELECT * FROM deployments WHERE ended_at IS NULL ORDER BY started_at DESC, rowid DESC"
        )
        return await self._records(rows, participants=participants)

    async def deployments(self, *, limit: int, before: str | None = None) -> list[DeploymentRecord]:
        """A page of the history, newest first: at most `limit` deployments started before
        the deployment `before` (from the newest when None). Their machines come without
        participants (a page of the history shows none: it never reads their rows)."""
        where, args = "", tuple[str, ...]()
        if before is not None:
            where = ("WHERE (started_at, rowid) < (SELECT started_at, rowid FROM deployments"
                     " WHERE id = ?)")  # fmt: skip
            args = (before,)
        rows = await self._rows(
            f"SELECT * FROM deployments {where} ORDER BY started_at DESC, rowid DESC LIMIT ?",
            *args, limit,
        )  # fmt: skip
        return await self._records(rows, participants=False)

    async def last_completed(self) -> DeploymentRecord | None:
        """The deployment that made the current release current, if any."""
        release_id, _ = await self.current_release()
        rows = await self._rows(
            "SELECT * FROM deployments WHERE state = 'completed' AND release_id = ? "
            "ORDER BY ended_at DESC LIMIT 1",
            release_id,
        )
        return await self._record(rows)


def _header(machine: Deployment) -> str:
    """The machine's JSON without its participants (they have rows of their own)."""
    return header_json(machine)


def _deployment(row: Row, participants: list[dict[str, Any]] | None) -> DeploymentRecord:
    machine = json.loads(row["machine"])
    if participants is not None or "participants" not in machine:
        machine["participants"] = participants or []
    return DeploymentRecord(
        id=row["id"],
        request_id=row["request_id"],
        release_id=row["release_id"],
        from_release_id=row["from_release_id"],
        trigger=row["trigger"],
        state=row["state"],
        reason=row["reason"],
        services=json.loads(row["services"]),
        plan=json.loads(row["plan"]),
        machine=from_dict(machine),
        started_at=row["started_at"],
        ended_at=row["ended_at"],
        kind=row["kind"],
        requested_by=row["requested_by"],
    )
