"""Every exchange, queue, routing-key and broker-user name of SPEC 5 and 7, as data.

Names are built here and nowhere else. The coordinator (or `lockstep broker setup`)
declares the topology and every agent's queue; an agent declares nothing, since its
least-privilege broker user may only read its own queue and write reports. What each
exchange accepts (`ACCEPTS`) and what each role may touch (`permissions`) live here
too, so the transport's kind check and the broker's permissions agree by construction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

REQUESTS = "lockstep.requests"
COMMANDS = "lockstep.commands"
REPORTS = "lockstep.reports"
EVENTS = "lockstep.events"
ALERTS = "lockstep.alerts"
DEAD = "lockstep.dead"

COORDINATOR_QUEUE = "lockstep.coordinator"
HEARTBEATS_QUEUE = "lockstep.coordinator.beats"
LEGACY_HEARTBEATS_QUEUE = "lockstep.coordinator.heartbeats"
"""Where heartbeats went before issue 10: a durable queue, which on a cluster is down
for as long as its node is; the coordinator deletes it on start."""
DEAD_QUEUE = "lockstep.dead"
REPORTS_KEY = "coordinator"
HEARTBEAT_KEY = "heartbeat"
"""Routing key of heartbeats on lockstep.reports: they go to a queue of their own, so
they never wait behind votes (SPEC 5: transient, with a TTL)."""
DEAD_KEY = "dead"
"""Routing key on lockstep.reports that leads to lockstep.dead: how an agent, which may
write only to lockstep.reports, dead-letters a command it refused, with the reason."""
REQUEST_KEYS = (
    "register", "deploy", "rollback", "query", "pause", "resume", "abort", "converge", "agents",
)  # fmt: skip
"""SPEC 5's keys, and `agents` for approve/reject/revoke/remove of an agent's key."""

REASON_HEADER = "x-lockstep-reason"
"""Header on a dead-lettered message: why it was rejected."""

REQUEST_KINDS = frozenset({"register", "deploy", "rollback", "control", "query"})
REPORT_KINDS = frozenset(
    {"agent.register", "heartbeat", "vote", "step.result", "health.change", "crash.loop",
     "txn.inquiry"}
)  # fmt: skip
COMMAND_KINDS = frozenset({"prepare", "commit", "abort", "revert", "ping"})
ACCEPTS: dict[str, frozenset[str]] = {
    REQUESTS: REQUEST_KINDS,
    REPORTS: REPORT_KINDS,
    COMMANDS: COMMAND_KINDS,
    ALERTS: frozenset({"alert"}),
    EVENTS: frozenset({"event"}),
    "": frozenset({"reply"}),
}
"""Exchange -> the message kinds it carries; anything else is dead-lettered (SPEC 7)."""

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
    dead_letters: bool = True
    """Rejected (and expired) messages go to lockstep.dead."""
    durable: bool = True
    """False: the broker drops it with its node (and on restart), and whoever consumes
    it declares it again wherever it reconnects (heartbeats)."""

    def declare_arguments(self) -> dict[str, object]:
        args: dict[str, object] = {"x-queue-type": self.type, **self.arguments}
        if self.dead_letters:
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


def heartbeats_queue() -> Queue:
    """The coordinator's heartbeat queue: classic and not durable (heartbeats are
    transient: on a cluster, when its node dies, the coordinator declares it again on the
    node it reconnects to), one active consumer like the coordinator's queue, bounded
    (the oldest dropped first), and expired heartbeats are simply gone, not
    dead-lettered."""
    return Queue(
        HEARTBEATS_QUEUE, "classic", ((REPORTS, HEARTBEAT_KEY),), single_active_consumer=True,
        arguments={"x-max-length": 100_000, "x-overflow": "drop-head"}, dead_letters=False,
        durable=False,
    )  # fmt: skip


def agent_queue(host_id: str, queue_type: QueueType = "quorum") -> Queue:
    """One agent's command queue, bound to its host key only."""
    return Queue(agent_queue_name(host_id), queue_type, ((COMMANDS, host_key(host_id)),))


def dead_queue(queue_type: QueueType = "classic") -> Queue:
    """Where dead-lettered messages wait for an operator: durable; made a quorum queue
    where the agents' queues are quorum ones (a cluster: it then outlives any one node),
    an existing one is kept as it is (`Link.declare`)."""
    return Queue(DEAD_QUEUE, queue_type, ((DEAD, ""), (REPORTS, DEAD_KEY)), dead_letters=False)


# --- broker users per role (SPEC 7) ------------------------------------------------

COORDINATOR_USER = "lockstep-coordinator"
OPERATOR_USER = "lockstep-operator"
ALERTS_USER = "lockstep-alerts"
AGENT_USER_PREFIX = "lockstep-agent-"


def agent_user(host_id: str) -> str:
    """The broker user of one agent; reports it publishes carry it as `user_id`."""
    return f"{AGENT_USER_PREFIX}{host_id}"


@dataclass(frozen=True)
class Permissions:
    """RabbitMQ configure/write/read regular expressions for one user on one vhost."""

    configure: str
    write: str
    read: str


_REPLY_QUEUES = r"(amq\.gen-.*|amq_[0-9a-f]{32})"
"""Server-named queues, and the ones aio-pika's robust channels name themselves."""


def permissions(user: str) -> Permissions:
    """What `user` may touch: the coordinator all of lockstep; an operator publishes
    requests and reads its replies and the events; a monitoring system publishes alerts;
    an agent reads its own queue and writes reports (refusals go to lockstep.dead
    through lockstep.reports, key `dead`), nothing else."""
    if user == COORDINATOR_USER:
        return Permissions(r"^lockstep\..*", r"^(lockstep\..*|amq\.default)$", r"^lockstep\..*")
    if user == OPERATOR_USER:
        return Permissions(
            f"^{_REPLY_QUEUES}$",
            rf"^({_REPLY_QUEUES}|lockstep\.requests)$",
            rf"^({_REPLY_QUEUES}|lockstep\.events)$",
        )
    if user == ALERTS_USER:
        return Permissions("^$", r"^lockstep\.alerts$", "^$")
    if user.startswith(AGENT_USER_PREFIX):
        queue = re.escape(agent_queue_name(user.removeprefix(AGENT_USER_PREFIX)))
        return Permissions("^$", r"^lockstep\.reports$", f"^{queue}$")
    raise ValueError(f"{user!r} is not a lockstep role")
