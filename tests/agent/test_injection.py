"""The agent's injection points: a process driver and health wait of the caller's, and a
broker connection shared with other agents (what the fleet benchmark runs on)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

from agent.driver import ProcessRecord
from agent.service import Agent
from shared.config import AgentSettings, BrokerSettings
from shared.messages import Commit, Prepare, StepResult, Vote
from shared.specs import HealthSpec
from shared.transport import Broker
from tests.agent.conftest import HOST, Coordinator, Fleet
from tests.agent.helpers import demo_version, http_get
from tests.perf import perfdriver


class Recording:
    """The benchmark's driver (starts nothing), recording what it is asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def start(
        self, command: str, cwd: Path, env: Mapping[str, str], log_path: Path
    ) -> ProcessRecord:
        self.calls.append(("start", command))
        return perfdriver.start(command, cwd, env, log_path)

    def is_alive(self, record: ProcessRecord) -> bool:
        return perfdriver.is_alive(record)

    def exit_reason(self, record: ProcessRecord) -> str:
        return perfdriver.exit_reason(record)

    def kill_leftovers(self, record: ProcessRecord) -> None:
        self.calls.append(("kill_leftovers", str(record.pid)))

    async def stop(self, record: ProcessRecord, grace: float) -> None:
        self.calls.append(("stop", str(record.pid)))


async def test_an_injected_driver_runs_prepare_and_commit_without_a_process(
    coordinator: Coordinator, fleet: Fleet, tmp_path: Path
) -> None:
    recording = Recording()
    waited: list[HealthSpec] = []

    async def healthy(
        spec: HealthSpec, exited: Callable[[], str | None], cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:  # fmt: skip
        assert exited() is None  # the record the driver returned counts as running
        waited.append(spec)

    settings = BrokerSettings(amqp_url=fleet.amqp_url)
    hub = Broker(settings, "test:hub")
    await hub.connect()
    agent = Agent(
        HOST, fleet.labels, fleet.state_dir, settings, AgentSettings(heartbeat_interval=0.5),
        fleet.trusted.public_key(), share=hub, process_driver=recording, health_wait=healthy,
    )  # fmt: skip
    fleet.agents.append(agent)
    try:
        await agent.start()
        spec = demo_version(tmp_path / "artifacts", "1.0.0")
        await coordinator.send(Prepare(deployment_id="d1", spec=spec, from_version=None))
        vote = await coordinator.wait(Vote, deployment_id="d1")
        assert vote.yes, vote.reason
        await coordinator.send(Commit(deployment_id="d1", service="demo", version="1.0.0"))
        result = await coordinator.wait(StepResult, deployment_id="d1", step="commit")
        assert (result.ok, result.running) == (True, "1.0.0"), result.reason

        assert recording.calls == [("start", spec.run)]
        assert [w.http for w in waited] == [f"http://127.0.0.1:{fleet.port}/health"]
        assert agent.releases.current_version("demo") == "1.0.0"
        row = await agent.store.service("demo")
        assert row is not None
        assert row.process is not None
        assert row.process.pid == os.getpid()  # no process of its own was started
        assert await http_get(fleet.port, "/version") == (0, "")
    finally:
        await fleet.stop_agent(agent)
        await hub.close()
