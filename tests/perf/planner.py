"""Benchmark: how the planner's time grows with the number of hosts (issue 9).

    .venv/bin/python -m tests.perf.planner [--hosts 1000 10000 20000] [--runs 3]

Plans two changed services (a provider on every host, a consumer on the hosts labelled
`role=web`, half of them) with `max_parallel` 10% and a canary, over fleets of each
size, and prints the best of `--runs` wall times per plan and the time per host. Linear
batching keeps the per-host figure flat as the fleet grows. Pure CPU, no I/O: not part
of the test run (speed is measured here, never asserted in a test).
"""

from __future__ import annotations

import argparse
import time

from coordinator.planner import AgentInfo, plan
from coordinator.resolver import Catalog
from shared.specs import ServiceVersion, Strategy


def _spec(name: str, version: str, hosts: dict[str, str], **requires: str) -> ServiceVersion:
    return ServiceVersion(
        name=name,
        version=version,
        artifact=f"file:///srv/{name}-{version}",
        run="python server.py",
        health={"exec": "true"},
        requires=requires,
        hosts=hosts,
    )


CATALOG: Catalog = {
    s.key: s
    for s in (
        _spec("payments", "1.0.0", {}),
        _spec("payments", "2.0.0", {}),
        _spec("orders", "1.0.0", {"role": "web"}, payments=">=1.0.0"),
        _spec("orders", "2.0.0", {"role": "web"}, payments=">=2.0.0"),
    )
}
CURRENT = {"orders": "1.0.0", "payments": "1.0.0"}
TARGET = {"orders": "2.0.0", "payments": "2.0.0"}
STRATEGY = Strategy(max_parallel="10%", canary=1)


def fleet(hosts: int) -> list[AgentInfo]:
    return [AgentInfo(f"host-{i:06d}", {"role": "web" if i % 2 else "db"}) for i in range(hosts)]


def best_time(hosts: int, runs: int) -> tuple[float, int]:
    """The fastest of `runs` plans over `hosts` hosts, and its participant count."""
    agents = fleet(hosts)
    best, participants = float("inf"), 0
    for _ in range(runs):
        started = time.perf_counter()
        result = plan(CURRENT, TARGET, CATALOG, agents, STRATEGY)
        best = min(best, time.perf_counter() - started)
        participants = len(result.participants())
    return best, participants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hosts", type=int, nargs="+", default=[1_000, 10_000, 20_000])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(f"{'hosts':>8} {'participants':>12} {'plan s':>9} {'us/host':>8}")
    for hosts in args.hosts:
        seconds, participants = best_time(hosts, args.runs)
        print(f"{hosts:>8} {participants:>12} {seconds:>9.4f} {seconds / hosts * 1e6:>8.2f}")


if __name__ == "__main__":
    main()
