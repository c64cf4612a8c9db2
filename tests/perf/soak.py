"""Soak: M deployments against real processes while injecting random faults.

    .venv/bin/python -m tests.perf.soak --deployments 100 --fault-rate 0.6 --seed 7 [--ha]

A real coordinator and three real agents run in a vhost of their own. Each round asks
for the other of two good releases (now and then a bad one, whose health check fails
and is compensated) and, with probability --fault-rate, injects one fault from the
fault suite: coordinator or agent SIGKILL at a named protocol point, an agent SIGSTOP
longer than the prepare timeout, a broker restart or all connections closed mid-flight,
or a command and a report delivered twice (real ones, captured from the round's own
traffic by a tap queue and replayed as they are: signed messages cannot be forged).

With `--ha` (issue 10) the coordinators are two, an active one and a standby, on a
PostgreSQL server of the soak's own (pg_ctl), and the broker is a three-node cluster
(deploy/rabbitmq-cluster.sh) with quorum queues; the faults are then those that
concern the fleet's own processes (agent kills and stops, duplicates) and the new
ones: the active coordinator SIGKILLed mid-flight (the standby takes over, and a new
standby is started), a broker node SIGKILLed (started again after the round), and
PostgreSQL stopped at once and started again.
After every round it checks the invariants
against each service's /version and the coordinator, then prints

    deployments N, faults F, invariant violations V, lost requests L, duplicate effects D

V, L and D must be 0 (the exit code is 1 otherwise). Not part of the test run: it is a
benchmark of robustness, run by hand, and its figures go into the issue's closing note.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika

from shared import signing, topology
from shared.messages import decode
from tests.e2e.fleet import Fleet
from tests.e2e.test_core import PAY, PLACES, WEB
from tests.support import postgres
from tests.support.cluster import Cluster, cluster
from tests.support.procs import Procs, kill_group, wait_until
from tests.support.rabbit import publish_raw, rabbitmqctl, vhost

GOOD = [{"orders": "1.0.0", "payments": "1.0.0"}, {"orders": "2.0.0", "payments": "2.0.0"}]
BAD = {"orders": "2.1.0", "payments": "2.0.0"}
TERMINAL = {"completed", "aborted", "rolled_back", "failed"}
FAULTS = [
    "coordinator.prepare_sent", "coordinator.decided", "coordinator.mid_commit",
    "agent.voted", "agent.switched", "agent.sigstop", "broker.restart",
    "broker.close_connections", "duplicate.command", "duplicate.report",
]  # fmt: skip
HA_FAULTS = [
    "ha.failover", "ha.node_kill", "ha.postgres_restart", "agent.voted",
    "agent.switched", "agent.sigstop", "duplicate.command", "duplicate.report",
]  # fmt: skip


@dataclass
class HA:
    """What `--ha` adds: the cluster, the store's server, the coordinators started."""

    cluster: Cluster
    server: postgres.Server
    coordinators: list[subprocess.Popen[bytes]] = field(default_factory=list)
    down: int | None = None
    """A node killed this round, started again once the round is checked."""


