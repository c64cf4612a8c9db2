"""In-doubt transactions (SPEC 6.5 "agent dies after voting"): the agent asks the
coordinator about every prepared transaction when it starts, and again about one left
prepared too long; the coordinator's answer is an ordinary command."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.indoubt import InDoubt, due, next_look, stale_after
from agent.store import Store, Txn
from shared import topology
from shared.messages import Commit, Inquiry, Prepare, StepResult, Vote, make
from shared.specs import ServiceVersion
from shared.tasks import TaskGroup
from shared.transport import Broker
from tests.agent.conftest import HOST, Coordinator, Fleet
from tests.agent.helpers import answered, demo_version

SPEC = ServiceVersion.model_validate(
    {"name": "demo", "version": "1.0.0", "artifact": "file:///a", "run": "true",
     "health": {"exec": "true"}}
)  # fmt: skip


def _txn(dep: str, state: str = "prepared", updated_at: float = 0.0) -> Txn:
    return Txn(dep, "demo", "1.0.0", None, SPEC, state, None, updated_at=updated_at)  # type: ignore[arg-type]


def test_stale_after_is_two_heartbeats_and_thirty_seconds() -> None:
    assert stale_after(2.0) == 34.0


@pytest.mark.parametrize(
    ("txn", "asked", "expected"),
    [
        (_txn("d1", updated_at=100.0), {}, False),  # prepared 30 s ago: not yet
        (_txn("d1", updated_at=50.0), {}, True),  # 80 s: in doubt
        (_txn("d1", "committed", updated_at=0.0), {}, False),  # has its outcome
        (_txn("d1", updated_at=50.0), {("d1", "demo"): 125.0}, False),  # asked 5 s ago
        (_txn("d1", updated_at=50.0), {("d1", "demo"): 115.0}, True),  # asked 15 s ago
        (_txn("d1", updated_at=50.0), {("d2", "demo"): 129.0}, True),  # another txn asked
    ],
)
def test_due_picks_prepared_txns_older_than_the_threshold_not_asked_lately(
    txn: Txn, asked: dict[tuple[str, str], float], expected: bool
) -> None:
    assert (due([txn], 130.0, asked, stale=34.0, every=10.0) == [txn]) is expected


async def test_a_restarted_agent_with_a_prepared_txn_publishes_an_inquiry_and_obeys_the_answer(
    coordinator: Coordinator, fleet: Fleet, tmp_path: Path
) -> None:
    agent = await fleet.start_agent()
    v1 = demo_version(tmp_path / "artifacts", "1.0.0")
    await coordinator.send(Prepare(deployment_id="d1", spec=v1, from_version=None))
    assert (await coordinator.wait(Vote, deployment_id="d1")).yes
    assert coordinator.bodies(Inquiry) == []  # a running agent waits for the decision
    await fleet.stop_agent(agent)

    again = await fleet.start_agent()
    inquiry = await coordinator.wait(Inquiry)
    assert (inquiry.deployment_id, inquiry.host_id, inquiry.service) == ("d1", HOST, "demo")
    await coordinator.send(Commit(deployment_id="d1", service="demo", version="1.0.0"))
    result = await coordinator.wait(StepResult, deployment_id="d1", step="commit")
    assert (result.ok, result.running) == (True, "1.0.0"), result.reason
    assert await answered(fleet.port, "/version") == "1.0.0"
    assert (await again.store.txn("d1", "demo")).state == "committed"  # type: ignore[union-attr]
    assert len(coordinator.bodies(Inquiry)) == 1


async def test_a_txn_left_prepared_is_asked_about_again_until_it_has_an_outcome(
    coordinator: Coordinator, broker: Broker, tmp_path: Path
) -> None:
    store = await Store.open(tmp_path / "agent.db")
    try:
        await store.put_txn(_txn("d1"))
        await store.put_txn(_txn("d2", "committed"))

        async def publish(body: Inquiry) -> None:
            await broker.publish(topology.REPORTS, topology.REPORTS_KEY, make(body, "agent:h1"))

        indoubt = InDoubt(store, publish, HOST, stale=0.2, every=0.3, tick=0.05)
        await indoubt.ask_all()
        assert (await coordinator.wait(Inquiry)).deployment_id == "d1"
        tasks = TaskGroup("test:indoubt")
        tasks.spawn(indoubt.run(), "indoubt", forever=True)
        try:
            await coordinator.wait(Inquiry, count=3, timeout=5)
            await store.set_txn_state("d1", "demo", "committed")
            sent = len(coordinator.bodies(Inquiry))
            await store.put_txn(_txn("d3"))  # a newer one: asked once it is stale
            third = await coordinator.wait(Inquiry, deployment_id="d3", timeout=5)
            assert third.service == "demo"
            assert len(coordinator.bodies(Inquiry, deployment_id="d1")) in (sent, sent + 1)
            assert coordinator.bodies(Inquiry, deployment_id="d2") == []
        finally:
            await tasks.close()
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("txns", "asked", "expected"),
    [
        ([], {}, 34.0),  # nothing prepared: one prepared now is due in `stale` at the earliest
        ([_txn("d1", "committed", updated_at=0.0)], {}, 34.0),  # has its outcome
        ([_txn("d1", updated_at=120.0)], {}, 24.0),  # prepared 10 s ago: due in 24 s
        ([_txn("d1", updated_at=50.0)], {("d1", "demo"): 125.0}, 5.0),  # asked 5 s ago
        ([_txn("d1", updated_at=50.0)], {}, 0.0),  # overdue: look now
        ([_txn("d1", updated_at=120.0), _txn("d2", updated_at=100.0)], {}, 4.0),  # the first
    ],
)
def test_next_look_is_the_first_moment_a_txn_may_be_due_so_an_idle_agent_rarely_reads(
    txns: list[Txn], asked: dict[tuple[str, str], float], expected: float
) -> None:
    assert next_look(txns, 130.0, asked, stale=34.0, every=10.0) == pytest.approx(expected)
