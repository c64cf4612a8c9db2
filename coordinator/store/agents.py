"""The store's agents: what each host runs, when it was last heard of, and its key.

Part of `coordinator.store.Store`; called by liveness (heartbeats), enrollment (keys)
and the coordinator's handlers. What a host runs is only ever taken from a report
newer than the last one applied (I3).
"""

from __future__ import annotations

import json
import time
from typing import Any

from coordinator.records import AgentRecord
from coordinator.store.base import Table, transaction
from coordinator.trust import KnownKey
from shared.messages import ServiceState


class AgentTable(Table):
    async def approved_hosts(self) -> set[str]:
        rows = await self._rows("SELECT host_id FROM agents WHERE key_state = 'approved'")
        return {r["host_id"] for r in rows}

    @transaction
    async def agent_seen(
        self,
        host_id: str,
        services: list[dict[str, Any]],
        labels: dict[str, str] | None = None,
        sent_at: float = 0.0,
    ) -> bool:
        """Record a report from `host_id`; True if the host was not known before.

        What it runs is taken only from a report newer than the last one applied, so a
        heartbeat overtaken by a step result cannot bring back a stale view (I3).
        """
        now = time.time()
        rows = await self._rows("SELECT labels FROM agents WHERE host_id = ?", host_id)
        if rows and labels is None:
            labels = json.loads(rows[0]["labels"])
        await self._db.execute(
            "INSERT INTO agents (host_id, labels, services, last_seen, first_seen, reported_at) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(host_id) DO UPDATE SET "
            "labels = excluded.labels, last_seen = excluded.last_seen, "
            "services = CASE WHEN excluded.reported_at >= agents.reported_at "
            "THEN excluded.services ELSE agents.services END, "
            "reported_at = MAX(agents.reported_at, excluded.reported_at)",
            host_id, json.dumps(labels or {}), json.dumps(services), now, now, sent_at,
        )  # fmt: skip
        self.agents_changed += 1
        return not rows

    @transaction
    async def agent_service(
        self, host_id: str, service: str, version: str | None, health: str, sent_at: float
    ) -> None:
        """Record what a step result says `host_id` now runs for `service`."""
        rows = await self._rows(
            "SELECT services, reported_at FROM agents WHERE host_id = ?", host_id
        )
        if not rows or rows[0]["reported_at"] > sent_at:
            return
        services = [s for s in json.loads(rows[0]["services"]) if s["service"] != service]
        if version is not None:
            services.append({"service": service, "version": version, "health": health})
        await self._db.execute(
            "UPDATE agents SET services = ?, reported_at = ? WHERE host_id = ?",
            json.dumps(sorted(services, key=lambda s: s["service"])),
            sent_at,
            host_id,
        )
        self.agents_changed += 1

    @transaction
    async def save_liveness(
        self, seen: dict[str, tuple[float, float | None]],
        views: dict[str, tuple[float, list[dict[str, Any]], dict[str, str] | None]],
    ) -> None:  # fmt: skip
        """When each host was last heard of (never moving back) and the heartbeat period
        it is judged by (host -> (last seen, period)), and what hosts run as their
        reports sent at a time said (host -> (sent at, services, labels or None);
        skipped where a newer report was applied already), in one transaction."""
        await self._db.executemany(
            "UPDATE agents SET last_seen = MAX(last_seen, ?), heartbeat_interval = ?"
            " WHERE host_id = ?",
            [(at, interval, host) for host, (at, interval) in seen.items()],
        )
        await self._db.executemany(
            "UPDATE agents SET services = ?, labels = COALESCE(?, labels), reported_at = ?"
            " WHERE host_id = ? AND reported_at <= ?",
            [(json.dumps(services), None if labels is None else json.dumps(labels), at, host, at)
             for host, (at, services, labels) in views.items()],
        )  # fmt: skip

    async def agents(self, *, approved_only: bool = True) -> list[AgentRecord]:
        """The agents whose keys are approved (every enrolled one with `approved_only`
        False: only `lockstep agents` lists the others)."""
        where = "WHERE key_state = 'approved'" if approved_only else ""
        rows = await self._rows(f"SELECT * FROM agents {where} ORDER BY host_id")
        return [
            AgentRecord(
                host_id=r["host_id"],
                labels=json.loads(r["labels"]),
                services=tuple(ServiceState.model_validate(s) for s in json.loads(r["services"])),
                last_seen=r["last_seen"],
                state=r["state"],
                overwrite=bool(r["overwrite"]),
                key_state=r["key_state"],
                public_key=r["public_key"],
                heartbeat_interval=r["heartbeat_interval"],
            )
            for r in rows
        ]

    async def known_key(self, host_id: str) -> KnownKey | None:
        """The key an enrolled host signs with, and its state."""
        rows = await self._rows(
            "SELECT public_key, key_state FROM agents WHERE host_id = ?", host_id
        )
        if not rows or not rows[0]["public_key"]:
            return None  # recorded before keys existed: it enrolls with its first key
        return KnownKey(host_id, rows[0]["public_key"], rows[0]["key_state"])

    @transaction
    async def enroll(
        self, host_id: str, public_key: str, labels: dict[str, str], key_state: str
    ) -> None:
        """Record a new host and its key; nothing of what it reports is believed yet. A host
        recorded before keys existed keeps its row and gets the key (and `key_state`)."""
        now = time.time()
        await self._db.execute(
            "INSERT INTO agents (host_id, labels, services, last_seen, first_seen, public_key,"
            " key_state) VALUES (?, ?, '[]', ?, ?, ?, ?) ON CONFLICT(host_id) DO UPDATE SET"
            " public_key = excluded.public_key, key_state = excluded.key_state"
            " WHERE agents.public_key = ''",
            host_id, json.dumps(labels), now, now, public_key, key_state,
        )  # fmt: skip
        self.agents_changed += 1

    @transaction
    async def set_key_state(self, host_id: str, key_state: str) -> None:
        await self._db.execute(
            "UPDATE agents SET key_state = ? WHERE host_id = ?", key_state, host_id
        )
        self.agents_changed += 1

    @transaction
    async def remove_agent(self, host_id: str) -> bool:
        """Forget a host and its key (it may enroll again, with a new key); False if unknown."""
        removed = await self._db.execute("DELETE FROM agents WHERE host_id = ?", host_id)
        self.agents_changed += 1
        return removed > 0

    @transaction
    async def set_agent(
        self, host_id: str, *, state: str | None = None, overwrite: bool | None = None
    ) -> bool:
        """Update an agent's liveness state or overwrite flag; False if the host is unknown."""
        changed = await self._db.execute(
            "UPDATE agents SET state = COALESCE(?, state), overwrite = COALESCE(?, overwrite) "
            "WHERE host_id = ?",
            state, None if overwrite is None else int(overwrite), host_id,
        )  # fmt: skip
        self.agents_changed += 1
        return changed > 0
