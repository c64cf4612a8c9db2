"""Issue 9 "the coordinator runtime": a real SQLite store and the real broker.

`Deployments` applies the reports that arrive together as one batch (one store
transaction), one report that cannot be applied fails alone, and the actions of a
saved state are all carried out even if one of them fails (a timer still starts).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator import machine
from coordinator.deployment import Participant
from coordinator.runtime import Deployments
from coordinator.store import Store
from shared import signing, topology
from shared.config import BrokerSettings
from shared.specs import HealthSpec, ServiceVersion, Strategy
from shared.tasks import TaskGroup
from shared.transport import Broker

HOSTS = [f"h{i:02d}" for i in range(20)]
SPEC = ServiceVersion(name="web", version="2.0.0", artifact="file:///srv/web", run="true",
                      health=HealthSpec(exec="true"))  # fmt: skip


class CountingStore(Store):
    """The real store, counting the transactions that save a deployment."""

    saves = 0

    async def save_deployment(self, *args: Any, **kwargs: Any) -> None:
        self.saves += 1
        await super().save_deployment(*args, **kwargs)


class Bogus:
    """An event the machine does not know (as a bug would make one): it cannot apply."""


@pytest.fixture
async def runtime(
    store_at: str | Path, amqp_url: str, coordinator_key: Ed25519PrivateKey
) -> AsyncIterator[tuple[Deployments, CountingStore]]:
    store = await CountingStore.open(store_at)
    broker = Broker(BrokerSettings(amqp_url=amqp_url), "test:runtime",
                    signer=signing.Signer(coordinator_key))  # fmt: skip
    await broker.connect()
    await broker.declare(*(topology.agent_queue(h, "classic") for h in HOSTS))
    tasks = TaskGroup("test:runtime")

    async def nothing(*_: Any) -> None:
        return None

    try:
        yield Deployments(store, broker, tasks, 300.0, nothing, nothing), store
    finally:
        await tasks.close()
        await broker.close()
        await store.close()


async def _started(store: Store, registered: bool = True, timeout: str = "30s") -> str:
    if registered:
        await store.register([SPEC])
    for host in HOSTS:
        await store.enroll(host, f"key-{host}", {}, "approved")
    participants = [Participant(h, "web", "2.0.0", "1.0.0") for h in HOSTS]
    strategy = Strategy(max_parallel="100%", bake=0, prepare_timeout=timeout)
    state = machine.new("d1", strategy, [participants], {"web": 0})
    await store.queue_deployment(deployment_id="d1", request_id="r1", trigger="operator",
                                 kind="deploy", target={"web": "2.0.0"}, request={},
                                 locks=["web"], machine=machine.queued("d1", strategy))  # fmt: skip
    await store.start_deployment(deployment_id="d1", target={"web": "2.0.0"},
                                 from_release_id=None, release_id=None, plan={},
                                 machine=state)  # fmt: skip
    return "d1"


def _votes() -> list[machine.Event]:
    return [machine.Voted((h, "web"), True, "", "2.0.0") for h in HOSTS]


async def test_reports_that_arrive_together_are_applied_as_one_batch_in_one_transaction(
    runtime: tuple[Deployments, CountingStore],
) -> None:
    deployments, store = runtime
    deployment_id = await _started(store)
    await deployments.drive(deployment_id, machine.Started())
    store.saves = 0
    await asyncio.gather(*(deployments.drive(deployment_id, v) for v in _votes()))
    state = await deployments.state(deployment_id)
    assert state is not None
    assert state.phase == "committing"  # every vote counted, the decision made
    # the first vote alone, then the 19 that queued behind it together (and the decision)
    assert store.saves <= 3, store.saves
    saved = await store.deployment(deployment_id)
    assert saved is not None
    assert {p.phase for p in saved.machine.participants.values()} == {"committing"}


async def test_one_report_that_cannot_be_applied_fails_alone_and_the_batch_goes_on(
    runtime: tuple[Deployments, CountingStore],
) -> None:
    deployments, store = runtime
    deployment_id = await _started(store)
    await deployments.drive(deployment_id, machine.Started())
    events: list[Any] = _votes()
    events.insert(10, Bogus())
    results = await asyncio.gather(*(deployments.drive(deployment_id, e) for e in events),
                                   return_exceptions=True)  # fmt: skip
    failed = [e for e, r in zip(events, results, strict=True) if isinstance(r, Exception)]
    assert len(failed) == 1
    assert isinstance(failed[0], Bogus)
    state = await deployments.state(deployment_id)
    assert state is not None
    assert state.phase == "committing"


async def test_a_timer_starts_even_when_the_send_beside_it_fails(
    runtime: tuple[Deployments, CountingStore],
) -> None:
    deployments, store = runtime
    deployment_id = await _started(store, registered=False, timeout="1s")  # no spec to send
    await deployments.drive(deployment_id, machine.Started())  # the prepare send fails

    async def decided() -> machine.Deployment:
        while True:
            state = await deployments.state(deployment_id)
            if state is not None and state.decision is not None:
                return state
            await asyncio.sleep(0.05)  # poll interval within the deadline below

    state = await asyncio.wait_for(decided(), 10)
    assert state.decision == "abort"  # the prepare timer fired: presumed abort
    assert "timed out" in state.reason or "did not vote" in state.reason, state.reason


async def test_when_the_lock_holder_is_cancelled_every_report_it_held_is_answered(
    runtime: tuple[Deployments, CountingStore],
) -> None:
    """The report being applied by a holder that is cancelled (a shutdown) is answered
    with the cancellation, not left waiting for ever."""
    deployments, store = runtime
    deployment_id = await _started(store)
    await deployments.drive(deployment_id, machine.Started())
    gate, saving = asyncio.Event(), asyncio.Event()
    save = store.save_deployment

    async def held_save(*args: Any, **kwargs: Any) -> None:
        if store.saves >= 1:  # the second batch's save waits at the gate
            saving.set()
            await gate.wait()
        await save(*args, **kwargs)

    store.saves = 0
    store.save_deployment = held_save  # type: ignore[method-assign]
    first, second = _votes()[:2]
    holder = asyncio.create_task(deployments.drive(deployment_id, first))
    waiter = asyncio.create_task(deployments.drive(deployment_id, second))  # behind it
    await asyncio.wait_for(saving.wait(), 10)  # the holder applies `second` now
    holder.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiter, 10)  # not a TimeoutError: it was answered