class Soak:
    def __init__(
        self, fleet: Fleet, amqp_url: str, rng: random.Random, ha: HA | None = None
    ) -> None:
        self.fleet, self.amqp_url, self.rng, self.ha = fleet, amqp_url, rng, ha
        self.faults_to_draw = HA_FAULTS if ha else FAULTS
        self.current = GOOD[0]
        self.deployments = self.faults = self.violations = self.lost = self.duplicates = 0
        self.kinds: Counter[str] = Counter()
        """How many times each fault was injected."""
        self.last_id = ""
        self.tapped: list[tuple[str, bytes]] = []

    def setup(self) -> None:
        f = self.fleet
        f.add_host("host-a", pay="yes")
        f.add_host("host-b", web="yes")
        f.add_host("host-c", pay="yes", web="yes")
        f.wait_alive("host-a", "host-b", "host-c")
        f.register("payments", "1.0.0", hosts=PAY)
        f.register("payments", "2.0.0", hosts=PAY)
        f.register("orders", "1.0.0", hosts=WEB, requires={"payments": ">=1.0.0"})
        f.register("orders", "2.0.0", hosts=WEB, requires={"payments": ">=2.0.0"})
        f.register("orders", "2.1.0", hosts=WEB, requires={"payments": ">=2.0.0"}, fail_health=True)
        first = f.deploy("orders=1.0.0", "payments=1.0.0")
        assert first.code == 0, first.stderr

    def round(self, index: int, fault_rate: float) -> None:
        target = BAD if index % 9 == 8 else GOOD[1] if self.current == GOOD[0] else GOOD[0]
        fault = self.rng.choice(self.faults_to_draw) if self.rng.random() < fault_rate else None
        if fault:
            self.faults += 1
            self.kinds[fault] += 1
        start = dict(self.current)
        deployment_id = self._run(target, fault)
        self.deployments += 1
        if not deployment_id:
            self.lost += 1
            return
        row = self._settled(deployment_id)
        if row is None:
            self.lost += 1
            self._restore()
            return
        ok = row["state"] == "completed"
        self.current = dict(target) if ok else start
        self.violations += self._check()
        self.duplicates += self._duplicates(deployment_id)
        self.last_id = deployment_id
        self._restore()
        print(f"round {index + 1}: {row['state']:<11} fault={fault or '-'}", flush=True)

    def summary(self) -> str:
        return (f"deployments {self.deployments}, faults {self.faults}, invariant violations "
                f"{self.violations}, lost requests {self.lost}, duplicate effects "
                f"{self.duplicates}")  # fmt: skip

    @property
    def passed(self) -> bool:
        return self.violations == self.lost == self.duplicates == 0

    def _run(self, target: dict[str, str], fault: str | None) -> str:
        f = self.fleet
        pairs = [f"{k}={v}" for k, v in sorted(target.items())]
        flags = ["--prepare-timeout", "3s", "--max-parallel", "1"]
        if fault and fault.startswith("coordinator."):
            f.kill_coordinator()
            f.start_coordinator(fault=fault)
        if fault in ("agent.voted", "agent.switched"):
            host = self.rng.choice(["host-a", "host-b", "host-c"])
            f.kill_agent(host)
            f.start_agent(host, fault=fault)
            f.wait_alive(host)
        if fault == "agent.sigstop":
            f.signal_agent("host-c", signal.SIGSTOP)
        result = f.cli("deploy", *pairs, "--json", *flags, timeout=60)
        deployment_id = str(result.doc["deployment_id"]) if result.code == 0 else ""
        self._after_submit(fault, deployment_id, target)
        if not deployment_id:  # the coordinator died before replying: find the request
            deployment_id = self._newest_after(self.last_id)
        return deployment_id

    def _after_submit(self, fault: str | None, deployment_id: str, target: dict[str, str]) -> None:
        f = self.fleet
        if fault and fault.startswith("coordinator."):
            assert f.coordinator is not None
            try:
                f.coordinator.wait(20)
            except Exception:  # the point was not reached (e.g. nothing to commit)
                f.kill_coordinator()
            f.start_coordinator()
        elif fault == "agent.sigstop":
            time.sleep(4)  # the fault itself: silent past the 3 s prepare timeout
            f.signal_agent("host-c", signal.SIGCONT)
        elif fault == "broker.restart":
            rabbitmqctl("stop_app")
            rabbitmqctl("start_app")
            rabbitmqctl("await_startup")
        elif fault == "broker.close_connections":
            rabbitmqctl("close_all_connections", "soak")
        elif fault == "ha.failover":
            self._failover()
        elif fault == "ha.node_kill":
            assert self.ha is not None
            self.ha.down = self.rng.choice([1, 2, 3])
            self.ha.cluster.kill(self.ha.down)
        elif fault == "ha.postgres_restart":
            assert self.ha is not None
            self.ha.server.restart()
        elif fault in ("duplicate.command", "duplicate.report") and deployment_id:
            exchange, key = (
                (topology.COMMANDS, topology.host_key(TAPPED))
                if fault == "duplicate.command"
                else (topology.REPORTS, topology.REPORTS_KEY)
            )
            captured = wait_until(lambda: self._captured(exchange, deployment_id), 30,
                                  f"a {fault} of {deployment_id} to replay")  # fmt: skip
            asyncio.run(publish_raw(self.amqp_url, exchange, key, captured[:1] * 2))

    def _failover(self) -> None:
        """SIGKILL the active coordinator (the standby takes over); start a new standby."""
        assert self.ha is not None
        status = wait_until(lambda: (r := self.fleet.cli("status", "--json")).code == 0 and r,
                            60, "a coordinator to answer")  # fmt: skip
        active = (status.doc.get("coordinator") or {}).get("pid")
        killed = [p for p in self.ha.coordinators if p.pid == active]
        assert killed, f"the active coordinator {active} is none of those started"
        kill_group(killed[0].pid, signal.SIGKILL)
        killed[0].wait(10)
        self.ha.coordinators = [p for p in self.ha.coordinators if p.poll() is None]
        start_standby(self.fleet, self.ha)

    def _restore(self) -> None:
        """Start again the broker node a fault killed this round."""
        if self.ha is not None and self.ha.down is not None:
            self.ha.cluster.revive(self.ha.down)
            self.ha.down = None

    def _captured(self, exchange: str, deployment_id: str) -> list[bytes]:
        """The messages of `deployment_id` the tap saw on `exchange`, as they were sent."""
        self.tapped.extend(asyncio.run(_drain(self.amqp_url)))
        return [body for seen, body in self.tapped
                if seen == exchange and getattr(decode(body).body, "deployment_id", "")
                == deployment_id]  # fmt: skip

    def _revive(self) -> None:
        """Start again every agent a fault killed (SIGKILL at a named point)."""
        for host in self.fleet.hosts.values():
            if host.proc is not None and host.proc.poll() is not None:
                self.fleet.start_agent(host.host_id)

    def _newest_after(self, previous: str) -> str:
        def find() -> str | None:
            rows = self.fleet.cli("history", "--json")
            if rows.code != 0 or not rows.doc["deployments"]:
                return None
            newest = rows.doc["deployments"][0]["deployment_id"]
            return str(newest) if newest != previous else None

        try:
            return str(wait_until(find, 60, "the request to show up"))
        except AssertionError:
            return ""

    def _settled(self, deployment_id: str) -> dict[str, object] | None:
        def ended() -> dict[str, object] | None:
            self._revive()
            rows = self.fleet.cli("history", "--json")
            if rows.code != 0:
                return None
            for row in rows.doc["deployments"]:
                if row["deployment_id"] == deployment_id and row["state"] in TERMINAL:
                    return dict(row)
            return None

        try:
            return wait_until(ended, 180, f"deployment {deployment_id}")  # type: ignore[no-any-return]
        except AssertionError:
            return None

    def _check(self) -> int:
        wanted = {place: self.current[place[1]] for place in PLACES}
        try:
            wait_until(lambda: self.fleet.running() == wanted, 60, "processes")
            wait_until(
                lambda: {p: self.fleet.reported().get(p) for p in PLACES} == wanted, 30, "status"
            )
        except AssertionError as e:
            print(f"  violation: {e}; running={self.fleet.running()}", flush=True)
            return 1
        return 0

    def _duplicates(self, deployment_id: str) -> int:
        """Switches made twice for one step of `deployment_id` (a commit onto the version
        already running counts too)."""
        counts = Counter(
            (h, s["service"], s["kind"]) for h in self.fleet.hosts for s in self.fleet.switches(h)
            if s["deployment_id"] == deployment_id
        )  # fmt: skip
        return sum(n - 1 for n in counts.values() if n > 1)


