"""The benchmark's process driver: the agent does everything but start a process.

`tests.perf.fleet` gives it to every simulated agent (`Agent(process_driver=perfdriver,
health_wait=perfdriver.healthy_at_once)`). The agent's steps run unchanged: prepare
stages the artifact into `releases/<version>`, commit and revert switch `current` for
real and record the switch in the agent's store; only the service's process is not
started, and the health wait returns at once. What the fleet benchmark measures is
therefore the protocol and the coordinator, not how fast a service starts.

`start` returns the record of the process that hosts the agent (the benchmark worker),
so the agent's own liveness checks (`agent.driver.is_alive` in the steps and the health
monitor) see a live process; its process group is one that cannot exist, so no signal
sent on its behalf can reach anything. `stop` and `kill_leftovers` do nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

from agent import driver
from agent.driver import ProcessRecord
from shared.specs import HealthSpec

NO_GROUP = 0x7FFFFFFF
"""Above any pid_max: killpg() of it finds nothing (ESRCH), never our own group."""


def start(command: str, cwd: Path, env: Mapping[str, str], log_path: Path) -> ProcessRecord:
    """Start nothing; the record of this (the hosting) process."""
    pid = os.getpid()
    with open(f"/proc/{pid}/stat") as stat:
        start_time = int(stat.read().rsplit(")", 1)[1].split()[19])
    return ProcessRecord(pid, NO_GROUP, start_time)


def is_alive(record: ProcessRecord) -> bool:
    return driver.is_alive(record)


def exit_reason(record: ProcessRecord) -> str:
    return driver.exit_reason(record)


def kill_leftovers(record: ProcessRecord) -> None:
    """Nothing was started, so nothing is left over."""


async def stop(record: ProcessRecord, grace: float) -> None:
    """Nothing was started, so nothing is stopped."""


async def healthy_at_once(
    spec: HealthSpec,
    exited: Callable[[], str | None],
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> None:
    """Healthy at once: no probe, no `healthy_after` passes."""
