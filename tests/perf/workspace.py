"""Where one fleet size of the benchmark lives, and the guarantee that it leaves nothing.

`Workspace` owns a work dir (the coordinator's store and every log), a state dir for
the simulated hosts (under /dev/shm when there is one: a thousand hosts on one disk
would wait on each other's fsyncs, which real hosts, each with a disk of its own, do
not), and every process started for the run. On exit, however the run ended, every
process group it started is killed, the state dir is removed, and the work dir too
unless it is to be kept.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import TracebackType

from tests.support.procs import kill_group


class Workspace:
    def __init__(self, n: int, keep: Path | None) -> None:
        self.keep = keep
        if keep is not None:
            self.root = keep / f"n{n}"
            self.root.mkdir(parents=True, exist_ok=True)
        else:
            self.root = Path(tempfile.mkdtemp(prefix=f"lockstep-fleet-{n}-"))
        shm = Path("/dev/shm")
        base = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
        self.state = Path(tempfile.mkdtemp(prefix=f"lockstep-fleet-{n}-hosts-", dir=base))
        self._pids: list[int] = []

    def __enter__(self) -> Workspace:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for pid in self._pids:
            kill_group(pid)
        shutil.rmtree(self.state, ignore_errors=True)
        if self.keep is None:
            shutil.rmtree(self.root, ignore_errors=True)

    def track(self, pid: int) -> None:
        """A process group leader to kill at exit (it may be gone by then)."""
        self._pids.append(pid)

    def start(self, command: list[str], env: dict[str, str], log: str) -> subprocess.Popen[bytes]:
        """Start `command` in the work dir (so no source tree is on its path by accident)."""
        with (self.root / log).open("ab") as out:
            proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    cwd=self.root)  # fmt: skip
        self.track(proc.pid)
        return proc

    def profile(self, pid: int, where: Path, n: int | str) -> subprocess.Popen[bytes]:
        """Sample `pid` with py-spy (raw collapsed stacks, without pausing it) until
        `stop_profile`; the file is <where>/coordinator-<n>.txt."""
        where.mkdir(parents=True, exist_ok=True)
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        command = [spy, "record", "--pid", str(pid), "--format", "raw", "--nonblocking",
                   "--rate", "100", "-o", str(where / f"coordinator-{n}.txt")]  # fmt: skip
        return self.start(command, dict(os.environ), "py-spy.log")

    @staticmethod
    def stop_profile(proc: subprocess.Popen[bytes]) -> None:
        """SIGINT makes py-spy write what it sampled."""
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
