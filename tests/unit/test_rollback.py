"""Rollback targets and automatic-rollback decisions (pure, table-driven)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from coordinator import rollback, triggers
from coordinator.deployment import Deployment, Participant
from coordinator.records import DeploymentRecord, Release
from shared.errors import UserError
from shared.specs import ServiceVersion, Strategy


def sv(name: str, version: str, requires: dict[str, str] | None = None) -> ServiceVersion:
    return ServiceVersion(
        name=name,
        version=version,
        artifact="file:///srv/x",
        run="true",
        requires=requires or {},
        health={"exec": "true"},
    )


def catalog(*specs: ServiceVersion) -> dict[tuple[str, str], ServiceVersion]:
    return {s.key: s for s in specs}


RELEASES = [
    Release(4, {"orders": "3.0.0"}, "bad", 4.0, "d4"),
    Release(3, {"orders": "2.0.0"}, "good", 3.0, "d3"),
    Release(2, {"orders": "1.5.0"}, "aborted", 2.0, "d2"),
    Release(1, {"orders": "1.0.0"}, "good", 1.0, "d1"),
]


@pytest.mark.parametrize(
    ("current_id", "expected"),
    [(4, 3), (3, 1), (1, None), (None, None)],
)
def test_last_good_is_the_newest_good_release_older_than_current(
    current_id: int | None, expected: int | None
) -> None:
    found = rollback.last_good(RELEASES, current_id)
    assert (found.id if found else None) == expected


def test_rollback_to_a_bad_release_needs_force() -> None:
    with pytest.raises(UserError, match="marked bad"):
        rollback.named(RELEASES, 4, force=False)
    assert rollback.named(RELEASES, 4, force=True).id == 4
    with pytest.raises(UserError, match="no release 9"):
        rollback.named(RELEASES, 9, force=False)


def test_partial_rollback_moves_only_the_service_when_its_old_version_accepts_the_rest() -> None:
    cat = catalog(
        sv("payments", "1.0.0"),
        sv("payments", "1.5.0"),
        sv("orders", "1.0.0", {"payments": ">=1.0.0"}),
        sv("orders", "2.0.0", {"payments": ">=1.5.0"}),
    )
    target = rollback.dependents_target(
        {"orders": "2.0.0", "payments": "1.5.0"},
        {"orders": "1.0.0", "payments": "1.0.0"},
        ["orders"],
        cat,
    )
    assert target == {"orders": "1.0.0", "payments": "1.5.0"}


def test_partial_rollback_moves_the_providers_the_old_version_needs() -> None:
    cat = catalog(
        sv("payments", "1.0.0"),
        sv("payments", "1.5.0"),
        sv("inventory", "1.0.0"),
        sv("inventory", "2.0.0"),
        sv("orders", "1.0.0", {"payments": "<1.5.0"}),
        sv("orders", "2.0.0", {"payments": ">=1.5.0"}),
    )
    current = {"orders": "2.0.0", "payments": "1.5.0", "inventory": "2.0.0"}
    previous = {"orders": "1.0.0", "payments": "1.0.0", "inventory": "1.0.0"}
    target = rollback.dependents_target(current, previous, ["orders"], cat)
    assert target == {"orders": "1.0.0", "payments": "1.0.0", "inventory": "2.0.0"}


def test_partial_rollback_of_a_service_not_in_the_release_is_refused() -> None:
    with pytest.raises(UserError, match="billing"):
        rollback.dependents_target({"orders": "2.0.0"}, {"orders": "1.0.0"}, ["billing"], {})


def deployment(
    kind: str = "deploy",
    state: str = "completed",
    ended_at: float = 100.0,
    scope: str = "dependents",
    services: tuple[str, ...] = ("orders",),
    phase: str = "committed",
) -> DeploymentRecord:
    """A deployment record whose participants on host h run `services` at 2.0.0."""
    deployment_id = f"{kind}-{state}"
    participants = {
        ("h", s): Participant("h", s, "2.0.0", "1.0.0", phase)  # type: ignore[arg-type]
        for s in services
    }
    machine = Deployment(
        deployment_id,
        Strategy(rollback_scope=scope),
        (),
        {},
        participants,
        state,  # type: ignore[arg-type]
    )
    return DeploymentRecord(
        id=deployment_id, request_id=None, release_id=2, from_release_id=1,
        trigger="operator", state=state, reason="", services={"orders": "2.0.0"}, plan={},
        machine=machine, started_at=50.0, ended_at=ended_at, kind=kind, requested_by="",
    )  # fmt: skip


def alert(severity: str = "critical", service: str = "orders", **facts: Any) -> triggers.Decision:
    args: dict[str, Any] = {
        "threshold": "critical",
        "current": {"orders": "2.0.0"},
        "in_flight": [],
        "last_completed": deployment(),
        "now": 160.0,
        "window": 900.0,
    }
    args.update(facts)
    return triggers.on_alert(service, severity, **args)


@pytest.mark.parametrize(
    ("decision", "expected"),
    [
        (alert(), triggers.Rollback("dependents", ("orders",))),
        (alert(last_completed=deployment(scope="all")), triggers.Rollback("all", ())),
        (
            alert(severity="warning"),
            triggers.Ignore("severity warning is below the threshold critical"),
        ),
        (alert(severity="loud"), triggers.Ignore("unknown severity 'loud'")),
        (alert(service="billing"), triggers.Ignore("billing is not in the current release")),
        (
            alert(now=2000.0),
            triggers.Ignore("outside the auto-rollback window of the current release"),
        ),
        (
            alert(last_completed=None),
            triggers.Ignore("the current release was not deployed forward; nothing to roll back"),
        ),
        (
            alert(last_completed=deployment(kind="rollback")),
            triggers.Ignore("the current release was not deployed forward; nothing to roll back"),
        ),
        (alert(in_flight=[deployment(state="baking")]), triggers.FailInFlight("deploy-baking")),
        (alert(in_flight=[deployment(state="paused")]), triggers.FailInFlight("deploy-paused")),
        (
            alert(
                in_flight=[
                    replace(
                        deployment(kind="rollback", state="queued", services=()),
                        plan={"locks": ["orders"]},
                    )
                ]
            ),
            triggers.Ignore("deployment rollback-queued is already in flight for orders"),
        ),
        (
            alert(in_flight=[deployment(kind="rollback", state="committing")]),
            triggers.Ignore("deployment rollback-committing is already in flight for orders"),
        ),
    ],
)
def test_alert_decision_follows_threshold_window_scope_and_in_flight_rules(
    decision: triggers.Decision, expected: triggers.Decision
) -> None:
    assert decision == expected


def test_host_failure_compensates_only_a_participant_that_committed_that_version() -> None:
    records = [deployment(state="baking")]
    assert triggers.on_host_failure("h", "orders", "2.0.0", records) == "deploy-baking"
    assert triggers.on_host_failure("h", "orders", "1.0.0", records) is None
    assert triggers.on_host_failure("other", "orders", "2.0.0", records) is None
    committing = [deployment(state="baking", phase="committing")]
    assert triggers.on_host_failure("h", "orders", "2.0.0", committing) is None


# --- convergence and locks (issue 4) ---------------------------------------------------

from coordinator import convergence  # noqa: E402


def test_desired_is_the_release_restricted_to_services_whose_selector_matches() -> None:
    web = sv("orders", "1.0.0").model_copy(update={"hosts": {"web": "yes"}})
    pay = sv("payments", "1.0.0").model_copy(update={"hosts": {"pay": "yes"}})
    cat = catalog(web, pay)
    release = {"orders": "1.0.0", "payments": "1.0.0"}
    assert convergence.desired({"web": "yes"}, release, cat) == {"orders": "1.0.0"}
    assert convergence.desired({"web": "yes", "pay": "yes"}, release, cat) == release
    assert convergence.desired({}, release, cat) == {}


@pytest.mark.parametrize(
    ("running", "overwrite", "fix", "unknown"),
    [
        ({"orders": "1.0.0"}, False, {}, {}),
        ({}, False, {"orders": "1.0.0"}, {}),
        ({"orders": None}, False, {"orders": "1.0.0"}, {}),
        ({"orders": "0.9.0"}, False, {"orders": "1.0.0"}, {}),
        ({"orders": "9.9.9"}, False, {}, {"orders": "9.9.9"}),
        ({"orders": "9.9.9"}, True, {"orders": "1.0.0"}, {}),
    ],
)
def test_drift_fixes_known_versions_and_reports_unknown_ones_unless_overwrite(
    running: dict[str, str | None], overwrite: bool, fix: dict[str, str], unknown: dict[str, str]
) -> None:
    found = convergence.drift(
        {"orders": "1.0.0"}, running, {("orders", "0.9.0"), ("orders", "1.0.0")}, overwrite
    )
    assert (found.fix, found.unknown) == (fix, unknown)


def test_locks_hold_changed_services_and_their_direct_requires_neighbours() -> None:
    cat = catalog(
        sv("inventory", "1.0.0"),
        sv("payments", "1.0.0", {"inventory": ">=1.0.0"}),
        sv("orders", "1.0.0", {"payments": ">=1.0.0"}),
        sv("mail", "1.0.0"),
    )
    target = {"inventory": "1.0.0", "payments": "1.0.0", "orders": "1.0.0", "mail": "1.0.0"}
    assert convergence.locks(["payments"], target, cat) == {"payments", "inventory", "orders"}
    assert convergence.locks(["mail"], target, cat) == {"mail"}
    assert convergence.locks(["orders"], target, cat) == {"orders", "payments"}
