"""The coordinator's durable state (aiosqlite): catalog, releases, deployments, agents, events.

The only coordinator module that imports aiosqlite. WAL with `synchronous=FULL`: a
deployment row carries the protocol state (votes, the decision), and the loop saves it
before sending anything that depends on it. Each public method is one transaction.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from coordinator import outcome
from coordinator.deployment import TERMINAL, Deployment, Participant, from_dict, to_dict
from coordinator.records import AgentRecord, DeploymentRecord, EventRecord, Registered, Release
from coordinator.trust import KnownKey
from shared.errors import UserError
from shared.messages import ServiceState
from shared.specs import ServiceVersion

_SCHEMA = """
CREATE TABLE IF NOT EXISTS catalog (
    name TEXT NOT NULL, version TEXT NOT NULL, spec TEXT NOT NULL, digest TEXT NOT NULL,
    registered_at REAL NOT NULL, PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS releases (
    id INTEGER PRIMARY KEY AUTOINCREMENT, services TEXT NOT NULL, state TEXT NOT NULL,
    created_at REAL NOT NULL, deployment_id TEXT);
CREATE TABLE IF NOT EXISTS fleet (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS deployments (
    id TEXT PRIMARY KEY, request_id TEXT UNIQUE, release_id INTEGER, from_release_id INTEGER,
    trigger TEXT NOT NULL, state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '',
    services TEXT NOT NULL, plan TEXT NOT NULL, machine TEXT NOT NULL,
    started_at REAL NOT NULL, ended_at REAL,
    kind TEXT NOT NULL DEFAULT 'deploy', new_release INTEGER NOT NULL DEFAULT 1,
    requested_by TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS participants (
    deployment_id TEXT NOT NULL, host TEXT NOT NULL, service TEXT NOT NULL,
    version TEXT NOT NULL, from_version TEXT, phase TEXT NOT NULL, reason TEXT NOT NULL,
    PRIMARY KEY (deployment_id, host, service));
CREATE TABLE IF NOT EXISTS agents (
    host_id TEXT PRIMARY KEY, labels TEXT NOT NULL, services TEXT NOT NULL,
    last_seen REAL NOT NULL, first_seen REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'alive', overwrite INTEGER NOT NULL DEFAULT 0,
    reported_at REAL NOT NULL DEFAULT 0, public_key TEXT NOT NULL DEFAULT '',
    key_state TEXT NOT NULL DEFAULT 'pending');
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, type TEXT NOT NULL,
    deployment_id TEXT, data TEXT NOT NULL);
"""

_ADDED_COLUMNS = {
    "agents": (
        ("public_key", "TEXT NOT NULL DEFAULT ''"),
        ("key_state", "TEXT NOT NULL DEFAULT 'pending'"),
    ),
    "deployments": (("requested_by", "TEXT NOT NULL DEFAULT ''"),),
}
"""Columns added after a table first shipped: added to an older database on open."""


def digest(spec: ServiceVersion) -> str:
    """Content digest of a service version (identical re-registration is a no-op)."""
    return hashlib.sha256(spec.model_dump_json().encode()).hexdigest()


class Store:
    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    @classmethod
    async def open(cls, path: Path) -> Store:
        db = await aiosqlite.connect(path)
        db.row_factory = aiosqlite.Row
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=FULL")
        await db.executescript(_SCHEMA)
        for table, columns in _ADDED_COLUMNS.items():
            async with db.execute(f"PRAGMA table_info({table})") as cursor:
                have = {row["name"] for row in await cursor.fetchall()}
            for name, decl in columns:
                if name not in have:
                    await db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")
        await db.commit()
        return cls(db)

    async def close(self) -> None:
        await self._db.close()

    async def _rows(self, sql: str, *args: Any) -> list[aiosqlite.Row]:
        async with self._db.execute(sql, args) as cursor:
            return list(await cursor.fetchall())

    # --- catalog ------------------------------------------------------------------

    async def catalog(self) -> dict[tuple[str, str], ServiceVersion]:
        rows = await self._rows("SELECT spec FROM catalog")
        specs = [ServiceVersion.model_validate_json(r["spec"]) for r in rows]
        return {s.key: s for s in specs}

    async def register(self, versions: list[ServiceVersion]) -> list[Registered]:
        """Add `versions` all or none; identical ones are no-ops, changed ones refused."""
        known = {
            (r["name"], r["version"]): r["digest"]
            for r in await self._rows("SELECT name, version, digest FROM catalog")
        }
        results: list[Registered] = []
        new: list[ServiceVersion] = []
        for i, spec in enumerate(versions):
            existing = known.get(spec.key)
            if existing is None:
                new.append(spec)
                known[spec.key] = digest(spec)
                results.append(Registered(spec.name, spec.version, "added"))
            elif existing == digest(spec):
                results.append(Registered(spec.name, spec.version, "unchanged"))
            else:
                raise UserError(
                    f"versions[{i}]",
                    f"{spec.name} {spec.version} is already registered with different content; "
                    "versions are immutable: register a new version",
                )
        now = time.time()
        await self._db.executemany(
            "INSERT INTO catalog VALUES (?, ?, ?, ?, ?)",
            [(s.name, s.version, s.model_dump_json(), digest(s), now) for s in new],
        )
        await self._db.commit()
        return results

    # --- releases and fleet ---------------------------------------------------------

    async def current_release(self) -> tuple[int | None, dict[str, str]]:
        rows = await self._rows("SELECT value FROM fleet WHERE key = 'current_release_id'")
        if not rows:
            return None, {}
        release_id = int(rows[0]["value"])
        return release_id, await self._release_services(release_id)

    async def releases(self) -> list[Release]:
        """Every release, newest first."""
        rows = await self._rows("SELECT * FROM releases ORDER BY id DESC")
        return [
            Release(r["id"], json.loads(r["services"]), r["state"], r["created_at"],
                    r["deployment_id"])
            for r in rows
        ]  # fmt: skip

    # --- deployments ----------------------------------------------------------------

    async def save_deployment(
        self,
        machine: Deployment,
        events: list[tuple[str, dict[str, Any]]],
        changed: Sequence[Participant] | None = None,
    ) -> None:
        """Persist the machine state (and, when it ended, the release outcome) with its
        events, in one transaction: its header, and the participant rows in `changed`
        (every one `machine` lists, when None)."""
        phase = machine.phase
        ended = time.time() if phase in TERMINAL else None
        await self._db.execute(
            "UPDATE deployments SET machine = ?, state = ?, reason = ?, ended_at = ?, "
            "trigger = CASE WHEN ? != '' THEN ? ELSE trigger END WHERE id = ?",
            (_header(machine), phase, machine.reason, ended, machine.cause, machine.cause,
             machine.id),
        )  # fmt: skip
        await self._write_participants(machine, changed)
        if ended is not None:
            await self._finish_release(machine.id, phase)
        await self._add_events(machine.id, events)
        await self._db.commit()

    async def _write_participants(
        self, machine: Deployment, changed: Sequence[Participant] | None
    ) -> None:
        rows = machine.participants.values() if changed is None else changed
        await self._db.executemany(
            "INSERT INTO participants VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(deployment_id,"
            " host, service) DO UPDATE SET phase = excluded.phase, reason = excluded.reason",
            [(machine.id, p.host, p.service, p.version, p.from_version, p.phase, p.reason)
             for p in rows],
        )  # fmt: skip

    async def _records(
        self, rows: list[aiosqlite.Row], *, participants: bool = True
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

    async def _record(self, rows: list[aiosqlite.Row]) -> DeploymentRecord | None:
        return (await self._records(rows[:1]))[0] if rows else None

    async def approved_hosts(self) -> set[str]:
        rows = await self._rows("SELECT host_id FROM agents WHERE key_state = 'approved'")
        return {r["host_id"] for r in rows}

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
                    "UPDATE deployments SET release_id = ? WHERE id = ?", (fleet_to, deployment_id)
                )
        await self._db.execute(
            "INSERT INTO fleet VALUES ('current_release_id', ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (str(fleet_to),),
        )
        if decided.marks_bad is not None:
            await self._set_release_state(decided.marks_bad, "bad")

    async def _release_services(self, release_id: int) -> dict[str, str]:
        rows = await self._rows("SELECT services FROM releases WHERE id = ?", release_id)
        services: dict[str, str] = json.loads(rows[0]["services"])
        return services

    async def _add_release(self, services: dict[str, str], state: str, deployment_id: str) -> int:
        """A new numbered release (inside the caller's transaction)."""
        cursor = await self._db.execute(
            "INSERT INTO releases (services, state, created_at, deployment_id) VALUES (?, ?, ?, ?)",
            (json.dumps(services, sort_keys=True), state, time.time(), deployment_id),
        )
        return int(cursor.lastrowid or 0)

    async def _set_release_state(self, release_id: int, state: str) -> None:
        await self._db.execute("UPDATE releases SET state = ? WHERE id = ?", (state, release_id))

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
            (
                deployment_id,
                request_id,
                trigger,
                json.dumps(target, sort_keys=True),
                json.dumps({"request": request, "locks": locks}),
                _header(machine),
                time.time(),
                kind,
                requested_by,
            ),
        )
        await self._db.commit()

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
            (
                release_id,
                from_release_id,
                machine.phase,
                json.dumps(target, sort_keys=True),
                json.dumps(stored),
                _header(machine),
                int(new_release),
                deployment_id,
            ),
        )
        await self._write_participants(machine, None)
        await self._add_events(deployment_id, [(f"deployment.{machine.phase}", {})])
        await self._db.commit()

    async def deployed_pairs(self) -> set[tuple[str, str]]:
        """Every (service, version) that is part of some release."""
        rows = await self._rows("SELECT services FROM releases")
        return {pair for r in rows for pair in json.loads(r["services"]).items()}

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

    async def in_flight(self) -> list[DeploymentRecord]:
        """Every deployment not ended, queued ones included, newest first (no cap:
        recovery and the lock sets must see them all)."""
        rows = await self._rows(
            "SELECT * FROM deployments WHERE ended_at IS NULL ORDER BY started_at DESC, rowid DESC"
        )
        return await self._records(rows)

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

    # --- agents -------------------------------------------------------------------

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
            (host_id, json.dumps(labels or {}), json.dumps(services), now, now, sent_at),
        )
        await self._db.commit()
        return not rows

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
            (json.dumps(sorted(services, key=lambda s: s["service"])), sent_at, host_id),
        )
        await self._db.commit()

    async def agent_services(
        self, host_id: str, services: list[dict[str, Any]], labels: dict[str, str] | None,
        sent_at: float,
    ) -> bool:  # fmt: skip
        """Record what a heartbeat sent at `sent_at` says `host_id` runs (and its labels),
        unless a newer report was applied already; whether it was recorded."""
        cursor = await self._db.execute(
            "UPDATE agents SET services = ?, labels = COALESCE(?, labels), reported_at = ?"
            " WHERE host_id = ? AND reported_at <= ?",
            (json.dumps(services), None if labels is None else json.dumps(labels), sent_at,
             host_id, sent_at),
        )  # fmt: skip
        await self._db.commit()
        return cursor.rowcount > 0

    async def set_last_seen(self, seen: dict[str, float]) -> None:
        """When each host was last heard of, in one transaction (never moving back)."""
        await self._db.executemany(
            "UPDATE agents SET last_seen = MAX(last_seen, ?) WHERE host_id = ?",
            [(at, host) for host, at in seen.items()],
        )
        await self._db.commit()

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
            (host_id, json.dumps(labels), now, now, public_key, key_state),
        )
        await self._db.commit()

    async def set_key_state(self, host_id: str, key_state: str) -> None:
        await self._db.execute(
            "UPDATE agents SET key_state = ? WHERE host_id = ?", (key_state, host_id)
        )
        await self._db.commit()

    async def remove_agent(self, host_id: str) -> bool:
        """Forget a host and its key (it may enroll again, with a new key); False if unknown."""
        cursor = await self._db.execute("DELETE FROM agents WHERE host_id = ?", (host_id,))
        await self._db.commit()
        return cursor.rowcount > 0

    async def set_agent(
        self, host_id: str, *, state: str | None = None, overwrite: bool | None = None
    ) -> bool:
        """Update an agent's liveness state or overwrite flag; False if the host is unknown."""
        cursor = await self._db.execute(
            "UPDATE agents SET state = COALESCE(?, state), overwrite = COALESCE(?, overwrite) "
            "WHERE host_id = ?",
            (state, None if overwrite is None else int(overwrite), host_id),
        )
        await self._db.commit()
        return cursor.rowcount > 0

    # --- events -------------------------------------------------------------------

    async def _add_events(
        self, deployment_id: str | None, events: list[tuple[str, dict[str, Any]]]
    ) -> None:
        now = time.time()
        await self._db.executemany(
            "INSERT INTO events (ts, type, deployment_id, data) VALUES (?, ?, ?, ?)",
            [(now, kind, deployment_id, json.dumps(data)) for kind, data in events],
        )

    async def add_events(
        self, deployment_id: str | None, events: list[tuple[str, dict[str, Any]]]
    ) -> None:
        await self._add_events(deployment_id, events)
        await self._db.commit()

    async def events(self, after: int = 0, limit: int = 1000) -> list[EventRecord]:
        rows = await self._rows(
            "SELECT * FROM events WHERE seq > ? ORDER BY seq LIMIT ?", after, limit
        )
        return [
            EventRecord(r["seq"], r["ts"], r["type"], r["deployment_id"], json.loads(r["data"]))
            for r in rows
        ]


def _header(machine: Deployment) -> str:
    """The machine's JSON without its participants (they have rows of their own)."""
    return json.dumps({k: v for k, v in to_dict(machine).items() if k != "participants"})


def _deployment(row: aiosqlite.Row, participants: list[dict[str, Any]] | None) -> DeploymentRecord:
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
