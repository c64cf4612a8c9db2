"""Fleet benchmark: a real coordinator driving N simulated hosts, against the broker's floor.

    .venv/bin/python -m tests.perf.fleet --agents 100 500 [--runs 5] [--json FILE]
        [--queue-type classic|quorum] [--workers K] [--coordinator-src DIR] [--profile DIR]

What it measures is the cost of lockstep's protocol and coordinator, not of starting
services. For each N, in a vhost of its own: a real `lockstep coordinator` process
(`--auto-approve`, agent queues classic unless `--queue-type quorum`) and K worker
processes (`tests.perf.fleetworker`, at low priority) that host N/K agents each. Every
agent is the real `agent.service.Agent` with its own queue, store, key pair and state
dir; only its process driver is the benchmark's (`tests.perf.perfdriver`): the release
dir is staged and `current` switched for real, but no process starts and the health
wait passes at once.

Connections: this broker allows about 832 sockets, so agents do not get one each. The
agents of a worker share its connections (one per `--agents-per-connection` agents,
default 250) with a channel pair each, through `shared.transport.Broker(share=...)`;
the broker's file-descriptor limit is left as it is.

The floor (`tests.perf.floor`) is measured in the same run: a raw aio-pika
scatter/gather over N floor queues of the agents' queue type, served by the same
workers over the same number of connections, two rounds (one command to each queue
and one reply from each, twice). It is measured before any agent starts, and again
(twice) right before each run's deploy, on the floor queues, which no agent consumes:
the floor and the deploys then see the same background load (other work on these 2
cores, the fleet's heartbeats). `floor_s` is the median of the samples taken during
the runs. Only up to N=300 with classic queues, though (`--floor auto`): above that,
and with quorum queues, it is the floor before the agents start, so that the vhost
never holds 2N queues.

Then, with every agent alive: one deploy of the base version (not measured), the
coordinator's CPU while the fleet is idle (heartbeats only) over `--idle-seconds` or two
heartbeat periods at that N (coordinator.pace), whichever is longer,
and `--runs` times: a deploy of a new version to every host (`max_parallel` 100%,
bake 0; from the request to its terminal event on lockstep.events), then a critical
alert on lockstep.alerts and the automatic rollback it starts (from the alert to that
rollback's terminal event: every host reverted). It prints a table and writes the
rows as JSON (`--json`); the machine's load (2 cores) is reported beside the figures.

Not part of the test run: a benchmark, run by hand. Everything it starts it stops, and
it deletes its vhost, even on Ctrl-C or failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from tests.perf.fleetbench import Bench
from tests.perf.workspace import Workspace
from tests.support.rabbit import vhost

QUORUM_MAX = 300
"""FIELD-NOTES: 1,000 quorum queues wedged this broker for good; stay far below."""
INTERLEAVED_MAX = 300
"""Above this, no floor queues beside the agents': a broker restarted (by anyone) while
a vhost held ~2,000 durable classic queues never finished recovering here (its
file_handle_cache ran out under the 1,024 fd soft limit; seen at N=1,000)."""
HEADER = (
    "Measures protocol and coordinator cost: real coordinator, real agent code, no "
    "service processes (tests/perf/perfdriver.py starts none and is healthy at once). "
    "Agents share their worker's AMQP connections (a channel pair each); the broker's "
    "fd limit is unchanged. Floor: raw aio-pika, one command to and one reply from "
    "each of N floor queues of the same type, two rounds."
)
FLOOR_MODES = {
    "interleaved": "floor s: median of the floors taken right before each run's deploy.",
    "before": "floor s: median of the floors taken before the agents started.",
}
COLUMNS = (
    ("agents", "agents", "{}"), ("deploy_s", "deploy s", "{:.2f}"),
    ("rollback_s", "rollback s", "{:.2f}"), ("floor_s", "floor s", "{:.3f}"),
    ("floor_fanout_s", "fanout s", "{:.3f}"), ("deploy_ratio", "deploy x", "{:.1f}"),
    ("rollback_ratio", "rollback x", "{:.1f}"), ("cpu_s_per_deploy", "cpu s/deploy", "{:.2f}"),
    ("fleet_cpu_s_per_deploy", "fleet cpu s/deploy", "{:.1f}"),
    ("coordinator_rss_mb", "rss MB", "{:.0f}"), ("idle_cpu_pct", "idle cpu %", "{:.1f}"),
    ("backlog_peak", "backlog", "{}"), ("agent_lost_events", "lost", "{}"),
    ("connection_drops", "drops", "{}"), ("load", "load 1m idle/end", "{}"),
    ("runs_completed", "runs", "{}"),
)  # fmt: skip


def broker_answers() -> bool:
    """Whether the broker still answers (bounded: a wedged node never does)."""
    try:
        subprocess.run(["rabbitmqctl", "-q", "-t", "10", "status"], capture_output=True,
                       timeout=15, check=True)  # fmt: skip
    except (subprocess.SubprocessError, OSError):
        return False
    return True


def floor_mode(args: argparse.Namespace, n: int) -> str:
    if args.floor != "auto":
        return str(args.floor)
    small = args.queue_type == "classic" and n <= INTERLEAVED_MAX
    return "interleaved" if small else "before"


def run_one(args: argparse.Namespace, n: int) -> dict[str, Any]:
    args = argparse.Namespace(**{**vars(args), "floor": floor_mode(args, n)})
    row: dict[str, Any] = {"agents": n}
    amqp_url = ""
    try:
        with vhost(f"perf-fleet-{n}") as amqp_url, Workspace(n, args.keep) as ws:
            row = asyncio.run(Bench(args, n, amqp_url, ws).run())
            row["work_dir"] = str(ws.root) if args.keep else None
    except subprocess.CalledProcessError:  # the vhost's deletion failed (broker away)
        if not amqp_url:
            raise
        name = amqp_url.rsplit("/", 1)[1]
        if _delete(name):
            row["vhost_note"] = f"{name} deleted late: the broker was away"
        else:
            row["failure"] = f"vhost {name} left behind: the broker does not answer"
    idle, end = row.get("load_idle"), row.get("load_end")
    row["load"] = f"{idle[0] if idle else '-'}/{end[0] if end else '-'}"
    return row


def _delete(name: str, seconds: float = 300) -> bool:
    """Keep trying to delete vhost `name` for a while (the broker may be restarting)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            subprocess.run(["rabbitmqctl", "-q", "-t", "10", "delete_vhost", name],
                           capture_output=True, timeout=30, check=True)  # fmt: skip
            return True
        except subprocess.SubprocessError:
            pass
        time.sleep(10)  # the broker is not back yet
    print(f"could not delete vhost {name}: rabbitmqctl delete_vhost {name}", file=sys.stderr)
    return False


