"""What an agent tells the coordinator: reports (retried while the broker is away) and
heartbeats (transient, every `interval` seconds, and on a coordinator's ping).

The agent starts beating every `heartbeat_interval`; a coordinator with a large fleet
tells it a longer period (a signed Ping, `pace`), never a shorter one than the agent's
own setting. Every heartbeat says the period it beats at, by which the coordinator
judges the host lost, and each wait is jittered (+-10%) so a fleet started together
does not beat in step.

`agent.service.Agent` makes one `Reporter` and passes `report` to the supervisor (crash
loops) and the workers (step results), and `publish` to the in-doubt inquiries.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime

from shared import log, topology
from shared.config import AgentSettings
from shared.errors import TransientError
from shared.messages import Body, Heartbeat, ServiceState, make
from shared.transport import Broker

RETRY_MAX = 5.0
"""The longest pause between two attempts of a report (or of consuming the queue)."""
JITTER = 0.1
"""Each wait between two heartbeats is the period times 1 +- this."""


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
        self.interval = settings.heartbeat_interval
        """The period this agent beats at now (seconds)."""
        self._log = log.get("agent", host_id=host_id)

    def pace(self, period: float) -> None:
        """Beat every `period` seconds from now on (as the coordinator said), but never
        more often than this agent's own `heartbeat_interval`."""
        interval = max(period, self.settings.heartbeat_interval)
        if interval != self.interval:
            self._log.info("heartbeat.period", period=interval, before=self.interval)
            self.interval = interval

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
                         public_key=self.public_key, interval=self.interval)  # fmt: skip
        envelope = make(body, self.sender, sent_at=observed_at)
        # Transient, on a queue of its own, gone if not read within three intervals: a
        # heartbeat is news only while it is fresh, and never waits behind a vote.
        await self.broker.publish(topology.REPORTS, topology.HEARTBEAT_KEY, envelope,
                                  ttl=3 * self.interval)  # fmt: skip

    async def heartbeats(self) -> None:
        """Send a heartbeat every `interval` (jittered), for ever (a background task)."""
        while True:
            await asyncio.sleep(self.interval * random.uniform(1 - JITTER, 1 + JITTER))
            try:
                await self.heartbeat()
            except TransientError as e:
                self._log.warning("heartbeat.failed", error=str(e))
