"""Issue 9 acceptance with real processes: durable deadlines, converging returning hosts.

Each test is named after the promise it proves.
"""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import time
from pathlib import Path

import aio_pika
import pytest

from shared import topology
from shared.messages import Heartbeat, decode
from tests.e2e.fleet import Fleet
from tests.support.procs import Procs, wait_until

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


SLOW_BEATS = 3.0
"""heartbeat_interval of the convergence test: converging the old way (a drift seen on two
sweeps, after two quiet intervals) would take at least 2 x 3 s after the last deploy."""


def test_hosts_down_for_a_release_come_back_and_converge_together_in_one_deployment_at_once(
    tmp_path: Path, procs: Procs, lockstep_env: dict[str, str]
) -> None:
    fleet = Fleet(tmp_path, dict(lockstep_env, LOCKSTEP_HEARTBEAT_INTERVAL=f"{SLOW_BEATS:g}"),
                  procs)  # fmt: skip
    fleet.start_coordinator()
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
    wait_until(lambda: not any(_alive(fleet, returning)), 60, "three hosts lost")

    release = fleet.deploy("orders=2.0.0")
    assert release.code == 0, release.stdout + release.stderr
    assert {p["host"] for p in release.doc["participants"]} == {"host-1"}
    back = time.time()
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
    # converged on their hellos: no two sweeps, no quiet fleet to wait for
    assert converges[0]["started_at"] - back < 2 * SLOW_BEATS, converges[0]["started_at"] - back


PERIOD = 4.0
"""2 agents at LOCKSTEP_MAX_HEARTBEATS_PER_SECOND=0.5: told to beat every 4 s, where the
tests' heartbeat_interval of 0.5 s would judge them lost after 1.5 s of silence."""


async def _tap_heartbeats(amqp_url: str, name: str) -> None:
    """A queue of the test's own that gets a copy of every heartbeat."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(name, durable=False, auto_delete=False)
        await queue.bind(topology.REPORTS, topology.HEARTBEAT_KEY)


async def _drain(amqp_url: str, name: str) -> list[tuple[str, float, float | None]]:
    """(host, sent at, interval said) of every heartbeat tapped so far."""
    found = []
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(name)
        while (message := await queue.get(fail=False)) is not None:
            await message.ack()
            envelope = decode(message.body)
            assert isinstance(envelope.body, Heartbeat)
            body = envelope.body
            found.append((body.host_id, envelope.sent_at.timestamp(), body.interval))
    return found


def _lost_events(fleet: Fleet) -> list[dict[str, object]]:
    result = fleet.cli("events", "--json")
    assert result.code == 0, result.stderr
    return [e for e in result.doc["events"] if e["type"] == "agent.lost"]


def test_heartbeats_a_large_fleet_is_told_a_longer_period_and_no_live_agent_is_lost(
    tmp_path: Path, procs: Procs, lockstep_env: dict[str, str]
) -> None:
    env = dict(lockstep_env, LOCKSTEP_MAX_HEARTBEATS_PER_SECOND="0.5")
    fleet = Fleet(tmp_path, env, procs)
    fleet.start_coordinator()
    url = env["LOCKSTEP_AMQP_URL"]
    asyncio.run(_tap_heartbeats(url, "test.heartbeats"))
    fleet.add_host("host-a", web="yes")
    fleet.add_host("host-b", web="yes")
    fleet.wait_alive("host-a", "host-b")
    beats: list[tuple[str, float, float | None]] = []

    def tapped(until: float = 0.0) -> bool:
        """Collect the heartbeats tapped (before their TTL drops them); True past `until`."""
        beats.extend(asyncio.run(_drain(url, "test.heartbeats")))
        return time.time() > until

    def paced() -> bool:
        tapped()
        return {h for h, _, said in beats if said == PERIOD} == {"host-a", "host-b"}

    wait_until(paced, 30, "both agents to say they beat every 4 s")
    since = max(at for _, at, said in beats if said == PERIOD)
    wait_until(lambda: tapped(since + 3 * PERIOD), 30, "three periods to pass")
    fleet.kill_coordinator()  # what each host beats at survives a restart
    fleet.start_coordinator()
    wait_until(lambda: tapped(since + 5 * PERIOD), 30, "two more periods to pass")

    for host in ("host-a", "host-b"):  # (the beat the 0.5 s wait had pending may follow)
        times = sorted(at for h, at, said in beats if h == host and at >= since + 1)
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert len(gaps) >= 3, (host, times)
        assert min(gaps) > 0.8 * PERIOD - 0.5, (host, gaps)  # not every 0.5 s any more
    assert _lost_events(fleet) == []  # judged by the 4 s they beat at, not by 0.5 s
    states = {a["host_id"]: a["state"] for a in fleet.cli("agents", "--json").doc["agents"]}
    assert states == {"host-a": "alive", "host-b": "alive"}
