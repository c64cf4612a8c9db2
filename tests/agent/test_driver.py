"""The process driver against real processes: detached start, stop, adoption."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from agent import driver
from agent.driver import ProcessRecord
from tests.agent.helpers import answered, eventually, http_get
from tests.support.artifacts import SERVICE_SOURCE, free_port
from tests.support.procs import Procs


def _release(tmp_path: Path) -> Path:
    release = tmp_path / "release"
    release.mkdir()
    shutil.copy(SERVICE_SOURCE, release / "server.py")
    (release / "VERSION").write_text("3.1.4\n")
    return release


async def test_start_detached_and_stop(tmp_path: Path, procs: Procs) -> None:
    port = free_port()
    release = _release(tmp_path)
    log = tmp_path / "logs" / "3.1.4.log"
    record = driver.start(f"{sys.executable} server.py", release, {"PORT": str(port)}, log)
    assert record.pgid == record.pid  # its own process group and session
    assert record.start_time > 0
    assert await answered(port, "/version") == "3.1.4"
    assert driver.is_alive(record)
    await driver.stop(record, grace=5)
    assert not driver.is_alive(record)
    assert "exited" in driver.exit_reason(record) or "signal" in driver.exit_reason(record)
    assert "serving version 3.1.4" in log.read_text()


async def test_exit_is_seen_with_its_status(tmp_path: Path, procs: Procs) -> None:
    record = driver.start("exit 3", tmp_path, {}, tmp_path / "x.log")
    await eventually(lambda: not driver.is_alive(record), "the process to exit")
    assert driver.exit_reason(record) == "the process exited with status 3"


_AGENT = """
import json, os, signal, sys
from pathlib import Path
from agent import driver
release, port = Path(sys.argv[1]), sys.argv[2]
record = driver.start(f"{sys.executable} server.py", release, {"PORT": port}, release / "log")
print(json.dumps(record.__dict__), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


async def test_service_survives_agent_sigkill_and_is_adopted(tmp_path: Path, procs: Procs) -> None:
    port = free_port()
    release = _release(tmp_path)
    agent = subprocess.run(
        [sys.executable, "-c", _AGENT, str(release), str(port)],
        capture_output=True, text=True, timeout=30, cwd=Path(__file__).parents[2],
    )  # fmt: skip
    assert agent.returncode == -9
    record = ProcessRecord(**json.loads(agent.stdout))
    assert await answered(port, "/version") == "3.1.4"
    assert driver.is_alive(record)  # seen through /proc: this process never started it
    assert not driver.is_alive(replace(record, start_time=record.start_time + 1))  # reused pid
    await driver.stop(record, grace=5)
    assert not driver.is_alive(record)
    assert await http_get(port, "/version") == (0, "")
