"""Issue 9 acceptance with real processes: durable deadlines, converging returning hosts.

Each test is named after the promise it proves.
"""

from __future__ import annotations

import sqlite3
import time

import pytest

from tests.e2e.fleet import Fleet
from tests.support.procs import wait_until

pytestmark = pytest.mark.e2e

BAKE = 12.0
KILLED_INTO_BAKE = 4.0


def _event_ts(fleet: Fleet, deployment_id: str, kind: str) -> float | None:
    with sqlite3.connect(fleet.root / "coordinator.db") as db:
        row = db.execute(
            "SELECT ts FROM events WHERE deployment_id = ? AND type = ?", (deployment_id, kind)
        ).fetchone()
    return None if row is None else float(row[0])


def test_timer_deadlines_are_durable_a_restart_mid_bake_completes_at_the_first_deadline(
    three_hosts: Fleet,
) -> None:
    fleet = three_hosts
    fleet.register("payments", "1.0.0", hosts={"pay": "yes"})
    fleet.register("payments", "2.0.0", hosts={"pay": "yes"})
    assert fleet.deploy("payments=1.0.0").code == 0
    started = fleet.cli("deploy", "payments=2.0.0", "--bake", f"{BAKE:g}s", "--json")
    assert started.code == 0, started.stdout + started.stderr
    deployment_id = started.doc["deployment_id"]
    baking = wait_until(lambda: _event_ts(fleet, deployment_id, "deployment.baking"), 60,
                        "the deployment to bake")  # fmt: skip
    wait_until(lambda: time.time() - baking >= KILLED_INTO_BAKE, 30, "time to pass into the bake")

    fleet.kill_coordinator()
    fleet.start_coordinator()

    completed = wait_until(lambda: _event_ts(fleet, deployment_id, "deployment.completed"),
                           60, "the deployment to complete")  # fmt: skip
    # Restarting the bake from scratch would end it at least KILLED_INTO_BAKE + BAKE after
    # it began; the durable deadline ends it BAKE after (plus the restart's few seconds).
    assert BAKE <= completed - baking < BAKE + KILLED_INTO_BAKE - 1.0
    assert fleet.deployment(deployment_id)["state"] == "completed"


def _alive(fleet: Fleet, hosts: list[str]) -> list[bool]:
    """Whether each of `hosts` is alive, from one `status` call."""
    alive = {h["host_id"]: bool(h["alive"]) for h in fleet.status()["hosts"]}
    return [alive[h] for h in hosts]


def test_hosts_down_for_a_release_come_back_and_converge_together_in_one_deployment(
    fleet: Fleet,
) -> None:
    hosts = [f"host-{i}" for i in range(1, 5)]
    for host in hosts:
        fleet.add_host(host, web="yes")
    fleet.wait_alive(*hosts)
    fleet.register("orders", "1.0.0", hosts={"web": "yes"})
    fleet.register("orders", "2.0.0", hosts={"web": "yes"})
    assert fleet.deploy("orders=1.0.0").code == 0
    returning = hosts[1:]
    for host in returning:
        fleet.kill_agent(host)  # the host goes down: its service keeps running 1.0.0
    wait_until(lambda: not any(_alive(fleet, returning)), 30, "three hosts lost")

    release = fleet.deploy("orders=2.0.0")
    assert release.code == 0, release.stdout + release.stderr
    assert {p["host"] for p in release.doc["participants"]} == {"host-1"}
    for host in returning:
        fleet.start_agent(host)

    wait_until(lambda: all(fleet.http_version(h, "orders") == "2.0.0" for h in hosts), 60,
               "the returning hosts to converge")  # fmt: skip
    converges = [d for d in fleet.history()["deployments"] if d["trigger"] == "converge"]
    assert len(converges) == 1, converges
    with sqlite3.connect(fleet.root / "coordinator.db") as db:
        moved = {row[0] for row in db.execute(
            "SELECT host FROM participants WHERE deployment_id = ?", (converges[0]["deployment_id"],)
        )}  # fmt: skip
    assert moved == set(returning)
    assert converges[0]["state"] == "completed"