def table(rows: list[dict[str, Any]]) -> str:
    cells = [[title for _, title, _ in COLUMNS]]
    for row in rows:
        cells.append([fmt.format(row[key]) if row.get(key) is not None else "-"
                      for key, _, fmt in COLUMNS])  # fmt: skip
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in cells]
    notes = [f"N={r['agents']}: {r['failure']}" for r in rows if r.get("failure")]
    modes = {r.get("floor_mode") for r in rows}
    notes += [FLOOR_MODES[m] for m in sorted(m for m in modes if m)]
    return "\n".join([HEADER, "", *lines, *notes])


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, nargs="+", required=True)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--queue-type", choices=("classic", "quorum"), default="classic")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--agents-per-connection", type=int, default=250)
    parser.add_argument("--nice", type=int, default=10, help="workers' niceness")
    parser.add_argument("--floor-reps", type=int, default=5)
    parser.add_argument(
        "--floor",
        choices=("auto", "interleaved", "before"),
        default="auto",
        help="keep the floor queues up for a floor before each run, or measure it only "
        f"before the agents start; auto: interleaved up to N={INTERLEAVED_MAX}, classic",
    )
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=10.0,
        help="the least idle window; it spans two heartbeat periods at least",
    )
    parser.add_argument("--deadline", type=float, default=180.0, help="per deploy/rollback")
    parser.add_argument("--alive-timeout", type=float, default=300.0)
    parser.add_argument("--coordinator-src", type=Path, help="run the coordinator from this tree")
    parser.add_argument("--coordinator-log-level", default="info")
    parser.add_argument("--profile", type=Path, help="py-spy raw profiles of the runs go here")
    parser.add_argument("--keep", type=Path, help="keep logs and the coordinator store here")
    args = parser.parse_args()
    too_many = [n for n in args.agents if n > QUORUM_MAX]
    if args.queue_type == "quorum" and too_many:
        parser.error(f"quorum agent queues only up to N={QUORUM_MAX} (see FIELD-NOTES)")
    if args.queue_type == "quorum" and args.floor == "interleaved":
        parser.error("no interleaved floor with quorum queues: never 2N of them at once")
    signal.signal(signal.SIGTERM, _interrupt)
    rows: list[dict[str, Any]] = []
    meta = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:], "note": HEADER}
    try:
        for n in args.agents:
            rows.append(run_one(args, n))
            if args.json:
                args.json.write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
            if not broker_answers():
                print("the broker stopped answering: no further runs", file=sys.stderr)
                break
    except KeyboardInterrupt:
        print("interrupted: everything started was stopped", file=sys.stderr)
    print(table(rows))
    return 0 if rows and all(not r.get("failure") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
