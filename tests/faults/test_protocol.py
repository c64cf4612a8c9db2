"""Issue 5 fault suite: one fault at a named protocol point per scenario, then SPEC 6.4
invariants I1-I5 checked against the coordinator and every service process.

Crashes land exactly where named: the process is started with LOCKSTEP_FAULT_POINT
and kills itself there (shared/faults.py), then it is started again without it.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import uuid

import pytest

from shared import topology
from shared.messages import Commit, Prepare, StepResult, Vote, encode, make
from shared.specs import load_service_version
from tests.e2e.fleet import Fleet
from tests.e2e.test_core import PAY, WEB
from tests.faults.invariants import check, settled
from tests.support.procs import wait_until
from tests.support.rabbit import publish_raw, rabbitmqctl
from tests.support.slowserver import slow_files

pytestmark = pytest.mark.fault

V1 = {"orders": "1.0.0", "payments": "1.0.0"}
V2 = {"orders": "2.0.0", "payments": "2.0.0"}


def baseline(fleet: Fleet, artifact_url: str | None = None) -> None:
    """v1 deployed, v2 registered (optionally fetched from `artifact_url`)."""
    fleet.register("payments", "1.0.0", hosts=PAY)
    fleet.register("orders", "1.0.0", hosts=WEB, requires={"payments": ">=1.0.0"})
    for name, extra in (("payments", {}), ("orders", {"requires": {"payments": ">=2.0.0"}})):
        url = f"{artifact_url}/{name}-2.0.0.tar.gz" if artifact_url else None
        fleet.register(name, "2.0.0", hosts=PAY if name == "payments" else WEB,
                       artifact_url=url, **extra)  # type: ignore[arg-type]  # fmt: skip
    first = fleet.deploy("orders=1.0.0", "payments=1.0.0")
    assert first.code == 0, first.stdout + first.stderr


def start_v2(fleet: Fleet, *flags: str) -> str:
    """Ask for v2 without waiting; the id of the accepted (or recovered) deployment."""
    result = fleet.cli("deploy", "orders=2.0.0", "payments=2.0.0", "--json", *flags, timeout=60)
    if result.code == 0:
        return str(result.doc["deployment_id"])
    # The coordinator died before replying: the request is in its queue, not lost.
    return ""


def newest(fleet: Fleet) -> str:
    rows = wait_until(lambda: [d for d in fleet.history()["deployments"]
                               if d["services"] == V2], 60, "the v2 deployment")  # fmt: skip
    return str(rows[0]["deployment_id"])


def restart_coordinator_after_fault(fleet: Fleet) -> None:
    assert fleet.coordinator is not None
    fleet.coordinator.wait(60)
    assert fleet.coordinator.returncode == -signal.SIGKILL
    fleet.start_coordinator()


@pytest.mark.parametrize(
    ("point", "flags", "outcome"),
    [
        ("coordinator.prepare_sent", (), "aborted"),
        ("coordinator.decided", (), "completed"),
        ("coordinator.mid_commit", ("--max-parallel", "1"), "completed"),
    ],
)
def test_coordinator_killed_before_decision_aborts_after_decision_completes(
    three_hosts: Fleet, point: str, flags: tuple[str, ...], outcome: str
) -> None:
    fleet = three_hosts
    baseline(fleet)
    fleet.kill_coordinator()
    fleet.start_coordinator(fault=point)

    start_v2(fleet, *flags)
    restart_coordinator_after_fault(fleet)

    row = settled(fleet, newest(fleet))
    assert row["state"] == outcome, row
    check(fleet, row, V1, V2)


@pytest.mark.parametrize("point", ["agent.voted", "agent.switched"])
def test_agent_killed_after_voting_or_mid_switch_learns_the_outcome_after_restart(
    three_hosts: Fleet, point: str
) -> None:
    fleet = three_hosts
    baseline(fleet)
    fleet.kill_agent("host-c")
    fleet.start_agent("host-c", fault=point)
    fleet.wait_alive("host-c")

    deployment_id = start_v2(fleet)
    proc = fleet.hosts["host-c"].proc
    assert proc is not None
    proc.wait(60)
    assert proc.returncode == -signal.SIGKILL
    fleet.start_agent("host-c")

    row = settled(fleet, deployment_id)
    assert row["state"] == "completed", row
    check(fleet, row, V1, V2)


def test_agent_stopped_longer_than_prepare_timeout_aborts(three_hosts: Fleet) -> None:
    fleet = three_hosts
    baseline(fleet)
    fleet.signal_agent("host-c", signal.SIGSTOP)
    try:
        deployment_id = start_v2(fleet, "--prepare-timeout", "2s")
        row = settled(fleet, deployment_id)
    finally:
        fleet.signal_agent("host-c", signal.SIGCONT)
    assert row["state"] == "aborted"
    assert "host-c" in row["reason"]
    check(fleet, row, V1, V2)


def _broker_restart() -> None:
    rabbitmqctl("stop_app")
    rabbitmqctl("start_app")
    rabbitmqctl("await_startup")


def test_broker_restart_during_prepare_loses_nothing(three_hosts: Fleet) -> None:
    fleet = three_hosts
    with slow_files(fleet.artifacts, delay=4.0) as url:
        baseline(fleet, artifact_url=url)
        deployment_id = start_v2(fleet)
        wait_until(lambda: fleet.deployment(deployment_id)["state"] == "preparing", 10, "prepare")
        _broker_restart()
        row = settled(fleet, deployment_id, timeout=120)
    assert row["state"] == "completed", row
    check(fleet, row, V1, V2)


@pytest.mark.parametrize("fault", ["restart", "close_all_connections"])
def test_broker_restart_or_dropped_connections_during_commit_lose_nothing(
    three_hosts: Fleet, fault: str
) -> None:
    fleet = three_hosts
    baseline(fleet)
    deployment_id = start_v2(fleet, "--max-parallel", "1")
    wait_until(lambda: any(s["deployment_id"] == deployment_id for h in fleet.hosts
                           for s in fleet.switches(h)), 30, "the first commit")  # fmt: skip
    if fault == "restart":
        _broker_restart()
    else:
        rabbitmqctl("close_all_connections", "fault test")
    row = settled(fleet, deployment_id, timeout=120)
    assert row["state"] == "completed", row
    check(fleet, row, V1, V2)


def _holding(fleet: Fleet) -> str:
    """v2 started with a canary hold; its id once host-a's payments is the committed canary."""
    deployment_id = start_v2(fleet, "--canary", "1", "--canary-bake", "4s")
    wait_until(lambda: fleet.deployment(deployment_id)["state"] == "holding", 30, "the hold")
    return deployment_id


