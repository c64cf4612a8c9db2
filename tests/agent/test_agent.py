"""The agent against the real broker: the test plays coordinator (SPEC 6.1, 6.5, 6.6)."""

from __future__ import annotations

import os
from pathlib import Path

from prometheus_client import REGISTRY

from agent import driver
from agent.store import ServiceRow
from shared import topology
from shared.messages import (
    Abort,
    AgentHello,
    Commit,
    Heartbeat,
    Ping,
    Prepare,
    Revert,
    StepResult,
    Vote,
    encode,
)
from shared.specs import ServiceVersion
from tests.agent.conftest import HOST, Coordinator, Fleet, command
from tests.agent.helpers import answered, demo_version, eventually, http_get
from tests.support.rabbit import dead_letter_reasons, publish_raw


async def _deploy(c: Coordinator, spec: ServiceVersion, dep: str, frm: str | None) -> StepResult:
    await c.send(Prepare(deployment_id=dep, spec=spec, from_version=frm))
    vote = await c.wait(Vote, deployment_id=dep)
    assert vote.yes, vote.reason
    await c.send(Commit(deployment_id=dep, service=spec.name, version=spec.version))
    return await c.wait(StepResult, deployment_id=dep, step="commit")


async def test_hello_carries_labels_and_ping_gets_a_heartbeat(
    coordinator: Coordinator, fleet: Fleet
) -> None:
    await fleet.start_agent()
    hello = await coordinator.wait(AgentHello)
    assert hello.host_id == HOST
    assert hello.labels == fleet.labels
    assert hello.services == []
    await coordinator.send(Ping())
    beat = await coordinator.wait(Heartbeat)
    assert beat.host_id == HOST


async def test_prepare_and_commit_run_the_new_version(
    coordinator: Coordinator, fleet: Fleet, tmp_path: Path
) -> None:
    agent = await fleet.start_agent()
    v1 = demo_version(tmp_path / "artifacts", "1.0.0")
    await coordinator.send(Prepare(deployment_id="d1", spec=v1, from_version=None))
    vote = await coordinator.wait(Vote, deployment_id="d1")
    assert (vote.yes, vote.host_id, vote.service, vote.version) == (True, HOST, "demo", "1.0.0")
    assert agent.releases.staging_dir("demo", "d1").is_dir()
    assert await http_get(fleet.port, "/version") == (0, "")  # nothing runs yet

    await coordinator.send(Commit(deployment_id="d1", service="demo", version="1.0.0"))
    result = await coordinator.wait(StepResult, deployment_id="d1")
    assert (result.ok, result.step, result.running) == (True, "commit", "1.0.0"), result.reason
    assert await answered(fleet.port, "/version") == "1.0.0"
    current = agent.releases.current_link("demo")
    assert current.resolve() == agent.releases.release_dir("demo", "1.0.0").resolve()
    assert not agent.releases.staging_dir("demo", "d1").exists()

    v2 = demo_version(tmp_path / "artifacts", "1.1.0")
    result = await _deploy(coordinator, v2, "d2", "1.0.0")
    assert result.ok, result.reason
    assert await answered(fleet.port, "/version") == "1.1.0"
    assert os.readlink(current) == os.path.join("releases", "1.1.0")
    switches = await agent.store.switches("demo")
    assert [(s.from_version, s.to_version, s.kind) for s in switches] == [
        (None, "1.0.0", "commit"),
        ("1.0.0", "1.1.0", "commit"),
    ]
    beat = await coordinator.wait(Heartbeat, count=1)
    assert beat.services
    await eventually(lambda: _healthy_beat(coordinator, "1.1.0"), "a healthy heartbeat")


def _healthy_beat(c: Coordinator, version: str) -> bool:
    return any(
        s.version == version and s.health == "healthy"
        for beat in c.bodies(Heartbeat)
        for s in beat.services
    )


