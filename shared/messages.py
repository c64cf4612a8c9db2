"""Every message that crosses the broker: one envelope, one body model per kind.

The envelope is `{"kind", "id", "sent_at", "expires_at", "sender", "to", "body", "sig"}`
(SPEC 5). `kind` selects the body model (a pydantic discriminated union), `id` is the
idempotency key, `to` the host a command is for; `sig` is added by `shared.signing`.
`decode` is the one place raw bytes become a model; it raises `DecodeError`, which the
transport dead-letters. `make` wraps a body in a fresh envelope.

Identifiers that reach a filesystem path on some host (deployment ids, service names,
versions, host ids) are validated against strict patterns right here, where they are
decoded: `../x` or `/abs` never gets as far as a path.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from shared.errors import DecodeError
from shared.specs import HOST, NAME, VERSION, ServiceVersion, Strategy, field_of

ID = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$"
DeploymentId = Annotated[str, Field(pattern=ID)]
HostId = Annotated[str, Field(pattern=HOST)]
ServiceName = Annotated[str, Field(pattern=NAME)]
VersionText = Annotated[str, Field(pattern=VERSION)]
PublicKey = Annotated[str, Field(pattern=r"^[A-Za-z0-9+/]{43}=$")]
"""An Ed25519 public key: its 32 raw bytes, base64."""

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
    action: Literal["pause", "resume", "abort", "converge", "approve", "reject", "revoke", "remove"]
    deployment_id: DeploymentId | None = None
    host_id: HostId | None = None


class QueryRequest(Body):
    KIND: ClassVar[str] = "query"
    what: Literal["status", "history", "agents", "deployment", "events"]
    deployment_id: DeploymentId | None = None
    after: int = 0
    limit: int = Field(default=100, ge=1, le=10_000)
    """history: at most this many deployments, newest first."""
    before: DeploymentId | None = None
    """history: only deployments started before this one (the previous page's last)."""


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
    deployment_id: DeploymentId
    spec: ServiceVersion
    from_version: VersionText | None
    rollback: bool = False
    """A rollback: use the kept release dir if intact, run `before_rollback` on commit."""


class Commit(Body):
    KIND: ClassVar[str] = "commit"
    deployment_id: DeploymentId
    service: ServiceName
    version: VersionText


class Abort(Body):
    KIND: ClassVar[str] = "abort"
    deployment_id: DeploymentId
    service: ServiceName


class Revert(Body):
    KIND: ClassVar[str] = "revert"
    deployment_id: DeploymentId
    service: ServiceName
    to: ServiceVersion | None
    """The version to go back to; None stops the service (it was new on the host)."""


Period = Annotated[float, Field(gt=0, le=3600)]
"""A heartbeat period in seconds."""
Since = Field(default=None, exclude_if=lambda value: value is None)
"""A field newer than the protocol's first release: left out of the wire form (and so
of what is signed) while None, so a peer that predates it reads and verifies the message
unchanged, and a message from such a peer verifies here too."""


class Ping(Body):
    KIND: ClassVar[str] = "ping"
    heartbeat_interval: Period | None = Since
    """From now on, beat every this many seconds (never faster than the agent's own
    setting): the coordinator spreads a large fleet's heartbeats (coordinator.pace)."""


# --- reports from agents (lockstep.reports, key coordinator) ------------------------


class ServiceState(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    service: ServiceName
    version: VersionText | None
    health: Health
    pid: int | None = None


class AgentHello(Body):
    KIND: ClassVar[str] = "agent.register"
    host_id: HostId
    labels: dict[str, str]
    services: list[ServiceState]
    public_key: PublicKey
    """The key this agent signs with; a new host's key starts `pending` (SPEC 7)."""


class Heartbeat(Body):
    KIND: ClassVar[str] = "heartbeat"
    host_id: HostId
    services: list[ServiceState]
    labels: dict[str, str] | None = None
    """Repeated so a coordinator that missed the agent's hello still learns them."""
    public_key: PublicKey | None = None
    """Repeated for the same reason: a coordinator that never saw the hello enrolls it."""
    interval: Period | None = Since
    """The period this agent beats at now, by which the coordinator judges it lost;
    None (not said) while that is the agent's own heartbeat_interval, which is the
    coordinator's too (README), or from an agent that predates the field."""


class Vote(Body):
    KIND: ClassVar[str] = "vote"
    deployment_id: DeploymentId
    host_id: HostId
    service: ServiceName
    version: VersionText
    yes: bool
    reason: str = ""


class StepResult(Body):
    KIND: ClassVar[str] = "step.result"
    deployment_id: DeploymentId
    host_id: HostId
    service: ServiceName
    step: Step
    ok: bool
    reason: str = ""
    running: VersionText | None = None
    """The version the service runs after the step (None when stopped)."""


class HealthChange(Body):
    KIND: ClassVar[str] = "health.change"
    host_id: HostId
    service: ServiceName
    version: VersionText | None
    health: Health
    reason: str = ""


class CrashLoop(Body):
    KIND: ClassVar[str] = "crash.loop"
    host_id: HostId
    service: ServiceName
    version: VersionText | None
    exits: int
    window: float
    """Seconds within which the service exited `exits` times."""


class Inquiry(Body):
    """An agent restarted with a prepared transaction and no outcome: what was decided?

    The coordinator answers by sending the decision again as a command (commit, abort).
    """

    KIND: ClassVar[str] = "txn.inquiry"
    deployment_id: DeploymentId
    host_id: HostId
    service: ServiceName


# --- alerts from monitoring, events for other systems ------------------------------


class Alert(Body):
    """SPEC 5: `{"service", "severity", "reason"}` plus any other fields (kept, ignored):
    Alertmanager's `labels`, `annotations` and the like."""

    model_config = ConfigDict(extra="allow", frozen=True)
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
    id: str = Field(default_factory=lambda: uuid.uuid4().hex, pattern=ID)
    sent_at: AwareDatetime = Field(default_factory=_now)
    expires_at: AwareDatetime | None = None
    """Past this (plus the allowed clock skew) a command is refused (SPEC 7)."""
    sender: str = Field(min_length=1, max_length=256)
    to: HostId | None = None
    """The host a command is for; an agent refuses a command addressed elsewhere."""
    sig: str | None = Field(default=None, max_length=200)


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
