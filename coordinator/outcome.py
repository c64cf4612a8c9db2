"""What a finished deployment means for its release and the fleet's pointer. Pure.

The store calls `decide` when it saves a deployment that reached a terminal phase
(`coordinator.deployment.TERMINAL`), and `merge` when the decision says another
deployment moved the fleet meanwhile; it then carries out the writes, nothing more:
- the deployment's own release (when it made a new one) becomes good, aborted or bad;
- a completed deploy or rollback moves the fleet pointer to its release, or to the
  merge of its changes with the release that became current meanwhile (concurrent
  deployments hold disjoint locks, so both changes are kept);
- a completed rollback marks the release it left bad (it is never the last good one).
A convergence only brings one host to the current release: it never moves the pointer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from coordinator.deployment import TERMINAL

ReleaseState = Literal["pending", "good", "aborted", "bad"]


def release_state(phase: str) -> ReleaseState:
    """The state a deployment's new release takes when the deployment ends in `phase`:
    good if it completed, aborted if it never switched anything, bad otherwise (rolled
    back, failed, or any terminal phase added later: never good by default)."""
    if phase not in TERMINAL:
        raise ValueError(f"{phase!r} is not a terminal phase")
    if phase == "completed":
        return "good"
    return "aborted" if phase == "aborted" else "bad"


RELEASE_STATE: Mapping[str, ReleaseState] = {phase: release_state(phase) for phase in TERMINAL}
"""Terminal phase -> the state of the release it made (keys: exactly `TERMINAL`)."""


@dataclass(frozen=True)
class Ended:
    """The facts about a deployment that just ended."""

    phase: str
    kind: str
    """deploy, rollback or converge."""
    new_release: bool
    """It made a release of its own (False: it returns to an existing one)."""
    release_id: int | None
    from_release_id: int | None
    current_release_id: int | None
    """The fleet's current release now (another deployment may have moved it)."""


@dataclass(frozen=True)
class Outcome:
    """The writes the store carries out for a deployment that ended."""

    release_state: ReleaseState | None = None
    """The new state of the deployment's own release (None: left as it is)."""
    fleet_to: int | None = None
    """The release the fleet pointer moves to (None: it stays)."""
    merge: bool = False
    """Move the pointer to `merge(current, mine, base)` instead, if that differs from
    the release (another deployment completed meanwhile)."""
    marks_bad: int | None = None
    """A release the deployment left, now bad (a completed rollback's starting point)."""


def decide(ended: Ended) -> Outcome:
    """What `ended` changes in the releases and the fleet pointer."""
    state = release_state(ended.phase) if ended.new_release else None
    release_id, from_id = ended.release_id, ended.from_release_id
    if ended.phase != "completed" or release_id is None or ended.kind == "converge":
        return Outcome(release_state=state)
    merge = ended.new_release and ended.current_release_id != from_id
    left_bad = ended.kind == "rollback" and from_id is not None and from_id != release_id
    return Outcome(
        release_state=state,
        fleet_to=release_id,
        merge=merge,
        marks_bad=from_id if left_bad else None,
    )


def merge(
    current: Mapping[str, str], mine: Mapping[str, str], base: Mapping[str, str]
) -> dict[str, str] | None:
    """The current release with the services this deployment changed from `base` set to
    `mine`; None when that is `mine` itself (no new release needed)."""
    merged = {**current, **{k: v for k, v in mine.items() if base.get(k) != v}}
    return None if merged == dict(mine) else merged
