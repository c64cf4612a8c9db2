"""Issue 10 "fencing", in one process and without races: a coordinator whose lease a
standby took finds its writes refused and publishes nothing.

The real runtime (`Deployments`) on a real store (both backends) and the real broker,
its commits fenced by its epoch and its publishes gated by its lease, exactly as
`coordinator.service` wires them. It takes the lease with a short TTL and never renews
it (a process stalled past its lease); another store takes the lease over; then the
votes that would make it decide and send the commits arrive. Nothing of them is saved,
nothing is sent, and it knows it lost the lease.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator import machine
from coordinator.leadership import Leadership
from coordinator.runtime import Deployments
from coordinator.store import Store
from shared import signing, topology
from shared.config import BrokerSettings
from shared.errors import Fenced
from shared.messages import Ping, make
from shared.tasks import TaskGroup
from shared.transport import Broker
from tests.support.rabbit import publish_raw
from tests.support.tap import tap, wait_for
from tests.test_runtime import HOSTS, _started, _votes

TTL = 1.0


@pytest.fixture
async def stalled(
    store_at: str | Path, amqp_url: str, coordinator_key: Ed25519PrivateKey
) -> AsyncIterator[tuple[Deployments, Store, Leadership, Broker]]:
    """A runtime wired as the active coordinator's, at epoch 1, with a deployment that
    has sent its prepares; its lease is never renewed."""
    store, leases = await Store.open(store_at), await Store.open(store_at)
    leadership = Leadership(leases, TTL)
    assert await leadership.take() == 1
    store.fence(1, leadership.fenced)
    broker = Broker(BrokerSettings(amqp_url=amqp_url), "test:stalled",
                    signer=signing.Signer(coordinator_key), gate=leadership.confirm)  # fmt: skip
    await broker.connect()
    await broker.declare(*(topology.agent_queue(h, "classic") for h in HOSTS))
    tasks = TaskGroup("test:stalled")

    async def nothing(*_: Any) -> None:
        return None

    try:
        deployments = Deployments(store, broker, tasks, 300.0, nothing, nothing)
        deployment_id = await _started(store)
        await deployments.drive(deployment_id, machine.Started())  # prepares sent
        yield deployments, store, leadership, broker
    finally:
        await tasks.close()
        await broker.close()
        await store.close()
        await leases.close()


async def _taken_over(store_at: str | Path) -> None:
    """A standby takes the lease once it expired (epoch 2)."""
    standby = await Store.open(store_at)
    try:
        deadline = time.monotonic() + 10 * TTL
        while await standby.take_lease("standby", "host-2", 2, ttl=30) is None:
            assert time.monotonic() < deadline, "the lease never expired"
            await asyncio.sleep(0.1)  # the stalled one's lease runs out
    finally:
        await standby.close()


async def test_a_stalled_leaders_decision_is_refused_and_no_commit_is_sent(
    stalled: tuple[Deployments, Store, Leadership, Broker], store_at: str | Path, amqp_url: str
) -> None:
    deployments, store, leadership, broker = stalled
    before = await store.deployment("d1")
    assert before is not None
    await _taken_over(store_at)
    async with tap(amqp_url, topology.COMMANDS) as commands:
        results = await asyncio.gather(*(deployments.drive("d1", v) for v in _votes()),
                                       return_exceptions=True)  # fmt: skip
        assert results
        assert all(isinstance(r, Fenced) for r in results), results
        with pytest.raises(Fenced):  # and anything it would publish is refused too
            await broker.publish(topology.COMMANDS, topology.host_key(HOSTS[0]),
                                 make(Ping(), broker.name))  # fmt: skip
        # a marker sent after them by another publisher: once the tap has it, anything
        # the stalled one had sent would have been routed before it
        await publish_raw(amqp_url, topology.COMMANDS, topology.host_key(HOSTS[0]), [b"marker"])
        await wait_for(commands, lambda _, body: body == b"marker", what="the marker")
    assert [body for _, body in commands] == [b"marker"]
    after = await store.deployment("d1")
    assert after is not None
    assert after.machine == before.machine  # no vote, no decision saved
    assert leadership._lost.is_set()  # it knows: its hold() returns and it steps down
