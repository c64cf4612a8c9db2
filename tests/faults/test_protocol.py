"""Issue 5 fault suite: one fault at a named protocol point per scenario, then SPEC 6.4
invariants I1-I5 checked against the coordinator and every service process.

Crashes land exactly where named: the process is started with LOCKSTEP_FAULT_POINT
and kills itself there (shared/faults.py), then it is started again without it.
"""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from collections.abc import Callable
from typing import Any

import aio_pika
import pytest

from shared import topology
from tests.e2e.fleet import Fleet
from tests.e2e.test_core import PAY, WEB
from tests.faults.invariants import check, settled
from tests.support.procs import wait_until
from tests.support.rabbit import publish_raw, rabbitmqctl
from tests.support.slowserver import slow_files
from tests.support.tap import doc, tap, wait_for

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
    deployment_id = start_v2(fleet, "--canary", "1", "--canary-bake", "6s")
    wait_until(lambda: fleet.deployment(deployment_id)["state"] == "holding", 30, "the hold")
    return deployment_id


STEPS = ("prepare", "commit", "abort", "revert")


def _of(deployment_id: str, *kinds: str) -> Callable[[str, bytes], bool]:
    """Matches a captured envelope of one of `kinds` about `deployment_id`."""

    def match(_key: str, body: bytes) -> bool:
        envelope = doc(body)
        return (
            envelope.get("kind") in kinds
            and envelope.get("body", {}).get("deployment_id") == deployment_id
        )

    return match


def _participant(envelope: dict[str, Any]) -> tuple[str | None, str, str]:
    """(host or None, kind, service) of a captured command or report."""
    body = envelope["body"]
    service = body["spec"]["name"] if envelope["kind"] == "prepare" else body["service"]
    return envelope.get("to") or body.get("host_id"), envelope["kind"], service


async def _dead_letters(
    amqp_url: str, bodies: list[bytes], count: int, timeout: float = 30
) -> list[tuple[bytes, str]]:
    """(body, reason) of every message in lockstep.dead, drained until `count` of them
    carry one of `bodies` (fewer if the deadline passes first)."""
    found: list[tuple[bytes, str]] = []
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        dead = await (await connection.channel()).get_queue(topology.DEAD_QUEUE)
        deadline = asyncio.get_running_loop().time() + timeout
        while sum(b in bodies for b, _ in found) < count:
            if asyncio.get_running_loop().time() > deadline:
                break
            message = await dead.get(fail=False)
            if message is None:
                await asyncio.sleep(0.05)  # poll interval within the deadline
                continue
            await message.ack()
            found.append((message.body, str(message.headers.get(topology.REASON_HEADER))))
    return found


async def test_command_delivered_twice_is_refused_as_replayed_and_has_its_effect_once(
    three_hosts: Fleet, amqp_url: str
) -> None:
    """The coordinator's own signed prepare and commit for host-a, captured on the wire
    and published again as they are (twice each) while the deployment holds after the
    canary: the agent refuses each copy as `replayed` before it touches the host."""
    fleet = three_hosts
    await asyncio.to_thread(baseline, fleet)
    async with (
        tap(amqp_url, topology.COMMANDS, topology.host_key("host-a")) as commands,
        tap(amqp_url, topology.REPORTS, topology.REPORTS_KEY, topology.HEARTBEAT_KEY) as reports,
    ):
        deployment_id = await asyncio.to_thread(_holding, fleet)
        sent = await wait_for(commands, _of(deployment_id, *STEPS), count=2,
                              what="host-a's prepare and commit")  # fmt: skip
        originals = [body for _, body in sent]
        assert [doc(b)["kind"] for b in originals] == ["prepare", "commit"], originals
        pid = fleet.pid("host-a", "payments")
        assert (await asyncio.to_thread(fleet.deployment, deployment_id))["state"] == "holding"

        await publish_raw(amqp_url, topology.COMMANDS, topology.host_key("host-a"),
                          [body for body in originals for _ in range(2)])  # fmt: skip
        dead = await _dead_letters(amqp_url, originals, 4)
        replays = [(doc(b)["kind"], reason.split(":")[0]) for b, reason in dead if b in originals]
        assert replays == [("prepare", "replayed")] * 2 + [("commit", "replayed")] * 2, dead
        assert fleet.pid("host-a", "payments") == pid, "the canary was switched or restarted again"

        row = await asyncio.to_thread(settled, fleet, deployment_id)
        answers = [_participant(doc(b)) for _, b in reports if _of(deployment_id, "vote",
                                                                   "step.result")("", b)]  # fmt: skip
    assert row["state"] == "completed", row
    await asyncio.to_thread(check, fleet, row, V1, V2)
    from_a = Counter(a for a in answers if a[0] == "host-a")
    assert from_a == {("host-a", "vote", "payments"): 1, ("host-a", "step.result", "payments"): 1}


async def test_report_delivered_twice_has_its_effect_once(
    three_hosts: Fleet, amqp_url: str
) -> None:
    """Every report the agents sent up to the canary hold (hellos, heartbeats, votes, the
    canary's commit result), captured on the wire and published again as they are,
    twice: the coordinator's state machine takes each effect once. The deployment still
    completes, each command of it is sent exactly once, and I1-I5 hold."""
    fleet = three_hosts
    await asyncio.to_thread(baseline, fleet)
    async with (
        tap(amqp_url, topology.COMMANDS) as commands,
        tap(amqp_url, topology.REPORTS, topology.REPORTS_KEY, topology.HEARTBEAT_KEY) as reports,
    ):
        deployment_id = await asyncio.to_thread(_holding, fleet)
        await wait_for(reports, _of(deployment_id, "step.result"), what="the canary's result")
        captured = [body for _, body in reports]
        assert len([b for b in captured if _of(deployment_id, "vote")("", b)]) == 4, captured

        await publish_raw(amqp_url, topology.REPORTS, topology.REPORTS_KEY,
                          [body for body in captured for _ in range(2)])  # fmt: skip
        # The coordinator handles its queue in order: once it answers a request sent
        # after the copies, it has handled every one of them.
        state = (await asyncio.to_thread(fleet.deployment, deployment_id))["state"]
        assert state in ("holding", "committing", "baking", "completed"), state

        row = await asyncio.to_thread(settled, fleet, deployment_id)
        sent = [_participant(doc(b)) for _, b in commands if _of(deployment_id, *STEPS)("", b)]
    assert row["state"] == "completed", "a duplicate report must not undo the committed canary"
    await asyncio.to_thread(check, fleet, row, V1, V2)
    places = [("host-a", "payments"), ("host-b", "orders"), ("host-c", "orders"),
              ("host-c", "payments")]  # fmt: skip
    assert Counter(sent) == {(h, k, s): 1 for h, s in places for k in ("prepare", "commit")}, sent
