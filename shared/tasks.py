"""The one way lockstep starts background tasks: named, kept, and never silent.

A task started with `TaskGroup.spawn` is held until it ends; if it raises, or ends
while it was meant to run forever, the failure is logged. `close` cancels and awaits
them all, so a process that stops leaves no task behind.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any

from shared import log


class TaskGroup:
    """Background tasks of one component."""

    def __init__(self, owner: str) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._log = log.get(owner)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str, *, forever: bool = False) -> None:
        """Run `coro` in the background; log its failure (or its end, if `forever`)."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._done(t, forever))

    def _done(self, task: asyncio.Task[Any], forever: bool) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            self._log.error("task.failed", task=task.get_name(), error=repr(error), exc_info=error)
        elif forever:
            self._log.error("task.ended", task=task.get_name())

    def __len__(self) -> int:
        return len(self._tasks)

    async def close(self) -> None:
        """Cancel every task and wait for them to end."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
