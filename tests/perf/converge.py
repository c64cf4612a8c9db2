"""Convergence benchmark: a rack of hosts that were down for a release comes back.

    .venv/bin/python -m tests.perf.converge --agents 200 [--runs 3] [--json FILE]
        [--stayers 4] [--workers K]

In a vhost of its own: a real coordinator (`--auto-approve`), N simulated hosts that
will go down and come back, and `--stayers` hosts that stay up (a release needs live
hosts to be planned), all running the real agent code (`tests.perf.fleetworker`, as in
`tests.perf.fleet`: shared connections, low priority, no service processes). Each run:

1. one deploy of a new version to every host (request to terminal event): `deploy_s`;
2. the N hosts go down (their agents stop; state dirs, keys and stores stay) and the
   harness waits until the coordinator reports every one of them lost;
3. a new version is deployed (to the stayers only: the others are down);
4. the N agents start again: from that moment until the coordinator's status shows
   all N alive and running the new version is `converge_s`, with how many
   deployments that took.

It prints a table and writes JSON rows (`--json`) with `deploy_s`, `converge_s` and
`converge_ratio` (issue 9's target: at most 3). Not part of the test run; everything it
starts it stops, and it deletes its vhost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

import aio_pika

from shared import topology
from shared.config import BrokerSettings
from shared.messages import QueryRequest
from shared.transport import Broker
from tests.perf.fleetbench import SERVICE, Bench, version
from tests.perf.workers import Workers
from tests.perf.workspace import Workspace
from tests.support.rabbit import vhost


class ConvergeBench(Bench):
    def __init__(self, args: Any, n: int, amqp_url: str, ws: Workspace) -> None:
        super().__init__(args, n, amqp_url, ws)
        self.returning = self.hosts
        self.stay = [f"s{i:05d}" for i in range(args.stayers)]
        self.hosts = self.returning + self.stay
        self.stayers = Workers(ws, self.workers.source)
        self.row.update(stayers=args.stayers, converge_runs=[])

    async def run(self) -> dict[str, Any]:
        env = self.env()
        self.coordinator = self.start_coordinator(env)
        self.pid = self.coordinator.pid
        self.broker = Broker(BrokerSettings(amqp_url=self.amqp_url), "perf:converge")
        await self.broker.connect()
        raw = await aio_pika.connect(self.amqp_url, client_properties={"connection_name": "perf"})
        config = dict(amqp_url=self.amqp_url, state_root=str(self.ws.state),
                      queue_type=self.args.queue_type, nice=self.args.nice,
                      per_connection=self.args.agents_per_connection,
                      coordinator_pub=env["LOCKSTEP_COORDINATOR_KEY"])  # fmt: skip
        try:
            await self._ask("query", QueryRequest(what="status"), 60, retry=True)
            await self.workers.start(self.returning, self.args.workers, env, **config)
            await self.stayers.start(self.stay, 1, env, **config)
            await self.events.subscribe(self.broker)
            await self.start_all()
            self.args.runs *= 2  # every run registers two versions: the deploy's, the rack's
            await self.prepare_catalog()
            for run in range(1, self.args.runs // 2 + 1):
                await self.one_run(run)
        except (TimeoutError, RuntimeError) as e:
            self.row["failure"] = f"{type(e).__name__}: {e}"
            self.say(f"stopped: {self.row['failure']}")
        finally:
            self.summarise_converge()
            await self.workers.stop()
            await self.stayers.stop()
            await self.broker.close()
            await raw.close()
        return self.row

    async def one_run(self, run: int) -> None:
        state, deploy_s, _ = await self.deploy(version(2 * run - 1))
        if state != "completed":
            raise RuntimeError(f"deploy {run} ended {state}")
        await self.workers.tell("agents_stop", "agents_stopped", 120)
        await self.until(lambda hosts: all(not h["alive"] for h in hosts), "all N lost")
        target = version(2 * run)
        state, _, _ = await self.deploy(target)
        if state != "completed":
            raise RuntimeError(f"the deploy while the rack was down ended {state}")
        known = {s.deployment_id for s in self.events.seen}
        started = time.monotonic()
        await self.workers.tell("agents", "agents_started", self.args.alive_timeout)
        up_s = time.monotonic() - started  # every returning agent started and said hello
        await self.until(lambda hosts: all(_runs(h, target) for h in hosts), "all N converged")
        converge_s = time.monotonic() - started
        converges = {s.deployment_id for s in self.events.seen
                     if s.deployment_id not in known and s.data.get("trigger") == "converge"}  # fmt: skip
        record = {"run": run, "deploy_s": round(deploy_s, 3), "converge_s": round(converge_s, 3),
                  "agents_up_s": round(up_s, 3), "converge_deployments": len(converges)}  # fmt: skip
        self.row["converge_runs"].append(record)
        self.say(f"run {run}: deploy {deploy_s:.2f} s; {self.n} hosts back and converged in "
                 f"{converge_s:.2f} s by {len(converges)} deployment(s); the simulated agents "
                 f"took {up_s:.2f} s of it to start")  # fmt: skip

    async def start_all(self) -> None:
        """Declare every agent's queue first (see `Bench.start_agents`), start the
        stayers and the returning hosts, and wait until all are alive and approved."""
        for host in self.hosts:
            await self.broker.declare_queue(topology.agent_queue(host, self.args.queue_type))
        for workers in (self.stayers, self.workers):
            await workers.tell("agents", "agents_started", self.args.alive_timeout)
        deadline = time.monotonic() + self.args.alive_timeout
        while True:
            reply = await self._ask("query", QueryRequest(what="agents"), self.args.alive_timeout)
            alive = sum(1 for a in reply.data["agents"]
                        if a["state"] == "alive" and a["key_state"] == "approved")  # fmt: skip
            if alive == len(self.hosts):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {alive} of {len(self.hosts)} agents alive and approved")
            await asyncio.sleep(1.0)
        self.say(f"{len(self.hosts)} agents alive")

    async def until(self, done: Any, what: str) -> None:
        """Poll `status` (every 0.5 s) until `done(the N returning hosts' rows)`."""
        deadline = time.monotonic() + self.args.deadline
        returning = set(self.returning)
        while True:
            reply = await self._ask("query", QueryRequest(what="status"), self.args.deadline)
            hosts = [h for h in reply.data["hosts"] if h["host_id"] in returning]
            if len(hosts) == self.n and done(hosts):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {what} within {self.args.deadline:g} s")
            await asyncio.sleep(0.5)

    def summarise_converge(self) -> None:
        runs = self.row["converge_runs"]
        for key in ("deploy_s", "converge_s"):
            values = [r[key] for r in runs]
            self.row[key] = round(statistics.median(values), 3) if values else None
        if self.row["deploy_s"] and self.row["converge_s"]:
            self.row["converge_ratio"] = round(self.row["converge_s"] / self.row["deploy_s"], 2)


def _runs(host: dict[str, Any], target: str) -> bool:
    return bool(host["alive"]) and any(
        s["service"] == SERVICE and s["version"] == target for s in host["services"]
    )


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=200, help="hosts that go down and return")
    parser.add_argument("--stayers", type=int, default=4, help="hosts that stay up")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--agents-per-connection", type=int, default=250)
    parser.add_argument("--nice", type=int, default=10)
    parser.add_argument("--deadline", type=float, default=300.0)
    parser.add_argument("--alive-timeout", type=float, default=300.0)
    parser.add_argument("--coordinator-src", type=Path)
    parser.add_argument("--coordinator-log-level", default="info")
    parser.add_argument("--keep", type=Path, help="keep logs and the coordinator store here")
    args = parser.parse_args()
    args.queue_type, args.profile = "classic", None
    signal.signal(signal.SIGTERM, _interrupt)
    row: dict[str, Any] = {"agents": args.agents}
    try:
        with (
            vhost(f"perf-converge-{args.agents}") as amqp_url,
            Workspace(args.agents, args.keep) as ws,
        ):
            row = asyncio.run(ConvergeBench(args, args.agents, amqp_url, ws).run())
    except KeyboardInterrupt:
        print("interrupted: everything started was stopped", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(row, indent=2) + "\n")
    print(f"agents {row.get('agents')} (+{args.stayers} that stay up): deploy {row.get('deploy_s')} s "
          f"(median), back and converged {row.get('converge_s')} s (median), ratio "
          f"{row.get('converge_ratio')}; runs: {json.dumps(row.get('converge_runs'))}")  # fmt: skip
    if row.get("failure"):
        print(f"failure: {row['failure']}")
    return 0 if row.get("converge_ratio") is not None and not row.get("failure") else 1


if __name__ == "__main__":
    sys.exit(main())
