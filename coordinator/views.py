"""The JSON documents the coordinator answers queries with (SPEC 4 `--json` fields).

Pure functions from the store's records (coordinator.records) to documents: the
coordinator's request handlers answer with them and publishes them on lockstep.events;
the CLI prints them as they are with `--json`, or renders them as text.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from coordinator.records import (
    AgentRecord,
    DeploymentRecord,
    EventRecord,
    LeaseRecord,
    Registered,
    Release,
)
from shared import signing

LostAfter = Callable[[float | None], float]
"""Seconds of silence after which a host beating every so many seconds (None: the
coordinator's heartbeat_interval) is lost: `CoordinatorSettings.lost_after_for`."""


def alive(last_seen: float, now: float, lost_after: float) -> bool:
    """Whether a host last heard of at `last_seen` still counts as alive at `now`."""
    return now - last_seen <= lost_after


def host_alive(agent: AgentRecord, now: float, lost_after: LostAfter) -> bool:
    """Whether `agent` still counts as alive at `now`, judged by the period it beats at."""
    return alive(agent.last_seen, now, lost_after(agent.heartbeat_interval))


def deployment(record: DeploymentRecord) -> dict[str, Any]:
    """One deployment with its participants (what `deploy --wait --json` prints)."""
    participants = [
        {
            "host": p.host,
            "service": p.service,
            "version": p.version,
            "from_version": p.from_version,
            "state": p.phase,
            "reason": p.reason,
        }
        for p in sorted(record.machine.participants.values(), key=lambda p: (p.host, p.service))
    ]
    return {
        "deployment_id": record.id,
        "release_id": record.release_id,
        "from_release_id": record.from_release_id,
        "state": record.state,
        "reason": record.reason,
        "trigger": record.trigger,
        "requested_by": record.requested_by,
        "services": record.services,
        "participants": participants,
        "started_at": record.started_at,
        "ended_at": record.ended_at,
    }


def release(record: Release) -> dict[str, Any]:
    """One release (in `history --json`, and the data of `release.<state>` events)."""
    return {
        "release_id": record.id,
        "services": record.services,
        "state": record.state,
        "created_at": record.created_at,
        "deployment_id": record.deployment_id,
    }


def history(records: list[DeploymentRecord], releases: list[Release], limit: int) -> dict[str, Any]:
    """One page of deployments (newest first) with `next_before`, the cursor of the next
    page (None at the end), and every release."""
    return {
        "deployments": [
            {
                "deployment_id": r.id,
                "release_id": r.release_id,
                "from_release_id": r.from_release_id,
                "state": r.state,
                "trigger": r.trigger,
                "reason": r.reason,
                "services": r.services,
                "started_at": r.started_at,
                "ended_at": r.ended_at,
                "requested_by": r.requested_by,
            }
            for r in records
        ],
        "next_before": records[-1].id if len(records) == limit else None,
        "releases": [release(r) for r in releases],
    }


def services(agent: AgentRecord) -> list[dict[str, Any]]:
    """What a host runs, as it reported it."""
    return [s.model_dump(mode="json", exclude_unset=True) for s in agent.services]


def agents(
    records: list[AgentRecord], now: float, lost_after: LostAfter, heard: dict[str, float]
) -> dict[str, Any]:
    """Every enrolled agent; one whose key is not approved is alive while it reports
    (`heard`), though nothing it says is believed."""
    return {
        "agents": [
            {
                "host_id": a.host_id,
                "labels": a.labels,
                "state": "alive" if _heard_alive(a, now, lost_after, heard) else "lost",
                "key_state": a.key_state,
                "fingerprint": signing.fingerprint(a.public_key) if a.public_key else None,
                "last_seen": a.last_seen,
                "last_heard": _last_heard(a, heard),
                "services": services(a),
            }
            for a in records
        ]
    }


def _heard_alive(
    agent: AgentRecord, now: float, lost_after: LostAfter, heard: dict[str, float]
) -> bool:
    return alive(_last_heard(agent, heard), now, lost_after(agent.heartbeat_interval))


def _last_heard(agent: AgentRecord, heard: dict[str, float]) -> float:
    """When the agent last reported: believed (stored), or merely heard (a key that is
    not approved: nothing it says is stored, `last_seen` included)."""
    return max(float(agent.last_seen), heard.get(agent.host_id, 0.0))


def status(
    release_id: int | None,
    current: dict[str, str],
    in_flight: list[DeploymentRecord],
    agent_records: list[AgentRecord],
    now: float,
    lost_after: LostAfter,
    lease: LeaseRecord | None = None,
) -> dict[str, Any]:
    """`lease`: who holds the coordinators' lease (the `coordinator` answering, unless
    a standby took over since)."""
    desired = in_flight[0].release_id if in_flight else release_id
    hosts = [
        {
            "host_id": a.host_id,
            "alive": host_alive(a, now, lost_after),
            "labels": a.labels,
            "last_seen": a.last_seen,
            "services": [
                {"service": s.service, "version": s.version, "health": s.health} for s in a.services
            ],
        }
        for a in agent_records
    ]
    return {
        "release_id": release_id,
        "desired_release_id": desired,
        "services": current,
        "deployments_in_flight": [r.id for r in in_flight],
        "coordinator": None if lease is None or not lease.active else {
            "host": lease.host, "pid": lease.pid, "since": lease.since, "epoch": lease.epoch,
        },
        "hosts": hosts,
    }  # fmt: skip


def event(record: EventRecord) -> dict[str, Any]:
    """One recorded event (`lockstep events`)."""
    return {
        "seq": record.seq,
        "ts": record.ts,
        "type": record.type,
        "deployment_id": record.deployment_id,
        "data": record.data,
    }


def registered(results: list[Registered]) -> list[dict[str, str]]:
    """What `lockstep register` did for each version."""
    return [{"name": r.name, "version": r.version, "result": r.result} for r in results]