async def test_wrong_sha256_votes_no_and_stages_nothing(
    coordinator: Coordinator, fleet: Fleet, tmp_path: Path
) -> None:
    agent = await fleet.start_agent()
    bad = demo_version(tmp_path / "artifacts", "1.0.0", sha256="ab" * 32)
    await coordinator.send(Prepare(deployment_id="d1", spec=bad, from_version=None))
    vote = await coordinator.wait(Vote, deployment_id="d1")
    assert not vote.yes
    assert "sha256" in vote.reason
    staging = agent.releases.service_dir("demo") / "staging"
    assert not staging.exists() or list(staging.iterdir()) == []
    assert agent.releases.versions("demo") == []
    txn = await agent.store.txn("d1", "demo")
    assert txn is not None
    assert txn.state == "no"


async def test_abort_discards_staging_and_blocks_the_commit(
    coordinator: Coordinator, fleet: Fleet, tmp_path: Path
) -> None:
    agent = await fleet.start_agent()
    v1 = demo_version(tmp_path / "artifacts", "1.0.0")
    await coordinator.send(Prepare(deployment_id="d1", spec=v1, from_version=None))
    assert (await coordinator.wait(Vote, deployment_id="d1")).yes
    assert agent.releases.staging_dir("demo", "d1").is_dir()
    await coordinator.send(Abort(deployment_id="d1", service="demo"))
    result = await coordinator.wait(StepResult, deployment_id="d1", step="abort")
    assert result.ok
    assert not agent.releases.staging_dir("demo", "d1").exists()
    await coordinator.send(Commit(deployment_id="d1", service="demo", version="1.0.0"))
    late = await coordinator.wait(StepResult, deployment_id="d1", step="commit")
    assert not late.ok
    assert "aborted" in late.reason
    await coordinator.send(Abort(deployment_id="never", service="demo"))
    assert (await coordinator.wait(StepResult, deployment_id="never", step="abort")).ok


async def test_failed_health_on_commit_then_revert_to_the_previous_version(
    coordinator: Coordinator, fleet: Fleet, tmp_path: Path
) -> None:
    agent = await fleet.start_agent()
    v1 = demo_version(tmp_path / "artifacts", "1.0.0")
    assert (await _deploy(coordinator, v1, "d1", None)).ok
    bad = demo_version(tmp_path / "artifacts", "2.0.0", fail_health=True, start_deadline="1s")
    result = await _deploy(coordinator, bad, "d2", "1.0.0")
    assert not result.ok
    assert "500" in result.reason
    assert (await agent.store.txn("d2", "demo")).state == "commit_failed"  # type: ignore[union-attr]

    await coordinator.send(Revert(deployment_id="d2", service="demo", to=v1))
    reverted = await coordinator.wait(StepResult, deployment_id="d2", step="revert")
    assert (reverted.ok, reverted.running) == (True, "1.0.0"), reverted.reason
    assert await answered(fleet.port, "/version") == "1.0.0"
    assert agent.releases.current_version("demo") == "1.0.0"
    kinds = [(s.to_version, s.kind) for s in await agent.store.switches("demo")]
    assert kinds == [("1.0.0", "commit"), ("2.0.0", "commit"), ("1.0.0", "revert")]


async def test_revert_to_nothing_stops_the_service(
    coordinator: Coordinator, fleet: Fleet, tmp_path: Path
) -> None:
    agent = await fleet.start_agent()
    v1 = demo_version(tmp_path / "artifacts", "1.0.0")
    assert (await _deploy(coordinator, v1, "d1", None)).ok
    await coordinator.send(Revert(deployment_id="d1", service="demo", to=None))
    result = await coordinator.wait(StepResult, deployment_id="d1", step="revert")
    assert (result.ok, result.running) == (True, None)
    assert await http_get(fleet.port, "/version") == (0, "")
    assert not agent.releases.current_link("demo").exists()
    assert await agent.store.service("demo") is None
    assert (await agent.store.switches("demo"))[-1].kind == "stop"


