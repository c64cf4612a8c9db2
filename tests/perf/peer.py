"""Peer run: `lockstep deploy --wait` to N real agent processes, each host running a
real (tiny) HTTP service, timed from the CLI's start to its exit.

    .venv/bin/python -m tests.perf.peer --agents 50 [--rounds 5] [--json FILE]

In a vhost of its own: a real `lockstep coordinator` (`--auto-approve`) and N real
`lockstep agent` processes (as tests/e2e/fleet.py starts them), one service (the
tests' demo HTTP service, tests/support/artifacts.py) on every host, health checked
over HTTP every 0.2 s with `healthy_after` 2. After a first deploy (not timed), each
round deploys the other of two versions with `--max-parallel 100% --bake 0` and times
the CLI from start to exit; it prints every round, the median and the machine's load.
Every lockstep process runs the code of the source tree this module is in.

Not part of the test run: a benchmark, run by hand. Every process it starts (agents,
services, coordinator) is killed and its vhost deleted, even on Ctrl-C or failure.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

from shared import signing
from tests.e2e.fleet import Fleet
from tests.perf import procstat
from tests.support.artifacts import build_artifact, service_toml
from tests.support.procs import Procs
from tests.support.rabbit import vhost

SOURCE = Path(__file__).resolve().parents[2]
SERVICE = "orders"  # every host of tests/e2e/fleet.py has an `orders_port` label
VERSIONS = ("1.0.0", "2.0.0")
FLAGS = ("--max-parallel", "100%", "--bake", "0")


def register(fleet: Fleet, version: str) -> None:
    path, digest = build_artifact(fleet.artifacts, SERVICE, version)
    text = service_toml(SERVICE, version, path, digest, hosts={"role": "web"}, interval="0.2s",
                        healthy_after=2)  # fmt: skip
    fleet.specs.mkdir(exist_ok=True)
    spec = fleet.specs / f"{SERVICE}-{version}.toml"
    spec.write_text(text)
    result = fleet.cli("register", str(spec), "--json")
    if result.code != 0:
        raise RuntimeError(f"register {version}: {result.stderr}")


def timed_deploy(fleet: Fleet, version: str) -> tuple[float, int, str]:
    """(seconds from CLI start to exit, exit code, final state)."""
    started = time.monotonic()
    result = fleet.cli("deploy", f"{SERVICE}={version}", "--wait", "--json", *FLAGS, timeout=300)
    elapsed = time.monotonic() - started
    state = str(result.doc.get("state")) if isinstance(result.doc, dict) else "?"
    return elapsed, result.code, state


def run(args: argparse.Namespace, root: Path, amqp_url: str, procs: Procs) -> dict[str, Any]:
    signing.write_pair(root / "keys", "coordinator", signing.generate())
    env = dict(os.environ, LOCKSTEP_AMQP_URL=amqp_url, LOCKSTEP_AGENT_USERS="shared",
               LOCKSTEP_COORDINATOR_KEY=str(root / "keys" / signing.COORDINATOR_PUB),
               PYTHONPATH=str(SOURCE), PYTHONUNBUFFERED="1")  # fmt: skip
    fleet = Fleet(root, env, procs)
    fleet.start_coordinator()
    hosts = [f"host-{i:03d}" for i in range(args.agents)]
    for host in hosts:
        fleet.add_host(host, role="web")
    fleet.wait_alive(*hosts, timeout=args.alive_timeout)
    for version in VERSIONS:
        register(fleet, version)
    seconds, code, state = timed_deploy(fleet, VERSIONS[0])
    if code != 0:
        raise RuntimeError(f"the first deploy (not timed) ended {state} (exit {code})")
    rounds: list[dict[str, Any]] = []
    for index in range(args.rounds):
        target = VERSIONS[(index + 1) % 2]
        seconds, code, state = timed_deploy(fleet, target)
        rounds.append({"version": target, "seconds": round(seconds, 3), "exit": code,
                       "state": state, "load": procstat.load()})  # fmt: skip
        print(f"round {index + 1}: {target} {state} exit {code} in {seconds:.2f} s "
              f"(load {procstat.load()[0]})", flush=True)  # fmt: skip
    ok = [float(r["seconds"]) for r in rounds if r["exit"] == 0]
    return {"agents": args.agents, "rounds": rounds, "median_s": statistics.median(ok) if ok
            else None, "ok_rounds": len(ok), "source": str(SOURCE)}  # fmt: skip


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--alive-timeout", type=float, default=180.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)
    doc: dict[str, Any] = {"agents": args.agents, "median_s": None}
    with tempfile.TemporaryDirectory(prefix="lockstep-peer-") as tmp, vhost("peer") as amqp_url:
        procs = Procs(Path(tmp))
        try:
            doc = run(args, Path(tmp), amqp_url, procs)
        except (RuntimeError, AssertionError) as e:
            print(f"stopped: {e}", file=sys.stderr)
        except KeyboardInterrupt:
            print("interrupted: everything started was stopped", file=sys.stderr)
        finally:
            procs.stop_all()
    median = doc.get("median_s")
    shown = f"{median:.2f} s" if median is not None else "-"
    print(f"peer run: {args.agents} real agents, median `lockstep deploy --wait` {shown} "
          f"over {doc.get('ok_rounds', 0)} of {args.rounds} rounds (CLI start to exit; "
          f"load {procstat.load()[0]} on 2 cores)")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0 if median is not None and doc.get("ok_rounds") == args.rounds else 1


if __name__ == "__main__":
    sys.exit(main())
