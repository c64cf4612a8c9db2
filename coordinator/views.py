"""The JSON documents the coordinator answers queries with (SPEC 4 `--json` fields).

Pure functions from store rows to documents; the CLI prints these as they are with
`--json`, or renders them as text.
"""

from __future__ import annotations

from typing import Any

from coordinator import machine
from shared import signing


def alive(agent: dict[str, Any], now: float, lost_after: float) -> bool:
    return bool(now - agent["last_seen"] <= lost_after)


def deployment(row: dict[str, Any]) -> dict[str, Any]:
    """One deployment with its participants (what `deploy --wait --json` prints)."""
    state = machine.from_dict(row["machine"])
    participants = [
        {
            "host": p.host,
            "service": p.service,
            "version": p.version,
            "from_version": p.from_version,
            "state": p.phase,
            "reason": p.reason,
        }
        for p in sorted(state.participants.values(), key=lambda p: (p.host, p.service))
    ]
    return {
        "deployment_id": row["deployment_id"],
        "release_id": row["release_id"],
        "from_release_id": row["from_release_id"],
        "state": row["state"],
        "reason": row["reason"],
        "trigger": row["trigger"],
        "requested_by": row["requested_by"],
        "services": row["services"],
        "participants": participants,
        "started_at": row["started_at"],
        "ended_at": row["ended_at"],
    }


def history(
    rows: list[dict[str, Any]], releases: list[dict[str, Any]], limit: int
) -> dict[str, Any]:
    """One page of deployments (newest first) with `next_before`, the cursor of the next
    page (None at the end), and every release."""
    keys = (
        "deployment_id",
        "release_id",
        "from_release_id",
        "state",
        "trigger",
        "reason",
        "services",
        "started_at",
        "ended_at",
        "requested_by",
    )
    return {
        "deployments": [{k: r[k] for k in keys} for r in rows],
        "next_before": rows[-1]["deployment_id"] if len(rows) == limit else None,
        "releases": releases,
    }


def agents(
    rows: list[dict[str, Any]], now: float, lost_after: float, heard: dict[str, float]
) -> dict[str, Any]:
    """Every enrolled agent; one whose key is not approved is alive while it reports
    (`heard`), though nothing it says is believed."""
    return {
        "agents": [
            {
                "host_id": a["host_id"],
                "labels": a["labels"],
                "state": "alive" if alive(
                    {"last_seen": _last_seen(a, heard)}, now, lost_after
                ) else "lost",
                "key_state": a["key_state"],
                "fingerprint": signing.fingerprint(a["public_key"]) if a["public_key"] else None,
                "last_seen": a["last_seen"],
                "last_heard": _last_seen(a, heard),
                "services": a["services"],
            }
            for a in rows
        ]
    }


def _last_seen(agent: dict[str, Any], heard: dict[str, float]) -> float:
    """When the agent last reported: believed (stored), or merely heard (a key that is
    not approved: nothing it says is stored, `last_seen` included)."""
    return max(float(agent["last_seen"]), heard.get(agent["host_id"], 0.0))


def status(
    release_id: int | None,
    services: dict[str, str],
    in_flight: list[dict[str, Any]],
    agent_rows: list[dict[str, Any]],
    now: float,
    lost_after: float,
) -> dict[str, Any]:
    desired = in_flight[0]["release_id"] if in_flight else release_id
    hosts = [
        {
            "host_id": a["host_id"],
            "alive": alive(a, now, lost_after),
            "labels": a["labels"],
            "last_seen": a["last_seen"],
            "services": [
                {"service": s["service"], "version": s["version"], "health": s["health"]}
                for s in a["services"]
            ],
        }
        for a in agent_rows
    ]
    return {
        "release_id": release_id,
        "desired_release_id": desired,
        "services": services,
        "deployments_in_flight": [r["deployment_id"] for r in in_flight],
        "hosts": hosts,
    }
