"""Fixtures for every tier: a vhost per test, tracked processes, no leaked tasks."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared import log, signing
from shared.config import BrokerSettings
from shared.transport import Broker
from tests.support import postgres
from tests.support.procs import Procs
from tests.support.rabbit import vhost

log.setup("warning", json=True)


def _label(request: pytest.FixtureRequest) -> str:
    return re.sub(r"[^a-zA-Z0-9_-]", "-", request.node.name)


@pytest.fixture(scope="session")
def coordinator_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding a coordinator key pair (as `lockstep keys init` writes it)."""
    directory = tmp_path_factory.mktemp("keys")
    signing.write_pair(directory, "coordinator", signing.generate())
    return directory


@pytest.fixture
def coordinator_key(coordinator_keys: Path) -> Ed25519PrivateKey:
    """The coordinator's private key: what tests sign commands with."""
    return signing.load_private(coordinator_keys / signing.COORDINATOR_KEY)


@pytest.fixture
def amqp_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A vhost of this test's own on the real broker."""
    with vhost(_label(request)) as url:
        yield url


@pytest.fixture
async def broker(amqp_url: str, request: pytest.FixtureRequest) -> AsyncIterator[Broker]:
    """A connected `Broker` named after the test, with the topology declared."""
    b = Broker(BrokerSettings(amqp_url=amqp_url), f"test:{request.node.nodeid}")
    await b.connect()
    await b.declare()
    yield b
    await b.close()


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """A PostgreSQL database of this test session's own, dropped at its end."""
    with postgres.session_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
async def store_at(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str | Path]:
    """Where a coordinator store lives, once per backend: a SQLite file, then a schema
    of this test's own in the session's PostgreSQL database (issue 10: every store test
    runs against both)."""
    if request.param == "sqlite":
        yield tmp_path / "coordinator.db"
        return
    database = request.getfixturevalue("postgres_database")
    async with postgres.schema(database, _label(request)) as url:
        yield url


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    """Start real processes; every one (and every service under tmp_path) dies at teardown."""
    p = Procs(tmp_path)
    yield p
    p.stop_all()


@pytest.fixture(autouse=True)
async def _no_leaked_tasks() -> AsyncIterator[None]:
    """Fail a test that leaves asyncio tasks running (CONVENTIONS 7)."""
    before = asyncio.all_tasks()
    yield
    current = asyncio.current_task()
    leaked = [t for t in asyncio.all_tasks() - before if t is not current and not t.done()]
    for _ in range(20):
        if not leaked:
            break
        await asyncio.sleep(0.05)
        leaked = [t for t in leaked if not t.done()]
    assert not leaked, f"leaked tasks: {[t.get_name() for t in leaked]}"


@pytest.fixture
def lockstep_env(amqp_url: str, coordinator_keys: Path) -> dict[str, str]:
    """Environment for a real `lockstep` process bound to this test's vhost: agents
    trust the session's coordinator key, and share the broker user guest (the
    least-privilege tests give each agent its own user)."""
    env = dict(os.environ)
    env.update(
        LOCKSTEP_AMQP_URL=amqp_url,
        LOCKSTEP_HEARTBEAT_INTERVAL="0.5",
        LOCKSTEP_LOG_LEVEL="info",
        LOCKSTEP_COORDINATOR_KEY=str(coordinator_keys / signing.COORDINATOR_PUB),
        LOCKSTEP_AGENT_USERS="shared",
        PYTHONUNBUFFERED="1",
    )
    return env
