"""Every message that crosses the broker: one envelope, one body model per kind.

The envelope is `{"kind", "id", "sent_at", "sender", "body", "sig"}` (SPEC 5). `kind`
selects the body model (a pydantic discriminated union), `id` is the idempotency key.
`decode` is the one place raw bytes become a model; it raises `DecodeError`, which the
transport dead-letters. `make` wraps a body in a fresh envelope.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.errors import DecodeError
from shared.specs import ServiceVersion, Strategy, field_of

Health = Literal["healthy", "unhealthy", "starting", "stopped", "unknown"]
Step = Literal["commit", "revert", "abort"]


class Body(BaseModel):
    """Base of every message body; `KIND` names it in the envelope."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    KIND: ClassVar[str]


# --- requests to the coordinator (lockstep.requests) and replies -------------------


class RegisterRequest(Body):
    KIND: ClassVar[str] = "register"
    versions: list[ServiceVersion] = Field(min_length=1)


class DeployRequest(Body):
    KIND: ClassVar[str] = "deploy"
    services: dict[str, str] = Field(min_length=1)
    strategy: Strategy = Field(default_factory=Strategy)
    dry_run: bool = False
    queue: bool = True
    """False: refuse instead of waiting behind a deployment of overlapping services."""


class RollbackRequest(Body):
    KIND: ClassVar[str] = "rollback"
    to: int | None = None
    services: list[str] = Field(default_factory=list)
    strategy: Strategy = Field(default_factory=Strategy)
    force: bool = False


class ControlRequest(Body):
    """pause, resume or abort a deployment; converge lets a host's unknown versions go."""

    KIND: ClassVar[str] = "control"
    action: Literal["pause", "resume", "abort", "converge"]
    deployment_id: str | None = None
    host_id: str | None = None


class QueryRequest(Body):
    KIND: ClassVar[str] = "query"
    what: Literal["status", "history", "agents", "deployment", "events"]
    deployment_id: str | None = None
    after: int = 0


class ErrorInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["user", "internal"]
    field: str = ""
    reason: str


class Reply(Body):
    KIND: ClassVar[str] = "reply"
    ok: bool
    error: ErrorInfo | None = None
    data: dict[str, Any] = Field(default_factory=dict)


# --- commands to one agent (lockstep.commands, host.<id>) ---------------------------


class Prepare(Body):
    KIND: ClassVar[str] = "prepare"
    deployment_id: str
    spec: ServiceVersion
    from_version: str | None
    rollback: bool = False
    """A rollback: use the kept release dir if intact, run `before_rollback` on commit."""


class Commit(Body):
    KIND: ClassVar[str] = "commit"
    deployment_id: str
    service: str
    version: str


class Abort(Body):
    KIND: ClassVar[str] = "abort"
    deployment_id: str
    service: str


class Revert(Body):
    KIND: ClassVar[str] = "revert"
    deployment_id: str
    service: str
    to: ServiceVersion | None
    """The version to go back to; None stops the service (it was new on the host)."""


class Ping(Body):
    KIND: ClassVar[str] = "ping"


# --- reports from agents (lockstep.reports, key coordinator) ------------------------