TAP = "soak.tap"
TAPPED = "host-c"
"""The host whose commands are tapped (and replayed): it runs both services, so it
takes part in every deployment (host-a runs payments only, which the bad release does
not change: a round with it had no command to replay)."""


async def _tap(amqp_url: str, quorum: bool) -> None:
    """A queue of the soak's own that sees TAPPED's commands and every report."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        arguments = {"x-queue-type": "quorum"} if quorum else None
        queue = await channel.declare_queue(TAP, durable=True, arguments=arguments)
        await queue.bind(topology.COMMANDS, topology.host_key(TAPPED))
        await queue.bind(topology.REPORTS, topology.REPORTS_KEY)


async def _drain(amqp_url: str) -> list[tuple[str, bytes]]:
    """What the tap holds now: (exchange, raw body) in the order it was published."""
    connection = await aio_pika.connect(amqp_url)
    found: list[tuple[str, bytes]] = []
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(TAP)
        while (message := await queue.get(fail=False, no_ack=True)) is not None:
            found.append((message.exchange or "", message.body))
    return found


def start_standby(fleet: Fleet, ha: HA) -> None:
    """One more coordinator on the shared store; it waits until it holds the lease."""
    ha.coordinators.append(fleet.start_standby(f"coordinator-{len(ha.coordinators) + 1}.log"))


def run(deployments: int, fault_rate: float, seed: int, ha: bool) -> Soak:
    """The soak, from setup to the last round; every process and node it started is
    stopped, and its vhost, cluster and PostgreSQL server removed, however it ends."""
    with contextlib.ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lockstep-soak-")))
        procs = Procs(root)
        extra: HA | None = None
        if ha:
            nodes = stack.enter_context(cluster(root / "cluster"))
            server = stack.enter_context(postgres.private_server())
            amqp_url = nodes.urls(stack.enter_context(nodes.vhost("soak")))
            extra = HA(nodes, server)
        else:
            amqp_url = stack.enter_context(vhost("soak"))
        stack.callback(procs.stop_all)  # first on the way out: before the broker and store
        signing.write_pair(root / "keys", "coordinator", signing.generate())
        env = dict(os.environ, LOCKSTEP_AMQP_URL=amqp_url, LOCKSTEP_HEARTBEAT_INTERVAL="0.5",
                   LOCKSTEP_COORDINATOR_KEY=str(root / "keys" / signing.COORDINATOR_PUB),
                   LOCKSTEP_AGENT_USERS="shared", PYTHONUNBUFFERED="1")  # fmt: skip
        fleet = Fleet(root, env, procs)
        if extra is not None:
            fleet.db = extra.server.url
            fleet.start_coordinator(log="coordinator-0.log")
            assert fleet.coordinator is not None
            extra.coordinators.append(fleet.coordinator)
            start_standby(fleet, extra)
        else:
            fleet.start_coordinator()
        asyncio.run(_tap(amqp_url.split(",")[0], quorum=ha))
        soak = Soak(fleet, amqp_url.split(",")[0], random.Random(seed), extra)
        soak.setup()
        for index in range(deployments):
            soak.round(index, fault_rate)
        return soak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deployments", type=int, default=100)
    parser.add_argument("--fault-rate", type=float, default=0.6)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--ha",
        action="store_true",
        help="two coordinators on PostgreSQL, a three-node broker cluster",
    )
    args = parser.parse_args()
    started = time.monotonic()
    soak = run(args.deployments, args.fault_rate, args.seed, args.ha)
    print(soak.summary())
    print(f"elapsed {time.monotonic() - started:.0f} s, seed {args.seed}")
    return 0 if soak.passed else 1


if __name__ == "__main__":
    sys.exit(main())
