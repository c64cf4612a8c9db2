"""Tier (b): the agent's file work runs beside its event loop, not on it (issue 9).

Real `Steps` over a real store and release dirs under tmp_path; no broker (the steps
are called directly, as the per-service worker calls them). A ticker on the event loop
measures the longest gap between its ticks while a step removes a large staged
release: had the removal run on the loop, that gap would span the whole removal.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from agent.monitor import Monitor
from agent.releases import Releases
from agent.steps import Steps, _to_the_end
from agent.store import Store
from agent.supervisor import Supervisor
from shared.config import AgentSettings
from shared.messages import Abort, CrashLoop
from shared.tasks import TaskGroup

FILES = 20_000
"""Names in the staged release: removing them takes far longer than a tick."""
TICK = 0.001


async def _nothing(*_: object) -> None:
    return None


async def _no_crash_loop(_: CrashLoop) -> None:
    return None


@pytest.fixture
async def steps(tmp_path: Path) -> AsyncIterator[Steps]:
    store = await Store.open(tmp_path / "agent.db")
    tasks = TaskGroup("test.file_work")
    monitor = Monitor(tasks, _nothing, _nothing)
    settings = AgentSettings()
    supervisor = Supervisor(
        "h1", {}, Releases(tmp_path / "state"), store, monitor, settings, _no_crash_loop
    )
    yield Steps(supervisor, settings)
    await tasks.close()
    await store.close()


def _tree(root: Path, files: int) -> None:
    """`files` names in dirs of 100 under `root`: hard links to one file, as quick to
    make as names get (removing a name costs what it costs for any small file)."""
    root.mkdir(parents=True)
    first = root / "first.txt"
    first.write_bytes(b"x")
    for d in range(files // 100):
        sub = root / f"d{d}"
        sub.mkdir()
        for f in range(100):
            os.link(first, sub / f"f{f}.txt")


class Ticker:
    """Ticks on the event loop every `TICK`; `worst` is the longest gap between ticks."""

    def __init__(self) -> None:
        self.worst = 0.0
        self.ticks = 0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(TICK)
            now = loop.time()
            self.worst = max(self.worst, now - last)
            self.ticks += 1
            last = now


@asynccontextmanager
async def ticking() -> AsyncIterator[Ticker]:
    ticker = Ticker()
    task = asyncio.create_task(ticker.run(), name="ticker")
    try:
        await asyncio.sleep(TICK)  # the first tick: the ticker runs before the work starts
        yield ticker
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_abort_removes_a_large_staged_release_while_the_loop_keeps_ticking(
    steps: Steps,
) -> None:
    staged = steps.releases.staging_dir("web", "d1")
    await asyncio.to_thread(_tree, staged, FILES)
    loop = asyncio.get_running_loop()
    async with ticking() as ticker:
        started = loop.time()
        result = await steps.abort(Abort(deployment_id="d1", service="web"))
        took = loop.time() - started
    assert result.ok
    assert not staged.exists()
    assert ticker.worst < 0.2, f"the loop stalled {ticker.worst:.3f}s (the abort took {took:.3f}s)"
    # On the loop, the removal would be one gap as long as itself: a gap well under the
    # step's own time shows the loop ran during it, however fast this disk is.
    assert ticker.worst < took / 2, f"longest gap {ticker.worst:.3f}s of {took:.3f}s"


async def test_work_run_to_the_end_outlives_a_cancel_then_the_cancel_goes_through() -> None:
    """A switch of `current` and its record are done together, even by a stopping agent."""
    gate = asyncio.Event()
    done: list[str] = []

    async def switch_and_record() -> int:
        await gate.wait()
        done.append("recorded")
        return 7

    step = asyncio.create_task(_to_the_end(switch_and_record()), name="step")
    await asyncio.sleep(0)
    step.cancel()
    await asyncio.sleep(0.01)
    assert not step.done()  # the cancel waits for the work
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await step
    assert done == ["recorded"]


async def test_work_run_to_the_end_returns_its_result_when_not_cancelled() -> None:
    async def work() -> int:
        await asyncio.sleep(0)
        return 7

    assert await _to_the_end(work()) == 7
