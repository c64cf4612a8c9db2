"""One fleet size of the benchmark, start to end (`tests.perf.fleet` runs one per N).

`Bench.run` starts the coordinator and the workers, measures the floor (and keeps its
queues up to measure it again before each run, unless `--floor before`), starts the
agents, waits until the coordinator sees all of them alive, registers the versions,
deploys the base version once (not measured), measures the idle coordinator, then for
each run deploys a new version to every host and rolls it back with an alert, and
returns the row. Processes are started through `Workspace`, which stops them however
this ends.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aio_pika

from coordinator import pace
from shared import signing, topology
from shared.config import BrokerSettings, CoordinatorSettings
from shared.errors import LockstepError
from shared.messages import DeployRequest, QueryRequest, RegisterRequest, Reply
from shared.specs import HealthSpec, ServiceVersion, Strategy
from shared.transport import Broker
from tests.perf import procstat
from tests.perf.fleetworker import LABELS
from tests.perf.floor import Gatherer
from tests.perf.observe import Backlog, Events, Seen
from tests.perf.workers import Workers
from tests.perf.workspace import Workspace

SOURCE = Path(__file__).resolve().parents[2]
"""The source tree this benchmark runs from: the workers run its agent code, and the
coordinator too unless `--coordinator-src` names another tree (same protocol only)."""
SERVICE = "perfsvc"
BASE = "1.0.0"


def version(run: int) -> str:
    return f"1.0.{run}" if run else BASE


class Bench:
    def __init__(self, args: Any, n: int, amqp_url: str, ws: Workspace) -> None:
        self.args, self.n, self.amqp_url, self.ws = args, n, amqp_url, ws
        self.hosts = [f"h{i:05d}" for i in range(n)]
        self.row: dict[str, Any] = {"agents": n, "queue_type": args.queue_type,
                                    "workers": args.workers, "runs_requested": args.runs}  # fmt: skip
        self.events = Events()
        self.workers = Workers(ws, SOURCE)
        self.floor_up = False
        self.floor_before: list[float] = []
        self.floor_fanout: list[float] = []
        self.floor_during: list[float] = []

    def say(self, text: str) -> None:
        print(f"[N={self.n} {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    # --- processes ----------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        keys = self.ws.root / "keys"
        signing.write_pair(keys, "coordinator", signing.generate())
        return dict(os.environ, LOCKSTEP_AMQP_URL=self.amqp_url,
                    LOCKSTEP_AGENT_QUEUE_TYPE=self.args.queue_type, LOCKSTEP_AGENT_USERS="shared",
                    LOCKSTEP_COORDINATOR_KEY=str(keys / signing.COORDINATOR_PUB),
                    LOCKSTEP_LOG_LEVEL=self.args.coordinator_log_level,
                    PYTHONPATH=str(SOURCE), PYTHONUNBUFFERED="1")  # fmt: skip

    def start_coordinator(self, env: dict[str, str]) -> subprocess.Popen[bytes]:
        flags = ["coordinator", "--db", str(self.ws.root / "coordinator.db"),
                 "--key-dir", str(self.ws.root / "keys"), "--auto-approve"]  # fmt: skip
        source = (self.args.coordinator_src or SOURCE).resolve()
        self.row["coordinator_src"] = str(source)
        # `lockstep coordinator`, imported from `source` (which the log's first line names)
        command = [sys.executable, "-c", "import sys, coordinator; sys.argv[0] = 'lockstep'; "
                   "print('coordinator from', *coordinator.__path__, file=sys.stderr); "
                   "from coordinator.cli.main import app; app()", *flags]  # fmt: skip
        return self.ws.start(command, dict(env, PYTHONPATH=str(source)), "coordinator.log")

    # --- the run ------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        env = self.env()
        self.row["load_start"] = procstat.load()
        self.coordinator = self.start_coordinator(env)
        self.pid = self.coordinator.pid
        self.broker = Broker(BrokerSettings(amqp_url=self.amqp_url), "perf:harness")
        await self.broker.connect()
        raw = await aio_pika.connect(self.amqp_url, client_properties={"connection_name": "perf"})
        self.backlog = Backlog(raw)
        try:
            await self._ask("query", QueryRequest(what="status"), 60, retry=True)
            await self.workers.start(
                self.hosts, self.args.workers, env, amqp_url=self.amqp_url,
                state_root=str(self.ws.state), queue_type=self.args.queue_type,
                nice=self.args.nice, per_connection=self.args.agents_per_connection,
                coordinator_pub=env["LOCKSTEP_COORDINATOR_KEY"],
            )  # fmt: skip
            await self.measure_floor(raw)
            await self.events.subscribe(self.broker)
            await self.start_agents()
            await self.prepare_catalog()
            await self.measure_idle()
            await self.backlog.start()
            await self.measure_runs()
            await self.stop_floor()
        except (LockstepError, TimeoutError, RuntimeError) as e:
            self.row["failure"] = f"{type(e).__name__}: {e}"
            self.say(f"stopped: {self.row['failure']}")
        finally:
            self.row["load_end"] = procstat.load()
            self.summarise()
            await self.backlog.stop()
            await self.workers.stop()
            await self.broker.close()
            await raw.close()
        return self.row

    async def _ask(self, key: str, body: Any, wait: float, retry: bool = False) -> Reply:
        deadline = time.monotonic() + wait
        while True:
            try:
                return await self.broker.request(
                    key, body, wait=max(1.0, deadline - time.monotonic())
                )
            except LockstepError as e:
                if self.coordinator.poll() is not None:
                    log = self.ws.root / "coordinator.log"
                    raise RuntimeError(f"the coordinator exited (see {log})") from e
                if not retry or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)  # the coordinator is still starting

    async def measure_floor(self, raw: aio_pika.abc.AbstractConnection) -> None:
        """The floor before any agent starts; kept up for a floor before each run too
        (`--floor interleaved`), so both see the same background load."""
        self.gatherer = Gatherer(raw)
        await self.gatherer.setup()
        await self.workers.tell("floor", "floor_ready", 120 + self.n / 10)
        self.floor_up = True
        self.say("measuring the floor")
        await self.gatherer.scatter_gather(self.hosts, False, 120)  # warm-up
        reps = self.args.floor_reps
        self.floor_before = await self.gatherer.measure(self.hosts, reps, False, 120)
        self.floor_fanout = await self.gatherer.measure(self.hosts, reps, True, 120)
        self.say(f"floor {statistics.median(self.floor_before):.3f} s "
                 f"(fanout {statistics.median(self.floor_fanout):.3f} s)")  # fmt: skip
        if self.args.floor != "interleaved":
            await self.stop_floor()

    async def stop_floor(self) -> None:
        if self.floor_up:
            self.floor_up = False
            await self.workers.tell("floor_stop", "floor_stopped", 120 + self.n / 10)
            await self.gatherer.teardown()

    async def start_agents(self) -> None:
        """Declare every agent's queue (as `lockstep broker add-agent` does, with the
        coordinator's own declaration), start the agents and wait until the coordinator
        sees them all alive.

        Declared first because an agent polling for a queue that does not exist yet has
        its channel closed by the broker, and on a shared connection aiormq may reuse
        that channel's number before its close-ok: the broker then closes the whole
        connection (504 "second 'channel.open' seen") and every agent on it with it."""
        started = time.monotonic()
        for host in self.hosts:
            await self.broker.declare_queue(topology.agent_queue(host, self.args.queue_type))
        answers = await self.workers.tell("agents", "agents_started", self.args.alive_timeout)
        self.row["agents_failed"] = sum(a["failed"] for a in answers)
        deadline = started + self.args.alive_timeout
        alive = 0
        while alive < self.n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {alive} of {self.n} agents alive and approved")
            reply = await self._ask("query", QueryRequest(what="agents"), self.args.alive_timeout)
            alive = sum(1 for a in reply.data["agents"]
                        if a["state"] == "alive" and a["key_state"] == "approved")  # fmt: skip
            if alive < self.n:
                await asyncio.sleep(1.0)  # the agents are still saying hello
        self.row["alive_s"] = round(time.monotonic() - started, 1)
        self.say(f"{self.n} agents alive after {self.row['alive_s']} s")

    async def prepare_catalog(self) -> None:
        specs = []
        for run in range(self.args.runs + 1):
            artifact = self.ws.root / "artifacts" / f"{SERVICE}-{version(run)}"
            artifact.mkdir(parents=True, exist_ok=True)
            (artifact / "VERSION").write_text(f"{version(run)}\n")
            specs.append(ServiceVersion(
                name=SERVICE, version=version(run), artifact=artifact.resolve().as_uri(),
                hosts=LABELS, run="true", health=HealthSpec(exec="true", interval=3600),
            ))  # fmt: skip
        reply = await self._ask("register", RegisterRequest(versions=specs), 120)
        if not reply.ok:
            raise RuntimeError(f"register refused: {reply.error}")
        state, _, _ = await self.deploy(BASE)
        if state != "completed":
            raise RuntimeError(f"the first deploy (not measured) ended {state}")

    async def measure_idle(self) -> None:
        await asyncio.sleep(2.0)  # past the first deploy's last reports
        profiler = (
            self.ws.profile(self.pid, self.args.profile, f"{self.n}-idle")
            if self.args.profile else None
        )  # fmt: skip
        cpu, started = procstat.cpu_seconds(self.pid), time.monotonic()
        window = idle_window(self.n, self.args.idle_seconds)
        self.row["idle_window_s"] = window
        try:
            await asyncio.sleep(window)  # the measurement window itself
            used = procstat.cpu_seconds(self.pid) - cpu
        finally:
            if profiler is not None:
                self.ws.stop_profile(profiler)
        self.row["idle_cpu_pct"] = round(100 * used / (time.monotonic() - started), 1)
        self.row["load_idle"] = procstat.load()
        self.say(f"idle: {self.row['idle_cpu_pct']} % of a core over {window:.0f} s")

    async def deploy(self, target: str) -> tuple[str, float, float]:
        """(final state, seconds from request to terminal event, coordinator CPU s)."""
        request = DeployRequest(services={SERVICE: target},
                                strategy=Strategy(max_parallel="100%", bake=0))  # fmt: skip
        cpu, started = procstat.cpu_seconds(self.pid), time.monotonic()
        reply = await self._ask("deploy", request, self.args.deadline)
        if not reply.ok:
            raise RuntimeError(f"deploy refused: {reply.error}")
        dep = str(reply.data["deployment_id"])
        left = self.args.deadline - (time.monotonic() - started)
        seen = await self.events.wait(lambda s: s.terminal and s.deployment_id == dep, left)
        return self._ended(seen, started, cpu)

    async def rollback(self, known: set[str]) -> tuple[str, float, float]:
        """Publish a critical alert; the automatic rollback's (state, seconds, CPU s)."""
        body = json.dumps({"service": SERVICE, "severity": "critical", "reason": "perf"})
        channel = await self.backlog.connection.channel(publisher_confirms=True)
        alerts = await channel.get_exchange(topology.ALERTS)
        cpu, started = procstat.cpu_seconds(self.pid), time.monotonic()
        await alerts.publish(aio_pika.Message(body.encode(), delivery_mode=2),
                             topology.alert_key(SERVICE, "critical"))  # fmt: skip
        await channel.close()

        def rolled_back(s: Seen) -> bool:
            return s.terminal and s.data.get("trigger") == "alert" and s.deployment_id not in known

        return self._ended(await self.events.wait(rolled_back, self.args.deadline), started, cpu)

    def _ended(self, seen: Seen | None, started: float, cpu: float) -> tuple[str, float, float]:
        used = procstat.cpu_seconds(self.pid) - cpu
        if seen is None:
            return "timed_out", time.monotonic() - started, used
        return str(seen.data["state"]), seen.at - started, used

    async def measure_runs(self) -> None:
        self.row["runs"] = runs = []
        self.measured_from = time.monotonic()
        profiler = (
            self.ws.profile(self.pid, self.args.profile, self.n) if self.args.profile else None
        )
        try:
            for run in range(1, self.args.runs + 1):
                if self.floor_up:
                    self.floor_during += await self.gatherer.measure(self.hosts, 2, False, 120)
                known = {s.deployment_id for s in self.events.seen}
                began = time.monotonic()
                fleet_cpu = self.workers.cpu_seconds()
                d_state, d_s, d_cpu = await self.deploy(version(run))
                record = {"run": run, "deploy_state": d_state, "deploy_s": round(d_s, 3),
                          "deploy_cpu_s": round(d_cpu, 2),
                          "fleet_cpu_s": round(self.workers.cpu_seconds() - fleet_cpu, 2),
                          "backlog_peak": self.backlog.peak(began)}  # fmt: skip
                runs.append(record)
                if d_state != "completed":
                    raise RuntimeError(f"deploy {run} {d_state} after {d_s:.1f} s")
                await self.backlog.settled(max(5, self.n // 50), 60)
                r_state, r_s, r_cpu = await self.rollback(known)
                record.update(rollback_state=r_state, rollback_s=round(r_s, 3),
                              rollback_cpu_s=round(r_cpu, 2),
                              backlog_peak=self.backlog.peak(began))  # fmt: skip
                self.say(f"run {run}: deploy {d_s:.2f} s, rollback {r_s:.2f} s "
                         f"({d_state}/{r_state}), backlog peak {record['backlog_peak']}")  # fmt: skip
                if r_state != "completed":
                    raise RuntimeError(f"rollback {run} {r_state} after {r_s:.1f} s")
                await self.backlog.settled(max(5, self.n // 50), 60)
        finally:
            if profiler is not None:
                self.ws.stop_profile(profiler)

    def summarise(self) -> None:
        row, runs = self.row, self.row.get("runs", [])
        deploys = [r["deploy_s"] for r in runs if r.get("deploy_state") == "completed"]
        rollbacks = [r["rollback_s"] for r in runs if r.get("rollback_state") == "completed"]
        before, during = self.floor_before, self.floor_during
        row["floor_before_s"] = _median(before, 3)
        row["floor_during_s"] = _median(during, 3)
        row["floor_fanout_s"] = _median(self.floor_fanout, 3)
        row["floor_s"] = floor = _median(during or before, 3)
        row["floor_mode"] = "interleaved" if during else "before"
        row["floor_samples"] = [round(x, 3) for x in before + during]
        row["deploy_s"] = round(statistics.median(deploys), 3) if deploys else None
        row["rollback_s"] = round(statistics.median(rollbacks), 3) if rollbacks else None
        row["deploy_ratio"] = round(row["deploy_s"] / floor, 1) if deploys and floor else None
        row["rollback_ratio"] = round(row["rollback_s"] / floor, 1) if rollbacks and floor else None
        row["cpu_s_per_deploy"] = _median(
            [r["deploy_cpu_s"] for r in runs if r.get("deploy_state") == "completed"]
        )
        row["fleet_cpu_s_per_deploy"] = _median(
            [r["fleet_cpu_s"] for r in runs if r.get("deploy_state") == "completed"]
        )
        row["cpu_s_per_rollback"] = _median(
            [r["rollback_cpu_s"] for r in runs if r.get("rollback_state") == "completed"]
        )
        row["runs_completed"] = len(rollbacks)
        row["backlog_peak"] = max((r.get("backlog_peak", 0) for r in runs), default=0)
        row["connection_drops"] = self.workers.log_count("Unexpected connection close")
        since = getattr(self, "measured_from", None)
        row["agent_lost_events"] = self.events.count("agent.lost", since) if since else None
        try:
            row["coordinator_rss_mb"] = round(procstat.memory_mb(self.pid), 1)
            row["coordinator_peak_rss_mb"] = round(procstat.memory_mb(self.pid, "VmHWM"), 1)
        except (OSError, AttributeError):
            row["coordinator_rss_mb"] = None


def _median(values: list[Any], digits: int = 2) -> float | None:
    found = [v for v in values if v is not None]
    return round(statistics.median(found), digits) if found else None


def idle_window(agents: int, least: float) -> float:
    """Seconds to measure the idle coordinator: at least `least`, and two whole periods
    of the fleet's heartbeats (coordinator.pace at the default settings: 16 s at 2,000
    agents), so that the window holds every agent's beats and not a fraction of a
    period, whose count depends on where in the period it falls."""
    settings = CoordinatorSettings()
    beat = pace.period(agents, settings.heartbeat_interval,
                       settings.max_heartbeats_per_second, settings.heartbeat_interval)  # fmt: skip
    return max(least, 2 * beat)
