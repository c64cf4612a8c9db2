"""What an agent tells the coordinator: reports (retried while the broker is away) and
heartbeats (transient, every `interval` seconds, and on a coordinator's ping).

The agent starts beating every `heartbeat_interval`; a coordinator with a large fleet
tells it a longer period (a signed Ping, `pace`), never a shorter one than the agent's
own setting. A heartbeat says the period it beats at when that is not its own setting
(the coordinator judges the host lost by it; left unsaid, a coordinator that predates
the field still reads it), and each wait is jittered, shorter by up to 20%, so a fleet
started together does not beat in step and no beat comes later than the period.

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
JITTER = 0.2
"""Each wait between two heartbeats is the period times 1 - up to this."""


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
        self._told_at: datetime | None = None
        self._log = log.get("agent", host_id=host_id)

    def pace(self, period: float, told_at: datetime) -> None:
        """Beat every `period` seconds from now on (as the coordinator said at `told_at`),
        but never more often than this agent's own `heartbeat_interval`; a Ping older
        than the last one heeded (a replay, or one overtaken) changes nothing."""
        if self._told_at is not None and told_at <= self._told_at:
            return
        self._told_at = told_at
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

    def beat(self, states: list[ServiceState]) -> Heartbeat:
        """The heartbeat saying that `states` run (and the period, unless it is the
        agent's own setting)."""
        interval = None if self.interval == self.settings.heartbeat_interval else self.interval
        return Heartbeat(host_id=self.host_id, services=states, labels=self.labels,
                         public_key=self.public_key, interval=interval)  # fmt: skip

    async def heartbeat(self) -> None:
        """Report what runs, stamped with when it was read: the coordinator keeps the
        newest view, so a heartbeat overtaken by a step result cannot undo it."""
        observed_at = datetime.now(UTC)
        envelope = make(self.beat(await self._states()), self.sender, sent_at=observed_at)
        # Transient, on a queue of its own, gone if not read within three intervals: a
        # heartbeat is news only while it is fresh, and never waits behind a vote.
        await self.broker.publish(topology.REPORTS, topology.HEARTBEAT_KEY, envelope,
                                  ttl=3 * self.interval)  # fmt: skip

    async def heartbeats(self) -> None:
        """Send a heartbeat every `interval` (jittered), for ever (a background task)."""
        while True:
            await asyncio.sleep(self.interval * random.uniform(1 - JITTER, 1))
            try:
                await self.heartbeat()
            except TransientError as e:
                self._log.warning("heartbeat.failed", error=str(e))
