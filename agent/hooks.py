"""Running a service version's hooks (SPEC 3.1 `[hooks]`) as shell commands.

The supervisor calls `run` for before_start, after_start and before_rollback: the
command runs in a release dir, in its own process group, with stdout and stderr
appended to the release's log file. It is killed (whole group) past the agent's
`hook_timeout`. The outcome carries the exit status and the tail of stderr, which
become the reason of a failed step ("before_rollback hook failed: ...").
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from shared.errors import PermanentError

TAIL_BYTES = 400
"""How much of a failed hook's stderr goes into the step's reason."""
DRAIN_GRACE = 1.0
"""How long to keep reading stderr after the hook exited (a child may hold it open)."""


class HookFailed(PermanentError):
    """A before_start/after_start/before_rollback hook exited non-zero or timed out."""


@dataclass(frozen=True)
class Outcome:
    code: int | None
    """The exit status; None when the hook ran past its timeout and was killed."""
    stderr_tail: str

    def describe(self, limit: float) -> str:
        """Why a hook with this outcome failed, for a step's reason."""
        what = f"timed out after {limit:g}s" if self.code is None else self._status()
        return f"{what}: {self.stderr_tail}" if self.stderr_tail else what

    def _status(self) -> str:
        if self.code is not None and self.code < 0:
            return f"killed by signal {-self.code}"
        return f"exited with status {self.code}"


async def run(
    command: str, cwd: Path, env: Mapping[str, str], log_file: Path, limit: float
) -> Outcome:
    """Run `command` (shell) in `cwd` for at most `limit` seconds: status and stderr tail."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as out:
        proc = await asyncio.create_subprocess_shell(
            command, cwd=cwd, env={**os.environ, **env}, stdin=asyncio.subprocess.DEVNULL,
            stdout=out, stderr=asyncio.subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        tail = bytearray()
        drain = asyncio.ensure_future(_drain(proc, out, tail))
        try:
            code = await _wait(proc, limit)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(drain), DRAIN_GRACE)
        finally:
            drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drain
    return Outcome(code, summary(bytes(tail)))


def summary(tail: bytes) -> str:
    """The last lines of `tail` on one line, at most TAIL_BYTES characters."""
    lines = tail.decode(errors="replace").splitlines()
    if len(tail) >= TAIL_BYTES and len(lines) > 1:
        lines = lines[1:]  # the first line is cut
    text = " | ".join(line.strip() for line in lines if line.strip())
    return text if len(text) <= TAIL_BYTES else "..." + text[-(TAIL_BYTES - 3) :]


async def _wait(proc: asyncio.subprocess.Process, limit: float) -> int | None:
    """The exit status of `proc`, or None after killing its group past `limit` s."""
    try:
        return await asyncio.wait_for(proc.wait(), limit)
    except (TimeoutError, asyncio.CancelledError) as e:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        if isinstance(e, asyncio.CancelledError):
            raise
        return None


async def _drain(proc: asyncio.subprocess.Process, out: BinaryIO, tail: bytearray) -> None:
    """Copy the hook's stderr into the log, keeping its last TAIL_BYTES."""
    if proc.stderr is None:
        return
    while chunk := await proc.stderr.read(4096):
        out.write(chunk)
        out.flush()
        tail.extend(chunk)
        del tail[:-TAIL_BYTES]
