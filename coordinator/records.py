"""What the coordinator's store returns: typed, immutable records.

`coordinator.store` builds these from its rows; everything else (the runtime, intake,
the watch, the pure decisions in triggers, rollback and views) reads their attributes
and never sees a database row. A deployment record carries the state machine's own
`Deployment` (participants included), so no caller parses the stored JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from coordinator.deployment import Deployment
from shared.messages import ServiceState


@dataclass(frozen=True)
class DeploymentRecord:
    """One deployment: what was asked, how it was planned, where its machine stands."""

    id: str
    request_id: str | None
    release_id: int | None
    from_release_id: int | None
    trigger: str
    state: str
    """The machine's phase when last saved (`queued` until it starts)."""
    reason: str
    services: dict[str, str]
    """The target version set."""
    plan: dict[str, Any]
    """The stored plan: the request and its lock set, and once started the plan itself."""
    machine: Deployment
    started_at: float
    ended_at: float | None
    kind: str
    """deploy, rollback or converge."""
    requested_by: str

    @property
    def locks(self) -> list[str]:
        """The services this deployment holds while in flight (coordinator.convergence)."""
        return list(self.plan.get("locks", []))

    @property
    def request(self) -> dict[str, Any]:
        """The request it was queued with (coordinator.intake.Request, as JSON)."""
        request: dict[str, Any] = self.plan["request"]
        return request


@dataclass(frozen=True)
class Release:
    """A numbered version set and what became of it."""

    id: int
    services: dict[str, str]
    state: str
    """pending, good, aborted or bad (coordinator.outcome)."""
    created_at: float
    deployment_id: str | None
    """The deployment that made it."""


@dataclass(frozen=True)
class AgentRecord:
    """An enrolled host: its labels, what it runs, when it was last heard of, its key."""

    host_id: str
    labels: dict[str, str]
    services: tuple[ServiceState, ...]
    last_seen: float
    state: str
    """alive or lost, as the watch last judged it."""
    overwrite: bool
    """An operator asked to converge it over versions lockstep never deployed."""
    key_state: str
    public_key: str
    heartbeat_interval: float | None = None
    """The period it beats at, by which it is judged lost (None: heartbeat_interval)."""

    def running(self) -> dict[str, str]:
        """service -> the version the host runs (services it runs none of: absent)."""
        return {s.service: s.version for s in self.services if s.version is not None}


@dataclass(frozen=True)
class EventRecord:
    """One recorded event (`lockstep events`)."""

    seq: int
    ts: float
    type: str
    deployment_id: str | None
    data: dict[str, Any]


@dataclass(frozen=True)
class Registered:
    """What registering one service version did."""

    name: str
    version: str
    result: Literal["added", "unchanged"]


@dataclass(frozen=True)
class LeaseRecord:
    """Who holds the coordinators' lease (coordinator.lease), as the store's clock sees it."""

    epoch: int
    """Taken +1 by every takeover; every write of the holder is conditional on it."""
    holder: str
    """The holding process's id (unique per start), "" before anyone held it."""
    host: str
    pid: int
    since: float
    """When the holder took it (the store's clock, Unix time)."""
    expires_at: float
    now: float
    """The store's clock when this was read."""

    @property
    def active(self) -> bool:
        """Whether a coordinator holds it now (it was taken and has not expired)."""
        return bool(self.holder) and self.expires_at > self.now
