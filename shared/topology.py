"""Every exchange, queue and routing-key name of SPEC 5, and the arguments they carry.

Names are built here and nowhere else. The transport declares what these describe;
both sides declare idempotently (same names, same arguments), so whichever starts
first creates the topology and the other finds it in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

REQUESTS = "lockstep.requests"
COMMANDS = "lockstep.commands"
REPORTS = "lockstep.reports"
EVENTS = "lockstep.events"
ALERTS = "lockstep.alerts"
DEAD = "lockstep.dead"

COORDINATOR_QUEUE = "lockstep.coordinator"
DEAD_QUEUE = "lockstep.dead"
REPORTS_KEY = "coordinator"
REQUEST_KEYS = ("register", "deploy", "rollback", "query", "pause", "resume", "abort", "converge")

REASON_HEADER = "x-lockstep-reason"
"""Header on a dead-lettered message: why it was rejected."""

ExchangeType = Literal["direct", "topic", "fanout"]
QueueType = Literal["quorum", "classic"]


@dataclass(frozen=True)
class Exchange:
    name: str
    type: ExchangeType


@dataclass(frozen=True)
class Queue:
    name: str
    type: QueueType
    bindings: tuple[tuple[str, str], ...]
    """(exchange, routing key) pairs."""
    single_active_consumer: bool = False
    arguments: dict[str, object] = field(default_factory=dict)

    def declare_arguments(self) -> dict[str, object]:
        args: dict[str, object] = {"x-queue-type": self.type, **self.arguments}
        if self.name != DEAD_QUEUE:
            args["x-dead-letter-exchange"] = DEAD
        if self.single_active_consumer:
            args["x-single-active-consumer"] = True
        return args


EXCHANGES = (
    Exchange(REQUESTS, "direct"),
    Exchange(COMMANDS, "topic"),
    Exchange(REPORTS, "direct"),
    Exchange(EVENTS, "topic"),
    Exchange(ALERTS, "topic"),
    Exchange(DEAD, "fanout"),
)


def host_key(host_id: str) -> str:
    """Routing key of the commands for one agent."""
    return f"host.{host_id}"


def agent_queue_name(host_id: str) -> str:
    return f"lockstep.agent.{host_id}"


def event_key(event_type: str) -> str:
    """Routing key of an event: its type, e.g. `deployment.completed`."""
    return event_type


def alert_key(service: str, severity: str) -> str:
    return f"{service}.{severity}"


def coordinator_queue() -> Queue:
    """The coordinator's queue: requests, reports and alerts; one active consumer."""
    bindings = tuple((REQUESTS, key) for key in REQUEST_KEYS)
    bindings += ((REPORTS, REPORTS_KEY), (ALERTS, "#"))
    return Queue(COORDINATOR_QUEUE, "quorum", bindings, single_active_consumer=True)


def agent_queue(host_id: str, queue_type: QueueType = "quorum") -> Queue:
    """One agent's command queue, bound to its host key only."""
    return Queue(agent_queue_name(host_id), queue_type, ((COMMANDS, host_key(host_id)),))


def dead_queue() -> Queue:
    """Where dead-lettered messages wait for an operator (durable classic)."""
    return Queue(DEAD_QUEUE, "classic", ((DEAD, ""),))
