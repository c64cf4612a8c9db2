"""Rollbacks on the agent against the real broker: the before_rollback hook of the
release being left (SPEC 3.1) and the fast path over kept release dirs (SPEC 6.3)."""

from __future__ import annotations

from pathlib import Path

from agent.service import Agent
from shared.messages import Commit, Prepare, Revert, StepResult, Vote
from shared.specs import Hooks, ServiceVersion
from tests.agent.conftest import Coordinator, Fleet
from tests.agent.helpers import answered, demo_version
from tests.agent.test_agent import _deploy

MARK = "echo ${version} > before-rollback-ran"


def _with_hook(spec: ServiceVersion, before_rollback: str) -> ServiceVersion:
    return spec.model_copy(update={"hooks": Hooks(before_rollback=before_rollback)})


async def _two_versions(
    c: Coordinator, fleet: Fleet, root: Path, hook: str
) -> tuple[Agent, ServiceVersion, ServiceVersion]:
    """An agent that ran 1.0.0 and now runs 2.0.0, whose before_rollback is `hook`."""
    agent = await fleet.start_agent()
    v1 = _with_hook(demo_version(root, "1.0.0"), MARK)
    v2 = _with_hook(demo_version(root, "2.0.0"), hook)
    assert (await _deploy(c, v1, "d1", None)).ok
    assert (await _deploy(c, v2, "d2", "1.0.0")).ok
    return agent, v1, v2


async def _rollback_prepare(c: Coordinator, spec: ServiceVersion, dep: str) -> Vote:
    await c.send(Prepare(deployment_id=dep, spec=spec, from_version="2.0.0", rollback=True))
    return await c.wait(Vote, deployment_id=dep)


async def _pid(agent: Agent) -> int:
    row = await agent.store.service("demo")
    assert row is not None
    assert row.process is not None
    return row.process.pid


async def test_before_rollback_runs_in_the_old_release_dir_on_revert(
    coordinator: Coordinator, fleet: Fleet, tmp_path: Path
) -> None:
    agent, v1, _ = await _two_versions(coordinator, fleet, tmp_path / "artifacts", MARK)
    await coordinator.send(Revert(deployment_id="d2", service="demo", to=v1))
    result = await coordinator.wait(StepResult, deployment_id="d2", step="revert")
    assert (result.ok, result.running) == (True, "1.0.0"), result.reason
    left = agent.releases.release_dir("demo", "2.0.0") / "before-rollback-ran"
    assert left.read_text() == "2.0.0\n"  # its cwd and its ${version}: the release left
    assert not (agent.releases.release_dir("demo", "1.0.0") / "before-rollback-ran").exists()
    assert await answered(fleet.port, "/version") == "1.0.0"


async def test_failing_before_rollback_fails_the_revert_and_leaves_the_old_version_running(
    coordinator: Coordinator, fleet: Fleet, tmp_path: Path
) -> None:
    hook = "echo down-migration broke >&2; exit 7"
    agent, v1, _ = await _two_versions(coordinator, fleet, tmp_path / "artifacts", hook)
    pid = await _pid(agent)
    await coordinator.send(Revert(deployment_id="d2", service="demo", to=v1))
    result = await coordinator.wait(StepResult, deployment_id="d2", step="revert")
    assert not result.ok
    assert (
        result.reason == "before_rollback hook failed: exited with status 7: down-migration broke"
    )
    assert result.running == "2.0.0"
    assert await answered(fleet.port, "/version") == "2.0.0"
    assert await _pid(agent) == pid  # untouched, not even restarted
    assert agent.releases.current_version("demo") == "2.0.0"
    assert [s.kind for s in await agent.store.switches("demo")] == ["commit", "commit"]


async def test_rollback_commit_runs_before_rollback_after_a_prepare_that_fetched_nothing(
    coordinator: Coordinator, fleet: Fleet, tmp_path: Path
) -> None:
    root = tmp_path / "artifacts"
    agent, v1, _ = await _two_versions(coordinator, fleet, root, MARK)
    (root / "demo-1.0.0.tar.gz").unlink()  # the artifact is gone: only the kept dir remains
    vote = await _rollback_prepare(coordinator, v1, "r1")
    assert vote.yes, vote.reason
    txn = await agent.store.txn("r1", "demo")
    assert txn is not None
    assert (txn.state, txn.staged_path, txn.rollback) == ("prepared", None, True)
    assert not agent.releases.staging_dir("demo", "r1").exists()

    await coordinator.send(Commit(deployment_id="r1", service="demo", version="1.0.0"))
    result = await coordinator.wait(StepResult, deployment_id="r1", step="commit")
    assert (result.ok, result.running) == (True, "1.0.0"), result.reason
    assert (agent.releases.release_dir("demo", "2.0.0") / "before-rollback-ran").exists()
    assert await answered(fleet.port, "/version") == "1.0.0"


async def test_failing_before_rollback_fails_a_rollback_commit_and_keeps_the_old_version(
    coordinator: Coordinator, fleet: Fleet, tmp_path: Path
) -> None:
    agent, v1, _ = await _two_versions(coordinator, fleet, tmp_path / "artifacts", "exit 5")
    pid = await _pid(agent)
    assert (await _rollback_prepare(coordinator, v1, "r1")).yes
    await coordinator.send(Commit(deployment_id="r1", service="demo", version="1.0.0"))
    result = await coordinator.wait(StepResult, deployment_id="r1", step="commit")
    assert not result.ok
    assert result.reason == "before_rollback hook failed: exited with status 5"
    assert result.running == "2.0.0"
    assert await answered(fleet.port, "/version") == "2.0.0"
    assert await _pid(agent) == pid
    assert (await agent.store.txn("r1", "demo")).state == "commit_failed"  # type: ignore[union-attr]


async def test_rollback_prepare_refetches_a_tampered_release_dir(
    coordinator: Coordinator, fleet: Fleet, tmp_path: Path
) -> None:
    agent, v1, _ = await _two_versions(coordinator, fleet, tmp_path / "artifacts", MARK)
    (agent.releases.release_dir("demo", "1.0.0") / "VERSION").write_text("tampered\n")
    vote = await _rollback_prepare(coordinator, v1, "r1")
    assert vote.yes, vote.reason
    txn = await agent.store.txn("r1", "demo")
    assert txn is not None
    assert txn.staged_path is not None  # fetched again
    await coordinator.send(Commit(deployment_id="r1", service="demo", version="1.0.0"))
    result = await coordinator.wait(StepResult, deployment_id="r1", step="commit")
    assert result.ok, result.reason
    assert await answered(fleet.port, "/version") == "1.0.0"  # the fetched VERSION file
    assert agent.releases.is_intact(v1)


async def test_rollback_prepare_of_a_tampered_release_votes_no_when_the_artifact_is_gone(
    coordinator: Coordinator, fleet: Fleet, tmp_path: Path
) -> None:
    root = tmp_path / "artifacts"
    agent, v1, _ = await _two_versions(coordinator, fleet, root, MARK)
    (agent.releases.release_dir("demo", "1.0.0") / "server.py").write_text("# changed\n")
    (root / "demo-1.0.0.tar.gz").unlink()
    vote = await _rollback_prepare(coordinator, v1, "r1")
    assert not vote.yes
    assert "demo-1.0.0.tar.gz" in vote.reason
    assert "failed" in vote.reason
    assert await answered(fleet.port, "/version") == "2.0.0"
    assert (await agent.store.txn("r1", "demo")).state == "no"  # type: ignore[union-attr]
