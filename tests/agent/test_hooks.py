"""Hooks as real shell commands: cwd, exit status, stderr tail, log file and timeout."""

from __future__ import annotations

import time
from pathlib import Path

from agent import hooks


async def test_a_hook_runs_in_its_dir_and_logs_its_output(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "1.0.0.log"
    outcome = await hooks.run("pwd > where; echo out; echo err >&2", tmp_path, {}, log, 10)
    assert outcome == hooks.Outcome(0, "err")
    assert (tmp_path / "where").read_text().strip() == str(tmp_path)
    assert sorted(log.read_text().split()) == ["err", "out"]


async def test_a_failing_hook_reports_its_status_and_the_tail_of_its_stderr(
    tmp_path: Path,
) -> None:
    command = "for i in $(seq 1 200); do echo line-$i >&2; done; echo STOP=$STOP >&2; exit 3"
    outcome = await hooks.run(command, tmp_path, {"STOP": "here"}, tmp_path / "h.log", 10)
    assert outcome.code == 3
    assert outcome.stderr_tail.endswith("line-200 | STOP=here")
    assert len(outcome.stderr_tail) <= hooks.TAIL_BYTES
    assert outcome.describe(10).startswith("exited with status 3: ")


async def test_a_hook_past_its_limit_is_killed_with_its_children(tmp_path: Path) -> None:
    started = time.monotonic()
    outcome = await hooks.run("sleep 30 & sleep 30", tmp_path, {}, tmp_path / "h.log", 0.3)
    assert outcome.code is None
    assert time.monotonic() - started < 5
    assert outcome.describe(0.3) == "timed out after 0.3s"