class ServiceState(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    service: str
    version: str | None
    health: Health
    pid: int | None = None


class AgentHello(Body):
    KIND: ClassVar[str] = "agent.register"
    host_id: str
    labels: dict[str, str]
    services: list[ServiceState]


class Heartbeat(Body):
    KIND: ClassVar[str] = "heartbeat"
    host_id: str
    services: list[ServiceState]
    labels: dict[str, str] | None = None
    """Repeated so a coordinator that missed the agent's hello still learns them."""


class Vote(Body):
    KIND: ClassVar[str] = "vote"
    deployment_id: str
    host_id: str
    service: str
    version: str
    yes: bool
    reason: str = ""


class StepResult(Body):
    KIND: ClassVar[str] = "step.result"
    deployment_id: str
    host_id: str
    service: str
    step: Step
    ok: bool
    reason: str = ""
    running: str | None = None
    """The version the service runs after the step (None when stopped)."""


class HealthChange(Body):
    KIND: ClassVar[str] = "health.change"
    host_id: str
    service: str
    version: str | None
    health: Health
    reason: str = ""


class CrashLoop(Body):
    KIND: ClassVar[str] = "crash.loop"
    host_id: str
    service: str
    version: str | None
    exits: int
    window: float
    """Seconds within which the service exited `exits` times."""


class Inquiry(Body):
    """An agent restarted with a prepared transaction and no outcome: what was decided?

    The coordinator answers by sending the decision again as a command (commit, abort).
    """

    KIND: ClassVar[str] = "txn.inquiry"
    deployment_id: str
    host_id: str
    service: str


# --- alerts from monitoring, events for other systems ------------------------------


class Alert(Body):
    KIND: ClassVar[str] = "alert"
    service: str
    severity: str
    reason: str = ""


class Event(Body):
    KIND: ClassVar[str] = "event"
    type: str
    """Also the routing key: deployment.<state>, release.<state> or agent.<state>."""
    data: dict[str, Any] = Field(default_factory=dict)


BODIES: tuple[type[Body], ...] = (
    RegisterRequest, DeployRequest, RollbackRequest, ControlRequest, QueryRequest, Reply,
    Prepare, Commit, Abort, Revert, Ping,
    AgentHello, Heartbeat, Vote, StepResult, HealthChange, CrashLoop, Inquiry, Alert, Event,
)  # fmt: skip


def _now() -> datetime:
    return datetime.now(UTC)


class _EnvelopeBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(default_factory=lambda: uuid.uuid4().hex, min_length=1, max_length=128)
    sent_at: datetime = Field(default_factory=_now)
    sender: str = Field(min_length=1, max_length=256)
    sig: str | None = None


def _envelope_class(body: type[Body]) -> type[_EnvelopeBase]:
    name = "".join(part.title() for part in body.KIND.replace(".", "_").split("_")) + "Envelope"
    annotations = {"kind": Literal[body.KIND], "body": body}
    return type(name, (_EnvelopeBase,), {"__annotations__": annotations, "__module__": __name__})


_CLASSES = {body.KIND: _envelope_class(body) for body in BODIES}


class Envelope(_EnvelopeBase):
    """The typed view every consumer works with: `kind` plus the validated `body`."""

    kind: str
    body: Body


def make(body: Body, sender: str, **fields: Any) -> Envelope:
    """A fresh envelope around `body` (new id, sent now, unsigned)."""
    return Envelope(kind=body.KIND, body=body, sender=sender, **fields)


def encode(envelope: Envelope) -> bytes:
    """The wire form of `envelope`."""
    return envelope.model_dump_json(serialize_as_any=True).encode()


def decode(raw: bytes) -> Envelope:
    """The envelope in `raw`, its body validated against its kind; else `DecodeError`."""
    try:
        kind = _EnvelopeKind.model_validate_json(raw).kind
    except ValidationError as e:
        path, reason = field_of(e)
        raise DecodeError(raw, f"{path or 'message'}: {reason}") from e
    cls = _CLASSES.get(kind)
    if cls is None:
        raise DecodeError(raw, f"kind: unknown message kind {kind!r}")
    try:
        typed = cls.model_validate_json(raw)
    except ValidationError as e:
        path, reason = field_of(e)
        raise DecodeError(raw, f"{path}: {reason}") from e
    return Envelope.model_construct(**{k: getattr(typed, k) for k in Envelope.model_fields})


class _EnvelopeKind(BaseModel):
    kind: str


def decode_alert(raw: bytes, sender: str = "monitoring") -> Envelope:
    """An alert as monitoring systems publish it: a bare body or a full envelope."""
    try:
        return decode(raw)
    except DecodeError as envelope_error:
        try:
            body = Alert.model_validate_json(raw)
        except ValidationError as e:
            if b'"kind"' in raw:
                raise envelope_error from None
            path, reason = field_of(e)
            raise DecodeError(raw, f"{path or 'alert'}: {reason}") from e
    return make(body, sender)
