"""What an alert, a health failure, a crash loop or an agent in doubt should get. Pure.

The coordinator loop gathers the facts (current release, deployments in flight, the
deployment that made the current release current) and acts on the decision:
`Ignore` is recorded with its reason, `FailInFlight` compensates a deployment that
is still committing or baking, `Rollback` starts an automatic rollback.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from coordinator.deployment import Deployment, Key
from coordinator.records import DeploymentRecord

SEVERITIES = ("info", "warning", "error", "critical")
COMPENSABLE = ("committing", "holding", "paused", "baking")
"""Phases of a deploy in flight that an alert fails (it reverts what it committed)."""


@dataclass(frozen=True)
class Ignore:
    reason: str


@dataclass(frozen=True)
class FailInFlight:
    deployment_id: str


@dataclass(frozen=True)
class Rollback:
    scope: str
    services: tuple[str, ...]


Decision = Ignore | FailInFlight | Rollback


def _touches(record: DeploymentRecord, service: str) -> bool:
    """Whether a deployment in flight (or still queued) holds `service`."""
    if service in record.locks:
        return True
    return any(p.service == service for p in record.machine.participants.values())


def on_alert(
    service: str,
    severity: str,
    *,
    threshold: str,
    current: Mapping[str, str],
    in_flight: Sequence[DeploymentRecord],
    last_completed: DeploymentRecord | None,
    now: float,
    window: float,
) -> Decision:
    """The decision for an alert `service.severity`."""
    if severity not in SEVERITIES:
        return Ignore(f"unknown severity {severity!r}")
    if SEVERITIES.index(severity) < SEVERITIES.index(threshold):
        return Ignore(f"severity {severity} is below the threshold {threshold}")
    if service not in current:
        return Ignore(f"{service} is not in the current release")
    for record in in_flight:
        if _touches(record, service):
            if record.kind == "deploy" and record.state in COMPENSABLE:
                return FailInFlight(record.id)
            return Ignore(f"deployment {record.id} is already in flight for {service}")
    if last_completed is None or last_completed.kind != "deploy":
        return Ignore("the current release was not deployed forward; nothing to roll back")
    if now - float(last_completed.ended_at or 0.0) > window:
        return Ignore("outside the auto-rollback window of the current release")
    scope = last_completed.machine.strategy.rollback_scope
    return Rollback(scope, (service,) if scope == "dependents" else ())


def on_inquiry(deployment: Deployment | None, key: Key) -> Literal["commit", "abort"] | None:
    """What to tell an agent that restarted with `key` prepared and no outcome (SPEC 6.5).

    Commit only a participant that was sent its commit; wait (None) while its batch has
    not come yet, or while nothing is decided (its vote may be on its way: an agent that
    restarts and re-runs its prepare asks at once, and its inquiry can overtake its vote;
    an abort decision is sent to every participant that was sent a prepare); anything
    else - unknown, aborted, or a deployment that moved on without switching it - is
    presumed abort, never a commit of an abandoned version.
    """
    p = deployment.participants.get(key) if deployment is not None else None
    if p is None or deployment is None:
        return "abort"
    if p.phase in ("committing", "committed"):
        return "commit"
    if deployment.done:
        return "abort"
    if p.phase == "prepared" and deployment.decision != "abort":
        return None
    if p.phase == "preparing" and deployment.decision is None:
        return None
    return "abort"


def on_host_failure(
    host: str, service: str, version: str | None, in_flight: Sequence[DeploymentRecord]
) -> str | None:
    """The deployment to compensate for a failure of `service` on `host`, if any.

    Only a participant that already committed `version` counts: a failure during its own
    commit is that commit's result, and one after the deployment ended is for alerts.
    """
    for record in in_flight:
        p = record.machine.participants.get((host, service))
        if p is not None and p.version == version and p.phase == "committed":
            return record.id
    return None
