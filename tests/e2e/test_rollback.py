"""Issue 3 acceptance: rollback as a first-class operation, by hand and automatically.

Each test is named after the acceptance bullet it proves; every scenario ends by
checking invariants I1 and I2 against what each service process answers on /version.
"""

from __future__ import annotations

import asyncio
import json
import shutil

import aio_pika
import pytest

from shared.topology import ALERTS, alert_key
from tests.e2e.fleet import Fleet
from tests.e2e.test_core import PAY, PLACES, WEB, assert_fleet_at
from tests.support.procs import wait_until

pytestmark = pytest.mark.e2e


def register(fleet: Fleet, orders1_requires: str = ">=1.0.0") -> None:
    fleet.register("payments", "1.0.0", hosts=PAY)
    fleet.register("payments", "1.5.0", hosts=PAY)
    fleet.register("orders", "1.0.0", hosts=WEB, requires={"payments": orders1_requires})
    fleet.register("orders", "2.0.0", hosts=WEB, requires={"payments": ">=1.5.0"})


def deployed(fleet: Fleet, *pairs: str, flags: tuple[str, ...] = ()) -> dict:
    result = fleet.deploy(*pairs, flags=flags)
    assert result.code == 0, result.stdout + result.stderr
    return dict(result.doc)


def test_health_failure_during_bake_returns_fleet_to_v2_and_marks_v3_bad_with_trigger_health(
    three_hosts: Fleet,
) -> None:
    fleet = three_hosts
    register(fleet)
    fleet.register("orders", "3.0.0", hosts=WEB, requires={"payments": ">=1.5.0"},
                   fail_health_after=2.0)  # fmt: skip
    deployed(fleet, "orders=1.0.0", "payments=1.0.0", flags=("--bake", "0.5s"))
    v2 = deployed(fleet, "orders=2.0.0", "payments=1.5.0", flags=("--bake", "1s"))

    result = fleet.deploy("orders=3.0.0", flags=("--bake", "8s"))

    assert result.code == 1, result.stdout + result.stderr
    assert result.doc["state"] == "rolled_back"
    assert result.doc["trigger"] == "health"
    assert "unhealthy" in result.doc["reason"]
    assert_fleet_at(fleet, {"orders": "2.0.0", "payments": "1.5.0"})
    history = fleet.history()
    v3 = history["deployments"][0]
    assert (v3["deployment_id"], v3["trigger"], v3["state"]) == (
        result.doc["deployment_id"],
        "health",
        "rolled_back",
    )
    releases = {r["release_id"]: r["state"] for r in history["releases"]}
    assert releases[result.doc["release_id"]] == "bad"
    assert fleet.status()["release_id"] == v2["release_id"]
    refused = fleet.cli("rollback", "--to", str(result.doc["release_id"]), "--json")
    assert refused.code == 2
    assert "bad" in refused.doc["error"]["reason"]


