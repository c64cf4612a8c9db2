"""The process driver: runs a service's `run` command detached from the agent.

The agent's supervisor calls it to start, stop and check services. A service runs in
its own session and process group (so it survives the agent, even a SIGKILL), its
output appended to a log file. A `ProcessRecord` (pid, pgid and the start time from
/proc/<pid>/stat) is what the agent stores; after an agent restart the start time
tells the same process from a reused pid. Children started by this process keep their
`Popen` in a process-wide table (reaped by polling); adopted ones are watched via /proc.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from shared.errors import PermanentError

POLL = 0.05
KILL_WAIT = 5.0
"""How long to wait for a SIGKILLed process to disappear."""

_COMPOUND = re.compile(r"[;&|()<>`$\n]")
"""Shell syntax after which `exec` would change what the command does."""
_BUILTINS = frozenset(
    [
        "exit",
        "cd",
        "export",
        "set",
        "source",
        ".",
        "eval",
        "exec",
        "if",
        "for",
        "while",
        "until",
        "case",
        "{",
        "!",
        "return",
        "trap",
        "ulimit",
        "umask",
        "wait",
        "read",
        "shift",
        "unset",
        "readonly",
        "local",
    ]
)


def _execable(command: str) -> bool:
    """Whether `exec` may replace the shell: one plain program, no shell syntax."""
    words = command.split()
    if not words or _COMPOUND.search(command):
        return False
    return words[0] not in _BUILTINS and "=" not in words[0]


_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}
"""Popen objects of services this process started: kept so they are reaped, not leaked."""
_EXITS: dict[tuple[int, int], int] = {}
"""Exit statuses of reaped children, by (pid, start time)."""


class StartError(PermanentError):
    """The run command could not be started."""


@dataclass(frozen=True)
class ProcessRecord:
    pid: int
    pgid: int
    start_time: int
    """Field 22 of /proc/<pid>/stat (clock ticks after boot)."""


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time) of `pid`, or None if there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw.rsplit(")", 1)[1].split()
    return fields[0], int(fields[19])


def start(command: str, cwd: Path, env: Mapping[str, str], log_path: Path) -> ProcessRecord:
    """Start `command` (shell) in `cwd`, detached; output appended to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if _execable(command):
        command = f"exec {command}"  # the recorded pid is the server, not a shell around it
    try:
        with log_path.open("ab") as out:
            proc = subprocess.Popen(
                command,
                shell=True,
                cwd=cwd,
                env={**os.environ, **env},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
    except OSError as e:
        raise StartError(f"cannot start {command!r}: {e}") from e
    _CHILDREN[proc.pid] = proc
    stat = _stat(proc.pid)
    return ProcessRecord(proc.pid, proc.pid, stat[1] if stat else 0)


def is_alive(record: ProcessRecord) -> bool:
    """Whether the process of `record` (the same one, not a reused pid) still runs."""
    child = _CHILDREN.get(record.pid)
    if child is not None and child.poll() is not None:
        del _CHILDREN[record.pid]
        _EXITS[(record.pid, record.start_time)] = child.returncode
        return False
    stat = _stat(record.pid)
    return stat is not None and stat[0] not in ("Z", "X") and stat[1] == record.start_time


def exit_reason(record: ProcessRecord) -> str:
    """How the process of `record` ended, as precisely as this process knows it."""
    child = _CHILDREN.get(record.pid)
    code = child.poll() if child is not None else _EXITS.get((record.pid, record.start_time))
    if code is None:
        return "the process exited"
    if code < 0:
        return f"the process was killed by signal {-code}"
    return f"the process exited with status {code}"


def _signal_group(record: ProcessRecord, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(record.pgid, sig)


def kill_leftovers(record: ProcessRecord) -> None:
    """SIGKILL what remains of the process group of `record` once its leader is gone.

    The run command is started through a shell: when that shell dies, the server it
    started may live on (holding the service's port), and must not meet its successor.
    """
    if not is_alive(record):
        _signal_group(record, signal.SIGKILL)


async def stop(record: ProcessRecord, grace: float) -> None:
    """SIGTERM the group, wait up to `grace` seconds, then SIGKILL it."""
    if not is_alive(record):
        return
    _signal_group(record, signal.SIGTERM)
    if await _gone(record, grace):
        return
    _signal_group(record, signal.SIGKILL)
    await _gone(record, KILL_WAIT)


async def _gone(record: ProcessRecord, seconds: float) -> bool:
    """Poll (there is no event for a non-child's exit) until the process is gone."""
    deadline = time.monotonic() + seconds
    for _ in itertools.count():
        if not is_alive(record):
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(POLL)
    return False  # pragma: no cover
