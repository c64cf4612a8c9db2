"""What a deployment is, as the state machine and the store see it.

Participants, the deployment record, the events the machine consumes and the actions it
returns, and their JSON form for the store. Pure data: the transitions live in
coordinator/machine.py, which re-exports these names.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, Literal

from shared.specs import Strategy

Key = tuple[str, str]
"""(host, service): one participant."""

Phase = Literal[
    "queued", "preparing", "committing", "holding", "paused", "baking", "reverting", "aborting",
    "completed", "aborted", "rolled_back", "failed",
]  # fmt: skip
TERMINAL: frozenset[str] = frozenset({"completed", "aborted", "rolled_back", "failed"})
ABORT_WAIT = 30.0
"""Seconds to wait for agents to confirm an abort before calling it done anyway."""

PPhase = Literal[
    "queued", "preparing", "prepared", "refused", "unavailable", "committing", "committed",
    "commit_failed", "aborting", "aborted", "reverting", "reverted", "revert_failed",
]  # fmt: skip
"""A participant's phase; `queued`: not sent its prepare yet (`max_parallel_prepare`)."""


@dataclass(frozen=True)
class Participant:
    host: str
    service: str
    version: str
    from_version: str | None
    phase: PPhase = "preparing"
    reason: str = ""

    @property
    def key(self) -> Key:
        return (self.host, self.service)


@dataclass(frozen=True)
class Deployment:
    id: str
    strategy: Strategy
    steps: tuple[tuple[Key, ...], ...]
    """Commit batches in order (waves, then batches within a wave)."""
    rank: dict[str, int]
    """Dependency rank per service: providers lower (reverts go highest first)."""
    participants: dict[Key, Participant]
    phase: Phase = "preparing"
    decision: Literal["commit", "abort"] | None = None
    reason: str = ""
    step_index: int = 0
    failing: bool = False
    revert_steps: tuple[tuple[Key, ...], ...] = ()
    revert_index: int = 0
    cause: str = ""
    """Why compensation started: health, crash_loop or alert (the automatic trigger)."""
    paused: bool = False
    """An operator paused the rollout: no further batch starts until resumed."""
    counts: Mapping[str, int] = field(default_factory=dict, compare=False, repr=False)
    """How many participants are in each phase (derived: kept up to date by
    `with_participants`, so the machine never scans all of them per event)."""
    order: tuple[Key, ...] = field(default=(), compare=False, repr=False)
    """Every participant in commit order (derived from `steps`)."""

    def __post_init__(self) -> None:
        if not self.counts and self.participants:
            object.__setattr__(self, "counts", Counter(p.phase for p in self.participants.values()))
        if not self.order and self.steps:
            object.__setattr__(self, "order", tuple(k for step in self.steps for k in step))

    @property
    def done(self) -> bool:
        return self.phase in TERMINAL

    def with_participant(self, key: Key, **changes: str) -> Deployment:
        return self.with_participants((key,), **changes)

    def with_participants(self, keys: Iterable[Key], **changes: str) -> Deployment:
        """The deployment with `changes` made to the participants `keys` (the map and
        the phase counts are copied once)."""
        participants = dict(self.participants)
        counts = Counter(self.counts)
        for key in keys:
            old = participants[key]
            participants[key] = new = replace(old, **changes)  # type: ignore[arg-type]
            counts[old.phase] -= 1
            counts[new.phase] += 1
        return replace(self, participants=participants, counts=counts)

    def with_steps(self, steps: tuple[tuple[Key, ...], ...], **changes: Any) -> Deployment:
        """The deployment with new commit batches (and `changes`)."""
        order = tuple(k for step in steps for k in step)
        return replace(self, steps=steps, order=order, **changes)

    def plan_order(self) -> list[Key]:
        """Every participant in commit order: batches in turn (how prepares go out)."""
        return list(self.order)

    def count(self, *phases: str) -> int:
        """How many participants are in one of `phases`."""
        return sum(self.counts.get(phase, 0) for phase in phases)

    def in_phase(self, *phases: str) -> list[Key]:
        if not self.count(*phases):
            return []
        return [k for k, p in self.participants.items() if p.phase in phases]


# --- events -------------------------------------------------------------------------


@dataclass(frozen=True)
class Started:
    pass


@dataclass(frozen=True)
class Voted:
    key: Key
    yes: bool
    reason: str = ""
    version: str | None = None
    """The version the vote is for; a vote for another version than the participant's
    is not a vote on this deployment (None: not stated, as in older tables)."""


