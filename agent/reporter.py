"""What an agent tells the coordinator: reports (retried while the broker is away) and
heartbeats (transient, every `heartbeat_interval`, and on a coordinator's ping).

`agent.service.Agent` makes one `Reporter` and passes `report` to the supervisor (crash
loops) and the workers (step results), and `publish` to the in-doubt inquiries.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime

from shared import log, topology
from shared.config import AgentSettings
from shared.errors import TransientError
from shared.messages import Body, Heartbeat, ServiceState, make
from shared.transport import Broker

RETRY_MAX = 5.0
"""The longest pause between two attempts of a report (or of consuming the queue)."""


class Reporter:
    """One agent's reports and heartbeats to the coordinator."""

    def __init__(
        self,
        broker: Broker,
        host_id: str,
        labels: Mapping[str, str],
        public_key: str,
        settings: AgentSettings,
        states: Callable[[], Awaitable[list[ServiceState]]],
    ) -> None:
        """`states`: what runs on the host now (the supervisor's view), for heartbeats."""
        self.broker = broker
        self.host_id = host_id
        self.sender = f"agent:{host_id}"
        self.labels = labels
        self.public_key = public_key
        self.settings = settings
        self._states = states
        self._log = log.get("agent", host_id=host_id)

    async def publish(self, body: Body) -> None:
        """Publish a report to the coordinator (persistent, confirmed)."""
        await self.broker.publish(topology.REPORTS, topology.REPORTS_KEY, make(body, self.sender))

    async def report(self, body: Body) -> None:
        """Publish `body`, retrying with backoff while the broker is away."""
        delay = 0.2
        while True:
            try:
                await self.publish(body)
                return
            except TransientError as e:
                self._log.warning("report.retry", kind=body.KIND, error=str(e))
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)

    async def heartbeat(self) -> None:
        """Report what runs, stamped with when it was read: the coordinator keeps the
        newest view, so a heartbeat overtaken by a step result cannot undo it."""
        observed_at = datetime.now(UTC)
        states = await self._states()
        body = Heartbeat(host_id=self.host_id, services=states, labels=self.labels,
                         public_key=self.public_key)  # fmt: skip
        envelope = make(body, self.sender, sent_at=observed_at)
        # Transient, on a queue of its own, gone if not read within three intervals: a
        # heartbeat is news only while it is fresh, and never waits behind a vote.
        await self.broker.publish(topology.REPORTS, topology.HEARTBEAT_KEY, envelope,
                                  ttl=3 * self.settings.heartbeat_interval)  # fmt: skip

    async def heartbeats(self) -> None:
        """Send a heartbeat every `heartbeat_interval`, for ever (a background task)."""
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval)
            try:
                await self.heartbeat()
            except TransientError as e:
                self._log.warning("heartbeat.failed", error=str(e))