async def _bind_events(amqp_url: str) -> None:
    """A queue of the test's own on lockstep.events, as another system would bind one."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue("test.events", durable=True)
        await queue.bind("lockstep.events", "#")


async def _events(amqp_url: str) -> list[tuple[str, dict]]:
    connection = await aio_pika.connect(amqp_url)
    found = []
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue("test.events")
        while (message := await queue.get(fail=False)) is not None:
            await message.ack()
            found.append((message.routing_key or "", json.loads(message.body)["body"]["data"]))
    return found


async def _publish_alerts(amqp_url: str, count: int) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(ALERTS)
        body = json.dumps({"service": "orders", "severity": "critical", "reason": "5xx rate"})
        await asyncio.gather(*(
            exchange.publish(aio_pika.Message(body.encode()), alert_key("orders", "critical"))
            for _ in range(count)
        ))  # fmt: skip


def test_alert_after_completed_deploy_returns_fleet_to_previous_release_and_a_burst_rolls_back_once(
    three_hosts: Fleet, amqp_url: str
) -> None:
    fleet = three_hosts
    register(fleet)
    v1 = deployed(fleet, "orders=1.0.0", "payments=1.0.0")
    v2 = deployed(fleet, "orders=2.0.0", "payments=1.5.0", flags=("--rollback-scope", "all"))
    asyncio.run(_bind_events(amqp_url))

    asyncio.run(_publish_alerts(amqp_url, 10))

    def alert_rollbacks() -> list[dict]:
        return [d for d in fleet.history()["deployments"] if d["trigger"] == "alert"]

    def handled_all() -> bool:
        events = fleet.cli("events", "--json").doc["events"]
        return sum(e["type"].startswith("alert.") for e in events) >= 10

    wait_until(lambda: alert_rollbacks() and alert_rollbacks()[0]["state"] == "completed",
               60, "the alert's rollback to complete")  # fmt: skip
    wait_until(handled_all, 30, "all ten alerts to be recorded")
    rollbacks = alert_rollbacks()
    assert len(rollbacks) == 1, rollbacks
    assert rollbacks[0]["release_id"] == v1["release_id"]
    assert "5xx rate" in rollbacks[0]["reason"]
    assert fleet.status()["release_id"] == v1["release_id"]
    assert_fleet_at(fleet, {"orders": "1.0.0", "payments": "1.0.0"})
    releases = {r["release_id"]: r["state"] for r in fleet.history()["releases"]}
    assert releases[v2["release_id"]] == "bad"
    events = asyncio.run(_events(amqp_url))
    rolled = [data for key, data in events if key == "deployment.rolled_back"]
    assert len(rolled) == 1, [key for key, _ in events]
    assert rolled[0]["trigger"] == "alert"
    assert "5xx rate" in rolled[0]["reason"]
    assert ("release.bad", v2["release_id"]) in [(k, d.get("release_id")) for k, d in events]


def test_partial_rollback_moves_only_orders_when_orders_1_accepts_payments_1_5(
    three_hosts: Fleet,
) -> None:
    fleet = three_hosts
    register(fleet, orders1_requires=">=1.0.0")
    deployed(fleet, "orders=1.0.0", "payments=1.0.0")
    deployed(fleet, "orders=2.0.0", "payments=1.5.0")

    result = fleet.cli("rollback", "--service", "orders", "--wait", "--json")

    assert result.code == 0, result.stdout + result.stderr
    assert {p["service"] for p in result.doc["participants"]} == {"orders"}
    assert result.doc["services"] == {"orders": "1.0.0", "payments": "1.5.0"}
    assert_fleet_at(fleet, {"orders": "1.0.0", "payments": "1.5.0"})


def test_partial_rollback_moves_orders_and_payments_when_orders_1_needs_older_payments(
    three_hosts: Fleet,
) -> None:
    fleet = three_hosts
    register(fleet, orders1_requires="<1.5.0")
    deployed(fleet, "orders=1.0.0", "payments=1.0.0")
    deployed(fleet, "orders=2.0.0", "payments=1.5.0")
    plan = fleet.cli("plan", "orders=1.0.0", "payments=1.0.0", "--json")
    assert plan.code == 0

    result = fleet.cli("rollback", "--service", "orders", "--wait", "--json")

    assert result.code == 0, result.stdout + result.stderr
    assert {(p["host"], p["service"]) for p in result.doc["participants"]} == PLACES
    assert result.doc["services"] == {"orders": "1.0.0", "payments": "1.0.0"}
    history = fleet.history()["deployments"][0]
    assert history["deployment_id"] == result.doc["deployment_id"]
    waves = plan.doc["plan"]["waves"]
    assert len(waves) == 1
    assert waves[0]["synchronized"], "no order keeps orders/payments valid"
    assert_fleet_at(fleet, {"orders": "1.0.0", "payments": "1.0.0"})


def test_rollback_with_release_dirs_present_downloads_nothing(three_hosts: Fleet) -> None:
    fleet = three_hosts
    register(fleet)
    v1 = deployed(fleet, "orders=1.0.0", "payments=1.0.0")
    deployed(fleet, "orders=2.0.0", "payments=1.5.0")
    shutil.rmtree(fleet.artifacts)

    result = fleet.cli("rollback", "--wait", "--json")

    assert result.code == 0, result.stdout + result.stderr
    assert result.doc["release_id"] == v1["release_id"]
    assert result.doc["trigger"] == "operator"
    assert_fleet_at(fleet, {"orders": "1.0.0", "payments": "1.0.0"})
    switched = [(s["service"], s["ts"]) for h in fleet.hosts for s in fleet.switches(h)
                if s["deployment_id"] == result.doc["deployment_id"]]  # fmt: skip
    last_orders = max(ts for service, ts in switched if service == "orders")
    first_payments = min(ts for service, ts in switched if service == "payments")
    assert last_orders < first_payments, "a rollback moves consumers before providers"
