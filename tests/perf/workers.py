"""The harness's side of the fleet benchmark's worker processes (tests/perf/fleetworker.py).

`Workers.start` splits the hosts over K processes (at most one per host), each in a
session of its own and tracked by the `Workspace`, and waits until each is connected;
`tell` sends one command line to every worker and collects each one's JSON answer;
`stop` asks them to stop their agents and exit, and kills any that does not.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.perf import procstat
from tests.perf.workspace import Workspace


class Workers:
    def __init__(self, ws: Workspace, source: Path) -> None:
        self.ws = ws
        self.source = source
        self.procs: list[asyncio.subprocess.Process] = []

    async def start(self, hosts: list[str], k: int, env: dict[str, str], **config: Any) -> None:
        """K workers for `hosts`; `config` goes to each (tests.perf.fleetworker.Worker)."""
        k = max(1, min(k, len(hosts)))
        share = -(-len(hosts) // k)
        for index in range(k):
            mine = {**config, "index": index, "hosts": hosts[index * share : (index + 1) * share]}
            log = (self.ws.root / f"worker-{index}.log").open("ab")
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tests.perf.fleetworker", json.dumps(mine), env=env,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, start_new_session=True,
                cwd=self.source,
            )  # fmt: skip
            log.close()
            self.ws.track(proc.pid)
            self.procs.append(proc)
        await self.tell("", "connected", 60)

    async def tell(self, command: str, expect: str, timeout: float) -> list[dict[str, Any]]:
        """Send `command` to every worker; each one's answer (`expect`) within `timeout`."""
        for proc in self.procs:
            if command:
                assert proc.stdin is not None
                proc.stdin.write(f"{command}\n".encode())
                await proc.stdin.drain()

        async def answer(proc: asyncio.subprocess.Process) -> dict[str, Any]:
            assert proc.stdout is not None
            line = await proc.stdout.readline()
            if not line:
                raise RuntimeError(f"a worker exited (see {self.ws.root}/worker-*.log)")
            doc: dict[str, Any] = json.loads(line)
            if doc.get("event") != expect:
                raise RuntimeError(f"a worker answered {doc}, not {expect}")
            return doc

        return list(await asyncio.wait_for(
            asyncio.gather(*(answer(p) for p in self.procs)), timeout
        ))  # fmt: skip

    async def stop(self) -> None:
        for proc in self.procs:
            if proc.returncode is None and proc.stdin is not None:
                proc.stdin.write(b"stop\n")
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 60)
            except TimeoutError:
                proc.send_signal(signal.SIGKILL)
                await proc.wait()

    def cpu_seconds(self) -> float:
        """CPU seconds the workers (the simulated fleet) used so far."""
        return sum(procstat.cpu_seconds(p.pid) for p in self.procs if p.returncode is None)

    def log_count(self, text: str) -> int:
        """How often `text` appears in the workers' logs."""
        return sum(p.read_text().count(text) for p in self.ws.root.glob("worker-*.log"))
