"""Tier (a): what a finished deployment means for releases and the fleet (coordinator/outcome.py).

Pure and table-driven: each row is the facts about a deployment that ended and the
writes the store must carry out for it (no store, no broker).
"""

from __future__ import annotations

import pytest

from coordinator import outcome
from coordinator.deployment import TERMINAL
from coordinator.outcome import Ended, Outcome


def ended(
    phase: str = "completed",
    kind: str = "deploy",
    new_release: bool = True,
    release_id: int | None = 5,
    from_release_id: int | None = 4,
    current_release_id: int | None = 4,
) -> Ended:
    return Ended(phase, kind, new_release, release_id, from_release_id, current_release_id)


def test_release_states_cover_exactly_the_terminal_phases() -> None:
    assert set(outcome.RELEASE_STATE) == TERMINAL
    assert outcome.RELEASE_STATE == {
        "completed": "good", "aborted": "aborted", "rolled_back": "bad", "failed": "bad",
    }  # fmt: skip


@pytest.mark.parametrize("phase", ["queued", "preparing", "committing", "baking", "reverting"])
def test_a_phase_that_is_not_terminal_has_no_release_state(phase: str) -> None:
    with pytest.raises(ValueError, match="not a terminal phase"):
        outcome.release_state(phase)


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        # a deploy that completed: its release is good and becomes current
        (ended(), Outcome("good", fleet_to=5)),
        # one that did not complete: its release is marked, the fleet stays
        (ended(phase="aborted"), Outcome("aborted")),
        (ended(phase="rolled_back"), Outcome("bad")),
        (ended(phase="failed"), Outcome("bad")),
        # another deployment moved the fleet meanwhile: merge both changes
        (ended(current_release_id=6), Outcome("good", fleet_to=5, merge=True)),
        # the very first deployment (no fleet yet) merges nothing
        (ended(from_release_id=None, current_release_id=None), Outcome("good", fleet_to=5)),
        # a rollback to an existing release: it becomes current, the one it left is bad
        (ended(kind="rollback", new_release=False, release_id=3), Outcome(fleet_to=3, marks_bad=4)),
        # ... and it never merges, even if the fleet moved
        (
            ended(kind="rollback", new_release=False, release_id=3, current_release_id=6),
            Outcome(fleet_to=3, marks_bad=4),
        ),
        # a partial (dependents) rollback makes a new release, good once it completes
        (ended(kind="rollback"), Outcome("good", fleet_to=5, marks_bad=4)),
        # a rollback to the release it started from leaves nothing bad
        (ended(kind="rollback", new_release=False, release_id=4), Outcome(fleet_to=4)),
        # a rollback that did not complete marks nothing it left
        (ended(kind="rollback", new_release=False, release_id=3, phase="failed"), Outcome()),
        # a deploy that changed nothing returns to the current release: pointer re-set
        (ended(new_release=False, release_id=4), Outcome(fleet_to=4)),
        # convergence never moves the fleet pointer
        (ended(kind="converge", new_release=False, release_id=4), Outcome()),
        (
            ended(
                kind="converge",
                new_release=True,
                release_id=1,
                from_release_id=None,
                current_release_id=None,
            ),
            Outcome("good"),
        ),
        # a queued deployment aborted before it started has no release at all
        (ended(phase="aborted", new_release=False, release_id=None), Outcome()),
    ],
)
def test_outcome_marks_the_release_and_moves_the_fleet_as_the_phase_and_kind_say(
    facts: Ended, expected: Outcome
) -> None:
    assert outcome.decide(facts) == expected


@pytest.mark.parametrize(
    ("current", "mine", "base", "expected"),
    [
        # disjoint changes: both kept
        (
            {"orders": "1.0.0", "payments": "2.0.0"},
            {"orders": "1.1.0", "payments": "1.0.0"},
            {"orders": "1.0.0", "payments": "1.0.0"},
            {"orders": "1.1.0", "payments": "2.0.0"},
        ),
        # a service the other deployment added stays
        (
            {"orders": "1.0.0", "mail": "1.0.0"},
            {"orders": "1.1.0"},
            {"orders": "1.0.0"},
            {"orders": "1.1.0", "mail": "1.0.0"},
        ),
        # a service this deployment added is kept (absent from its base)
        (
            {"orders": "1.2.0"},
            {"orders": "1.0.0", "mail": "1.0.0"},
            {"orders": "1.0.0"},
            {"orders": "1.2.0", "mail": "1.0.0"},
        ),
        # the merge is this release itself: no new release
        ({"orders": "1.0.0"}, {"orders": "1.1.0"}, {"orders": "1.0.0"}, None),
    ],
)
def test_merge_keeps_the_current_release_and_this_deployments_own_changes(
    current: dict[str, str],
    mine: dict[str, str],
    base: dict[str, str],
    expected: dict[str, str] | None,
) -> None:
    assert outcome.merge(current, mine, base) == expected