@dataclass(frozen=True)
class StepDone:
    key: Key
    step: Literal["commit", "revert", "abort"]
    ok: bool
    reason: str = ""


@dataclass(frozen=True)
class TimedOut:
    timer: str
    """The token of the timer that fired; stale tokens are ignored."""


@dataclass(frozen=True)
class Failed:
    """A failure reported after a commit (health, crash loop, alert): compensate."""

    reason: str
    cause: Literal["health", "crash_loop", "alert"] = "health"


@dataclass(frozen=True)
class Recovered:
    """The coordinator restarted with this deployment in flight."""


@dataclass(frozen=True)
class Control:
    """An operator's pause, resume or abort."""

    action: Literal["pause", "resume", "abort"]


Event = Started | Voted | StepDone | TimedOut | Failed | Recovered | Control

# --- actions ------------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    command: Literal["prepare", "commit", "abort", "revert"]
    keys: tuple[Key, ...]


@dataclass(frozen=True)
class StartTimer:
    token: str
    seconds: float


@dataclass(frozen=True)
class Finished:
    phase: str
    reason: str


Action = Send | StartTimer | Finished


def new(
    deployment_id: str,
    strategy: Strategy,
    steps: list[list[Participant]],
    rank: dict[str, int],
    reason: str = "",
) -> Deployment:
    """A deployment in `preparing`, before anything was sent; `reason` says why it exists."""
    return Deployment(
        reason=reason,
        id=deployment_id,
        strategy=strategy,
        steps=tuple(tuple(p.key for p in step) for step in steps),
        rank=dict(rank),
        participants={p.key: p for step in steps for p in step},
    )


def queued(deployment_id: str, strategy: Strategy, reason: str = "") -> Deployment:
    """A deployment waiting for its services to be free; planned when it starts."""
    return Deployment(deployment_id, strategy, (), {}, {}, phase="queued", reason=reason)


def finish(d: Deployment, phase: Phase, reason: str) -> tuple[Deployment, list[Action]]:
    """The deployment ended in `phase` (with `reason`, or the one it has)."""
    reason = reason or d.reason
    return replace(d, phase=phase, reason=reason), [Finished(phase, reason)]


def to_dict(d: Deployment) -> dict[str, object]:
    """JSON-able form of `d`, for the store."""
    return {
        **_fields(d),
        "steps": [[list(k) for k in step] for step in d.steps],
        "revert_steps": [[list(k) for k in step] for step in d.revert_steps],
        "participants": [vars(p) for p in d.participants.values()],
    }


def header_json(d: Deployment) -> str:
    """`to_dict(d)` without its participants, as JSON: what the store rewrites after every
    batch of events. The batches, which change at most twice in a deployment's life, are
    encoded once per tuple, so a vote costs no O(hosts) encoding."""
    steps, reverts = _batches_json(d.steps), _batches_json(d.revert_steps)
    return json.dumps(_fields(d))[:-1] + f', "steps": {steps}, "revert_steps": {reverts}}}'


def _fields(d: Deployment) -> dict[str, object]:
    """Every field of `to_dict(d)` but the participants and the batches."""
    return {
        "id": d.id, "strategy": d.strategy.model_dump(), "rank": d.rank, "phase": d.phase,
        "decision": d.decision, "reason": d.reason, "step_index": d.step_index,
        "failing": d.failing, "revert_index": d.revert_index, "cause": d.cause,
        "paused": d.paused,
    }  # fmt: skip


@lru_cache(maxsize=64)
def _batches_json(batches: tuple[tuple[Key, ...], ...]) -> str:
    return json.dumps([[list(k) for k in batch] for batch in batches])


def from_dict(data: dict[str, Any]) -> Deployment:
    """The deployment stored as `data` by `to_dict`."""
    participants = [Participant(**p) for p in data["participants"]]
    return Deployment(
        id=data["id"],
        strategy=Strategy.model_validate(data["strategy"]),
        steps=tuple(tuple((h, s) for h, s in step) for step in data["steps"]),
        rank=dict(data["rank"]),
        participants={p.key: p for p in participants},
        phase=data["phase"],
        decision=data["decision"],
        reason=data["reason"],
        step_index=data["step_index"],
        failing=data["failing"],
        revert_steps=tuple(tuple((h, s) for h, s in step) for step in data["revert_steps"]),
        revert_index=data["revert_index"],
        cause=data.get("cause", ""),
        paused=data.get("paused", False),
    )