def test_command_delivered_twice_has_its_effect_once(three_hosts: Fleet, amqp_url: str) -> None:
    fleet = three_hosts
    baseline(fleet)
    deployment_id = _holding(fleet)
    pid = fleet.pid("host-a", "payments")
    spec = load_service_version(fleet.specs / "payments-2.0.0.toml")
    prepare = make(
        Prepare(deployment_id=deployment_id, spec=spec, from_version="1.0.0"), "coordinator"
    )
    commit = make(
        Commit(deployment_id=deployment_id, service="payments", version="2.0.0"), "coordinator"
    )
    again = make(
        Commit(deployment_id=deployment_id, service="payments", version="2.0.0"), "coordinator"
    )
    marker = make(Commit(deployment_id=uuid.uuid4().hex, service="payments", version="9.9.9"), "t")
    bodies = [encode(e) for e in (prepare, prepare, commit, commit, again, marker)]
    asyncio.run(publish_raw(amqp_url, topology.COMMANDS, topology.host_key("host-a"), bodies))

    wait_until(lambda: _handled(fleet, "host-a", marker.id), 30, "host-a to reach the marker")
    assert fleet.pid("host-a", "payments") == pid, "the canary was not switched or restarted again"
    row = settled(fleet, deployment_id)
    assert row["state"] == "completed", row
    check(fleet, row, V1, V2)


def _handled(fleet: Fleet, host: str, command_id: str) -> bool:
    """The agent stored this command (it handles its queue in order)."""
    dbs = sorted(fleet.hosts[host].state_dir.glob("*.db"))
    with sqlite3.connect(f"file:{dbs[0]}?mode=ro", uri=True) as db:
        return (
            db.execute("SELECT 1 FROM commands WHERE id = ?", (command_id,)).fetchone() is not None
        )


def test_report_delivered_twice_has_its_effect_once(three_hosts: Fleet, amqp_url: str) -> None:
    fleet = three_hosts
    baseline(fleet)
    deployment_id = _holding(fleet)
    reports = [
        make(Vote(deployment_id=deployment_id, host_id="host-a", service="payments",
                  version="2.0.0", yes=False, reason="late duplicate"), "agent:host-a"),
        make(StepResult(deployment_id=deployment_id, host_id="host-a", service="payments",
                        step="commit", ok=False, reason="duplicate", running="2.0.0"), "agent:host-a"),
    ]  # fmt: skip
    bodies = [encode(r) for r in reports for _ in range(2)]
    asyncio.run(publish_raw(amqp_url, topology.REPORTS, topology.REPORTS_KEY, bodies))

    row = settled(fleet, deployment_id)
    assert row["state"] == "completed", "a duplicate report must not undo the committed canary"
    check(fleet, row, V1, V2)
