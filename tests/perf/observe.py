"""What the fleet benchmark watches while it runs: lockstep's events and the
coordinator queue's depth.

`Events` keeps every `deployment.*` and `agent.*` event with the time it arrived (a
queue of the harness's own, bound to lockstep.events, consumed through the real
transport), so a deploy's latency is taken from the moment its terminal event arrived.
`Backlog` samples the ready messages of `lockstep.coordinator` twice a second (a
passive declare), so the table can say how far the coordinator fell behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aio_pika.abc import AbstractConnection

from shared import topology
from shared.messages import Event
from shared.transport import Broker, Delivery

TERMINAL = ("completed", "aborted", "rolled_back", "failed")


@dataclass(frozen=True)
class Seen:
    at: float
    """time.monotonic() when the harness received it."""
    type: str
    data: dict[str, Any]

    @property
    def deployment_id(self) -> str:
        return str(self.data.get("deployment_id", ""))

    @property
    def terminal(self) -> bool:
        return self.type.startswith("deployment.") and self.data.get("state") in TERMINAL


class Events:
    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self._changed = asyncio.Event()

    async def subscribe(self, broker: Broker) -> None:
        await broker.subscribe(topology.EVENTS, ["deployment.*", "agent.*"], self._on_event)

    async def _on_event(self, delivery: Delivery) -> None:
        body = delivery.envelope.body
        if isinstance(body, Event):
            self.seen.append(Seen(time.monotonic(), body.type, body.data))
            self._changed.set()

    async def wait(self, match: Callable[[Seen], bool], timeout: float) -> Seen | None:
        """The first event `match` accepts, waiting up to `timeout` s; None if none came."""
        deadline = time.monotonic() + timeout
        checked = 0
        while True:
            for seen in self.seen[checked:]:
                if match(seen):
                    return seen
            checked = len(self.seen)
            self._changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    def count(self, type_: str, since: float) -> int:
        return sum(1 for s in self.seen if s.type == type_ and s.at >= since)


class Backlog:
    def __init__(self, connection: AbstractConnection) -> None:
        self.connection = connection
        self.samples: list[tuple[float, int]] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._channel = await self.connection.channel()
        self._task = asyncio.create_task(self._run(), name="backlog")

    async def _run(self) -> None:
        while True:
            try:
                queue = await self._channel.declare_queue(topology.COORDINATOR_QUEUE, passive=True)
                count = queue.declaration_result.message_count or 0
                self.samples.append((time.monotonic(), int(count)))
            except Exception:  # a sample lost is no reason to stop sampling
                self._channel = await self.connection.channel()
            await asyncio.sleep(0.5)  # the sampling period

    def latest(self) -> int:
        return self.samples[-1][1] if self.samples else 0

    def peak(self, since: float, until: float | None = None) -> int:
        end = until if until is not None else time.monotonic()
        return max((c for t, c in self.samples if since <= t <= end), default=0)

    async def settled(self, below: int, timeout: float) -> bool:
        """Wait until the queue holds at most `below` ready messages."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (
                self.samples
                and self.samples[-1][0] > time.monotonic() - 1
                and self.latest() <= below
            ):
                return True
            await asyncio.sleep(0.25)  # the next sample
        return False

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await self._channel.close()
