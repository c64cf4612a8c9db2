"""Fixtures for every tier: a vhost per test, tracked processes, no leaked tasks."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from shared import log
from shared.config import BrokerSettings
from shared.transport import Broker
from tests.support.procs import Procs
from tests.support.rabbit import vhost

log.setup("warning", json=True)


def _label(request: pytest.FixtureRequest) -> str:
    return re.sub(r"[^a-zA-Z0-9_-]", "-", request.node.name)


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
def lockstep_env(amqp_url: str) -> dict[str, str]:
    """Environment for a real `lockstep` process bound to this test's vhost."""
    env = dict(os.environ)
    env.update(
        LOCKSTEP_AMQP_URL=amqp_url,
        LOCKSTEP_HEARTBEAT_INTERVAL="0.5",
        LOCKSTEP_LOG_LEVEL="info",
        PYTHONUNBUFFERED="1",
    )
    return env
