"""Issue 8: the agent's durable command log is no back door, and a step cut short resumes.

Commands read back from the store after a restart pass the same checks as on arrival
(signature, address, expiry as of when they were received); a commit interrupted by a
graceful stop between switching `current` and the service becoming healthy goes on
from its switch after the restart: one switch, the same process (I5, SPEC 6.6).
"""

from __future__ import annotations

import sqlite3
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path

from agent.service import DB_NAME
from agent.store import Store
from shared import signing
from shared.messages import Commit, Envelope, Prepare, StepResult, Vote, encode, make
from shared.specs import ServiceVersion
from tests.agent.conftest import HOST, Coordinator, Fleet, command
from tests.agent.helpers import demo_version, eventually
from tests.support.artifacts import build_artifact, service_toml


async def _store_command(fleet: Fleet, envelope: Envelope, received: datetime) -> None:
    """Put `envelope` in the agent's log as received at `received` (as a crash leaves it)."""
    store = await Store.open(fleet.state_dir / DB_NAME)
    body = envelope.body
    assert isinstance(body, Prepare)
    await store.commands.add(envelope.id, body.deployment_id, "demo", "prepare",
                             encode(envelope).decode())  # fmt: skip
    await store.close()
    with sqlite3.connect(fleet.state_dir / DB_NAME) as db:
        db.execute("UPDATE seen SET at = ? WHERE id = ?", (received.timestamp(), envelope.id))


def _logged(fleet: Fleet, command_id: str) -> int:
    with sqlite3.connect(fleet.state_dir / DB_NAME) as db:
        return int(db.execute("SELECT COUNT(*) FROM commands WHERE id = ?",
                              (command_id,)).fetchone()[0])  # fmt: skip


async def test_commands_read_back_after_a_restart_are_verified_like_fresh_ones(
    coordinator: Coordinator, fleet: Fleet, tmp_path: Path
) -> None:
    v1 = demo_version(tmp_path / "artifacts", "1.0.0")
    now = datetime.now(UTC)
    trusted = coordinator.broker.signer
    assert trusted is not None
    stranger = signing.Signer(signing.generate())
    forged = stranger.sign(command(Prepare(deployment_id="forged", spec=v1, from_version=None)))
    misaddressed = trusted.sign(command(
        Prepare(deployment_id="elsewhere", spec=v1, from_version=None), host="h2"))  # fmt: skip
    old = now - timedelta(minutes=10)
    late = trusted.sign(make(Prepare(deployment_id="late", spec=v1, from_version=None),
                             "coordinator", to=HOST, sent_at=old,
                             expires_at=old + timedelta(minutes=5)))  # fmt: skip
    in_time = trusted.sign(make(Prepare(deployment_id="intime", spec=v1, from_version=None),
                                "coordinator", to=HOST, sent_at=old,
                                expires_at=old + timedelta(minutes=5)))  # fmt: skip
    await _store_command(fleet, forged, now)
    await _store_command(fleet, misaddressed, now)
    await _store_command(fleet, late, now)  # arrived after it expired
    await _store_command(fleet, in_time, old + timedelta(seconds=1))  # fresh when it came

    agent = await fleet.start_agent()
    vote = await coordinator.wait(Vote, deployment_id="intime")
    assert vote.yes, "a command acked in time is still carried out after a long outage"
    for refused in (forged, misaddressed, late):
        assert _logged(fleet, refused.id) == 0
        body = refused.body
        assert isinstance(body, Prepare)
        assert await agent.store.txn(body.deployment_id, "demo") is None
        assert coordinator.bodies(Vote, deployment_id=body.deployment_id) == []


def _slow_version(root: Path, version: str) -> ServiceVersion:
    """The demo service, healthy only after 25 passes 0.2 s apart (about 5 s)."""
    path, digest = build_artifact(root, "demo", version)
    text = service_toml("demo", version, path, digest, interval="0.2s", healthy_after=25,
                        start_deadline="30s")  # fmt: skip
    return ServiceVersion.model_validate(tomllib.loads(text))


async def test_a_commit_cut_short_by_a_graceful_stop_resumes_from_its_switch_with_the_same_process(
    coordinator: Coordinator, fleet: Fleet, tmp_path: Path
) -> None:
    agent = await fleet.start_agent()
    v1 = _slow_version(tmp_path / "artifacts", "1.0.0")
    await coordinator.send(Prepare(deployment_id="d1", spec=v1, from_version=None))
    assert (await coordinator.wait(Vote, deployment_id="d1")).yes
    await coordinator.send(Commit(deployment_id="d1", service="demo", version="1.0.0"))
    switches = await eventually(lambda: agent.store.switches("demo"), "the switch to 1.0.0")
    started = await eventually(lambda: agent.store.service("demo"), "the service to start")
    assert started.process is not None
    await fleet.stop_agent(agent)  # while the service is not healthy yet
    assert coordinator.bodies(StepResult, deployment_id="d1") == []

    agent = await fleet.start_agent()
    result = await coordinator.wait(StepResult, deployment_id="d1", step="commit", timeout=30)
    assert result.ok, result.reason
    assert [s.id for s in await agent.store.switches("demo")] == [switches[0].id]
    row = await agent.store.service("demo")
    assert row is not None
    assert row.process == started.process, "the service was not restarted"
