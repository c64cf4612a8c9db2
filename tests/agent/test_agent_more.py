"""More agent behaviour against the real broker: hooks, the health watch, resumed
commands after a crash, and the agent process itself."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from agent.main import run
from agent.service import DB_NAME
from agent.store import Store
from shared.errors import UserError
from shared.messages import AgentHello, HealthChange, Prepare, Vote, encode
from shared.specs import Hooks
from tests.agent.conftest import HOST, Coordinator, Fleet, command
from tests.agent.helpers import answered, demo_version, eventually
from tests.agent.test_agent import _deploy
from tests.support.artifacts import free_port
from tests.support.procs import Procs


async def test_failing_before_start_hook_fails_the_commit_and_keeps_the_old_version(
    coordinator: Coordinator, fleet: Fleet, tmp_path: Path
) -> None:
    agent = await fleet.start_agent()
    v1 = demo_version(tmp_path / "artifacts", "1.0.0")
    hooks = Hooks(before_start="touch hook-ran-in-${version} && exit 4", after_start="true")
    assert (await _deploy(coordinator, v1, "d1", None)).ok
    v2 = demo_version(tmp_path / "artifacts", "1.1.0").model_copy(update={"hooks": hooks})
    result = await _deploy(coordinator, v2, "d2", "1.0.0")
    assert not result.ok
    assert "before_start hook failed: exited with status 4" in result.reason
    assert result.running == "1.0.0"
    assert (agent.releases.release_dir("demo", "1.1.0") / "hook-ran-in-1.1.0").exists()
    assert await answered(fleet.port, "/version") == "1.0.0"
    assert agent.releases.current_version("demo") == "1.0.0"


async def test_a_service_turning_unhealthy_is_reported(
    coordinator: Coordinator, fleet: Fleet, tmp_path: Path
) -> None:
    await fleet.start_agent()
    v1 = demo_version(tmp_path / "artifacts", "1.0.0", fail_health_after=1.5)
    assert (await _deploy(coordinator, v1, "d1", None)).ok
    change = await coordinator.wait(HealthChange, health="unhealthy")
    assert (change.host_id, change.service, change.version) == (HOST, "demo", "1.0.0")
    assert "500" in change.reason


async def test_commands_received_before_a_crash_are_resumed(
    coordinator: Coordinator, fleet: Fleet, tmp_path: Path
) -> None:
    v1 = demo_version(tmp_path / "artifacts", "1.0.0")
    signer = coordinator.broker.signer
    assert signer is not None
    envelope = signer.sign(command(Prepare(deployment_id="d1", spec=v1, from_version=None)))
    store = await Store.open(fleet.state_dir / DB_NAME)
    await store.commands.add(envelope.id, "d1", "demo", "prepare", encode(envelope).decode())
    await store.close()
    agent = await fleet.start_agent()
    vote = await coordinator.wait(Vote, deployment_id="d1")
    assert vote.yes
    await eventually(lambda: _no_pending(agent.store), "the command to be done")


async def _no_pending(store: Store) -> bool:
    return not await store.commands.pending()


def test_only_the_process_driver_exists(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="systemd driver is not implemented yet") as info:
        run("h1", {}, tmp_path, "systemd", None)
    assert info.value.field == "--driver"


_MAIN = (
    "import sys; from pathlib import Path; from agent.main import run; "
    "run(sys.argv[1], {'demo_port': sys.argv[2]}, Path(sys.argv[3]), 'process', int(sys.argv[4]))"
)


@pytest.mark.e2e
async def test_agent_process_deploys_and_survives_its_own_sigterm(
    coordinator: Coordinator, fleet: Fleet, tmp_path: Path, procs: Procs,
    lockstep_env: dict[str, str],
) -> None:  # fmt: skip
    metrics_port = free_port()
    args = [sys.executable, "-c", _MAIN, HOST, str(fleet.port), str(fleet.state_dir)]
    args.append(str(metrics_port))
    root = Path(__file__).resolve().parents[2]
    env = {**lockstep_env, "PYTHONPATH": str(root)}
    proc = procs.start(args, env=env, log=tmp_path / "agent.log")
    await coordinator.wait(AgentHello)
    v1 = demo_version(tmp_path / "artifacts", "1.0.0")
    assert (await _deploy(coordinator, v1, "d1", None)).ok
    page = await answered(metrics_port, "/metrics")
    assert 'lockstep_agent_steps_total{ok="true",step="commit"} 1.0' in page
    assert 'lockstep_agent_steps_total{ok="true",step="prepare"} 1.0' in page
    os.kill(proc.pid, signal.SIGTERM)
    assert await eventually(lambda: proc.poll() is not None, "the agent to exit")
    assert proc.returncode == 0, (tmp_path / "agent.log").read_text()[-2000:]
    assert await answered(fleet.port, "/version") == "1.0.0"  # the service outlives it
    assert b"agent.stopped" in (tmp_path / "agent.log").read_bytes()