async def test_a_command_delivered_twice_runs_once_and_a_resent_step_is_answered_again(
    coordinator: Coordinator, fleet: Fleet, tmp_path: Path, amqp_url: str
) -> None:
    agent = await fleet.start_agent()
    v1 = demo_version(tmp_path / "artifacts", "1.0.0")
    prepare = command(Prepare(deployment_id="d1", spec=v1, from_version=None))
    await coordinator.send(prepare.body, prepare)
    await coordinator.send(prepare.body, prepare)  # while the first may still be running
    assert (await coordinator.wait(Vote, deployment_id="d1")).yes
    commit = command(Commit(deployment_id="d1", service="demo", version="1.0.0"))
    await coordinator.send(commit.body, commit)
    first = await coordinator.wait(StepResult, deployment_id="d1", step="commit")
    assert first.ok
    pid = (await agent.store.service("demo")).process.pid  # type: ignore[union-attr]
    # The same envelope again (a broker redelivery, a replay) is refused: effect once.
    await coordinator.send(commit.body, commit)
    reasons = await dead_letter_reasons(amqp_url, 2)
    assert [r.split(":")[0] for r in reasons] == ["replayed", "replayed"], reasons
    # The coordinator re-sending the step (new id) is answered from the record.
    retry = Commit(deployment_id="d1", service="demo", version="1.0.0")
    await coordinator.send(retry)
    second = await coordinator.wait(StepResult, count=2, deployment_id="d1", step="commit")
    assert second == first
    assert len(await agent.store.switches("demo")) == 1
    assert (await agent.store.service("demo")).process.pid == pid  # type: ignore[union-attr]
    assert len(coordinator.bodies(Vote, deployment_id="d1")) == 1


async def _running_v1_then_stop_agent(
    coordinator: Coordinator, fleet: Fleet, tmp_path: Path
) -> ServiceRow:
    """demo 1.0.0 deployed and running, then its agent stopped; the service's record."""
    agent = await fleet.start_agent()
    v1 = demo_version(tmp_path / "artifacts", "1.0.0")
    assert (await _deploy(coordinator, v1, "d1", None)).ok
    row = await agent.store.service("demo")
    assert row is not None
    assert row.process is not None
    await fleet.stop_agent(agent)
    return row


async def test_a_restarted_agent_adopts_the_running_service(
    coordinator: Coordinator, fleet: Fleet, tmp_path: Path
) -> None:
    row = await _running_v1_then_stop_agent(coordinator, fleet, tmp_path)
    assert driver.is_alive(row.process)  # stopping the agent leaves services running

    again = await fleet.start_agent()
    hello = await coordinator.wait(AgentHello, count=2)
    [state] = hello.services
    assert (state.service, state.version, state.pid) == ("demo", "1.0.0", row.process.pid)
    assert await again.store.service("demo") == row  # same pid and start time: not restarted
    assert await answered(fleet.port, "/version") == "1.0.0"
    assert len(await again.store.switches("demo")) == 1


async def test_a_restarted_agent_starts_a_dead_service_again(
    coordinator: Coordinator, fleet: Fleet, tmp_path: Path
) -> None:
    row = await _running_v1_then_stop_agent(coordinator, fleet, tmp_path)
    await driver.stop(row.process, grace=5)

    again = await fleet.start_agent()
    restarted = await again.store.service("demo")
    assert restarted is not None
    assert restarted.process is not None
    assert restarted.process.pid != row.process.pid
    assert await answered(fleet.port, "/version") == "1.0.0"


async def test_each_refused_command_is_counted_by_its_reason_and_the_agent_keeps_serving(
    coordinator: Coordinator, fleet: Fleet, amqp_url: str
) -> None:
    """Issue 8: a refusal is dead-lettered with its reason and counted in a metric."""
    await fleet.start_agent()
    await coordinator.wait(AgentHello)

    def refused(reason: str) -> float:
        value = REGISTRY.get_sample_value("lockstep_messages_refused_total", {"reason": reason})
        return value or 0.0

    before = {r: refused(r) for r in ("unsigned", "wrong_host", "expired")}
    unsigned = command(Ping())
    await publish_raw(amqp_url, topology.COMMANDS, topology.host_key(HOST), [encode(unsigned)])
    await coordinator.send(Ping(), command(Ping(), host="elsewhere"))
    await coordinator.send(Ping(), command(Ping(), ttl=-60))
    reasons = await dead_letter_reasons(amqp_url, 3)
    assert sorted(r.split(":")[0] for r in reasons) == ["expired", "unsigned", "wrong_host"]
    assert {r: refused(r) - before[r] for r in before} == {
        "unsigned": 1, "wrong_host": 1, "expired": 1,
    }  # fmt: skip
    await coordinator.send(Ping())
    assert (await coordinator.wait(Heartbeat)).host_id == HOST
