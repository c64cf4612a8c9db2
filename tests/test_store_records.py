"""Issue 9 "typed objects from the store": a real SQLite store, no broker.

The store returns records (coordinator.records), and views turns them into the SPEC
documents. What an agent reported comes back exactly as it was stored (a step result
records no pid, a hello does), a release's outcome is the one coordinator.outcome
decides, and a deployment's record carries the machine's own Deployment.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from coordinator import machine, views
from coordinator.store import Store
from shared.specs import Strategy


async def test_an_agents_services_come_back_as_they_were_reported(store_at: str | Path) -> None:
    store = await Store.open(store_at)
    try:
        reported = [{"service": "orders", "version": "1.0.0", "health": "healthy", "pid": 41},
                    {"service": "payments", "version": None, "health": "stopped", "pid": None}]  # fmt: skip
        await store.enroll("h1", "k" * 43 + "=", {"role": "web"}, "approved")
        await store.agent_seen("h1", reported, {"role": "web"}, sent_at=1.0)
        [agent] = await store.agents()
        assert views.services(agent) == reported
        assert agent.running() == {"orders": "1.0.0"}
        await store.agent_service("h1", "payments", "2.0.0", "healthy", sent_at=2.0)
        [agent] = await store.agents()
        assert views.services(agent) == [
            reported[0],
            {"service": "payments", "version": "2.0.0", "health": "healthy"},
        ]
        doc = views.agents([agent], now=agent.last_seen, lost_after=lambda _: 6.0, heard={})[
            "agents"
        ][0]
        assert (doc["host_id"], doc["labels"], doc["state"], doc["key_state"]) == (
            "h1", {"role": "web"}, "alive", "approved",
        )  # fmt: skip
    finally:
        await store.close()


async def test_a_completed_deployment_makes_its_release_good_and_current(
    store_at: str | Path,
) -> None:
    store = await Store.open(store_at)
    try:
        queued = machine.queued("d1", Strategy())
        await store.queue_deployment(
            deployment_id="d1", request_id="r1", trigger="operator", kind="deploy",
            target={"orders": "1.0.0"}, request={}, locks=["orders"], machine=queued,
        )  # fmt: skip
        step = [machine.Participant("h1", "orders", "1.0.0", None)]
        started = machine.new("d1", Strategy(), [step], {"orders": 0})
        await store.start_deployment(
            deployment_id="d1", target={"orders": "1.0.0"}, from_release_id=None,
            release_id=None, plan={}, machine=started,
        )  # fmt: skip
        [record] = await store.in_flight()
        assert record.machine == started
        assert record.locks == ["orders"]
        done = replace(started, phase="completed")
        await store.save_deployment(done, [("deployment.completed", {})])
        assert await store.in_flight() == []
        [release] = await store.releases()
        assert (release.state, release.services, release.deployment_id) == (
            "good", {"orders": "1.0.0"}, "d1",
        )  # fmt: skip
        assert await store.current_release() == (release.id, {"orders": "1.0.0"})
        record = await store.deployment("d1")
        assert record is not None
        assert views.deployment(record)["participants"] == [
            {"host": "h1", "service": "orders", "version": "1.0.0", "from_version": None,
             "state": "preparing", "reason": ""},
        ]  # fmt: skip
        assert [e.type for e in await store.events()] == [
            "deployment.preparing", "deployment.completed",
        ]  # fmt: skip
    finally:
        await store.close()
