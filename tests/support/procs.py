"""Real processes started by tests, and the guarantee that none outlive the test.

`Procs.start` runs a command in its own process group and remembers it. At teardown
every group is killed, and so is any process whose working directory lies under the
test's directory: that catches the services agents start detached (their cwd is a
release dir under the agent's state dir).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path


class Procs:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], *, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        out = log.open("ab")
        proc = subprocess.Popen(
            args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        out.close()
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.started:
            kill_group(proc.pid)
        for proc in self.started:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        for pid in pids_under(self.root):
            kill_group(pid)


def kill_group(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(os.getpgid(pid), sig)


def pids_under(root: Path) -> list[int]:
    """Live processes whose cwd is inside `root`."""
    found = []
    resolved = str(root.resolve())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if cwd == resolved or cwd.startswith(resolved + "/"):
            found.append(int(entry.name))
    return found


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):  # type: ignore[no-untyped-def]
    """Poll `predicate` until it returns a truthy value or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
