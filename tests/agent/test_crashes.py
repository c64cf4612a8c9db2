"""Crash supervision against the real broker and real processes (SPEC 6.2 "crash loop"):
restarts after an unexpected exit, one CrashLoop report at the limit, and deliberate
switches that never count."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from agent import driver
from agent.exits import ExitHistory, backoff
from agent.service import Agent
from agent.store import ServiceRow
from shared.messages import (
    Abort,
    AgentHello,
    CrashLoop,
    HealthChange,
    Heartbeat,
    Prepare,
    Revert,
    StepResult,
    Vote,
)
from tests.agent.conftest import HOST, Coordinator, Fleet
from tests.agent.helpers import answered, demo_version, eventually, http_get
from tests.agent.test_agent import _deploy

FAST = {"heartbeat_interval": 0.2, "crash_loop_exits": 3, "crash_loop_window": 10.0}


async def _row(agent: Agent) -> ServiceRow:
    row = await agent.store.service("demo")
    assert row is not None
    return row


async def _kill(agent: Agent, whole_group: bool = True) -> int:
    """SIGKILL the running demo service (its process group, or its leader only); its pid."""
    row = await _row(agent)
    assert row.process is not None
    if whole_group:
        os.killpg(row.process.pgid, signal.SIGKILL)
    else:
        os.kill(row.process.pid, signal.SIGKILL)
    return row.process.pid


async def _more_heartbeats(c: Coordinator, count: int) -> None:
    """Let `count` more heartbeats arrive (the agent's clock, not a bare sleep)."""
    await c.wait(Heartbeat, count=len(c.bodies(Heartbeat)) + count)


def _beat_state(c: Coordinator) -> tuple[str, int | None]:
    [state] = c.bodies(Heartbeat)[-1].services
    return state.health, state.pid


@pytest.mark.parametrize(
    ("times", "expected"),
    [
        ([0.0], [1]),
        ([0.0, 1.0, 2.0], [1, 2, 3]),
        ([0.0, 6.0, 11.0, 12.0], [1, 2, 2, 3]),  # window 10: the exit at 0.0 drops out
        ([0.0, 20.0, 40.0], [1, 1, 1]),
    ],
)
def test_exit_history_counts_exits_within_the_window(
    times: list[float], expected: list[int]
) -> None:
    history = ExitHistory(limit=3, window=10.0)
    assert [history.record("demo", t) for t in times] == expected
    assert history.is_loop(3)
    assert not history.is_loop(2)
    history.clear("demo")
    assert history.record("demo", 100.0) == 1


def test_restart_backoff_doubles_and_is_capped() -> None:
    assert [backoff(n) for n in (1, 2, 3)] == [0.5, 1.0, 2.0]
    assert backoff(50) == 10.0


@pytest.mark.parametrize("whole_group", [True, False], ids=["group", "leader-only"])
async def test_a_service_killed_with_sigkill_is_restarted_and_reported_healthy_again(
    coordinator: Coordinator, fleet: Fleet, tmp_path: Path, whole_group: bool
) -> None:
    """Killing only the leader (the `run` shell) leaves the server holding the port:
    the agent kills what is left of the group before it starts the service again."""
    agent = await fleet.start_agent(**FAST)
    v1 = demo_version(tmp_path / "artifacts", "1.0.0")
    assert (await _deploy(coordinator, v1, "d1", None)).ok
    old_pid = await _kill(agent, whole_group)

    async def restarted() -> int | None:
        process = (await _row(agent)).process
        if process is None or process.pid == old_pid or not driver.is_alive(process):
            return None
        return process.pid

    pid = await eventually(restarted, "the service to run again under a new pid")
    assert await answered(fleet.port, "/version") == "1.0.0"
    down = await coordinator.wait(HealthChange, health="unhealthy")
    assert "signal 9" in down.reason
    up = await coordinator.wait(HealthChange, health="healthy")
    assert (up.service, up.version) == ("demo", "1.0.0")
    await eventually(lambda: _beat_state(coordinator) == ("healthy", pid),
                     "a heartbeat with the new pid, healthy")  # fmt: skip
    assert coordinator.bodies(CrashLoop) == []
    assert len(await agent.store.switches("demo")) == 1  # a restart is not a switch


async def test_a_service_exiting_at_once_is_one_crash_loop_then_left_stopped(
    coordinator: Coordinator, fleet: Fleet, tmp_path: Path
) -> None:
    agent = await fleet.start_agent(**FAST)
    good = demo_version(tmp_path / "artifacts", "1.0.0")
    # Runs the server the first time only; every restart exits at once with status 3.
    run = f"if [ -e started ]; then echo exit >> exits.log; exit 3; fi; touch started; {good.run}"
    flaky = good.model_copy(update={"run": run})
    assert (await _deploy(coordinator, flaky, "d1", None)).ok
    await _kill(agent)

    loop = await coordinator.wait(CrashLoop)
    assert (loop.host_id, loop.service, loop.version) == (HOST, "demo", "1.0.0")
    assert (loop.exits, loop.window) == (3, 10.0)
    exits_log = agent.releases.release_dir("demo", "1.0.0") / "exits.log"
    assert exits_log.read_text().count("exit") == 2  # killed once, restarted twice
    await eventually(lambda: _beat_state(coordinator) == ("unhealthy", None),
                     "a heartbeat reporting it unhealthy and stopped")  # fmt: skip
    await _more_heartbeats(coordinator, 12)  # longer than the next backoff would be
    assert len(coordinator.bodies(CrashLoop)) == 1
    assert exits_log.read_text().count("exit") == 2
    assert await http_get(fleet.port, "/version") == (0, "")

    await fleet.stop_agent(agent)  # a restarted agent leaves it down too
    again = await fleet.start_agent(**FAST)
    [state] = (await coordinator.wait(AgentHello, count=2)).services
    assert (state.health, state.pid) == ("unhealthy", None)
    await _more_heartbeats(coordinator, 5)
    assert exits_log.read_text().count("exit") == 2
    assert len(coordinator.bodies(CrashLoop)) == 1

    await coordinator.send(Revert(deployment_id="d1", service="demo", to=good))  # on purpose
    result = await coordinator.wait(StepResult, deployment_id="d1", step="revert")
    assert (result.ok, result.running) == (True, "1.0.0"), result.reason
    assert await answered(fleet.port, "/version") == "1.0.0"
    assert await again.store.crash_looped("demo") is None


async def test_deliberate_commit_revert_and_abort_never_count_as_crashes(
    coordinator: Coordinator, fleet: Fleet, tmp_path: Path
) -> None:
    agent = await fleet.start_agent(**{**FAST, "crash_loop_exits": 1})  # any crash is a loop
    v1 = demo_version(tmp_path / "artifacts", "1.0.0")
    v2 = demo_version(tmp_path / "artifacts", "2.0.0")
    assert (await _deploy(coordinator, v1, "d1", None)).ok
    assert (await _deploy(coordinator, v2, "d2", "1.0.0")).ok
    await coordinator.send(Revert(deployment_id="d2", service="demo", to=v1))
    assert (await coordinator.wait(StepResult, deployment_id="d2", step="revert")).ok
    await coordinator.send(Prepare(deployment_id="d3", spec=v2, from_version="1.0.0"))
    assert (await coordinator.wait(Vote, deployment_id="d3")).yes
    await coordinator.send(Abort(deployment_id="d3", service="demo"))
    assert (await coordinator.wait(StepResult, deployment_id="d3", step="abort")).ok
    assert await answered(fleet.port, "/version") == "1.0.0"
    await _more_heartbeats(coordinator, 10)
    assert coordinator.bodies(CrashLoop) == []
    assert coordinator.bodies(HealthChange, health="unhealthy") == []

    await _kill(agent)  # the detector is live: one real crash is a loop at this limit
    loop = await coordinator.wait(CrashLoop)
    assert (loop.exits, loop.version) == (1, "1.0.0")
