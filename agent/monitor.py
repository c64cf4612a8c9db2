"""The continuous health watch of running services (SPEC 6.1 step 5, "bake").

The agent's supervisor starts a watch when a service is running and stops it before
any step touches that service. Each watch probes every `interval`; `healthy_after`
consecutive passes make a service healthy, as many consecutive failures (or its
process exiting) make it unhealthy. Every transition goes to `on_change` (the agent
publishes a HealthChange); the current health is kept for heartbeats. A process that
exits while watched goes to `on_exit` (the supervisor restarts it or declares a crash
loop); a deliberate stop unwatches the service first, so it is never seen as an exit.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agent import driver, health
from agent.driver import ProcessRecord
from shared import log
from shared.errors import LockstepError
from shared.messages import Health
from shared.specs import HealthSpec
from shared.tasks import TaskGroup

OnChange = Callable[[str, Health, str], Awaitable[None]]
"""(service, new health, reason)"""
OnExit = Callable[[str, ProcessRecord, str], Awaitable[None]]
"""(service, the process that exited, how it ended)"""


@dataclass
class _Watch:
    spec: HealthSpec
    record: ProcessRecord
    cwd: Path
    env: Mapping[str, str]
    health: Health
    stopped: asyncio.Event = field(default_factory=asyncio.Event)


class Monitor:
    """Health watches of this host's running services."""

    def __init__(self, tasks: TaskGroup, on_change: OnChange, on_exit: OnExit) -> None:
        self._tasks = tasks
        self._on_change = on_change
        self._on_exit = on_exit
        self._watches: dict[str, _Watch] = {}
        self._health: dict[str, Health] = {}
        self._log = log.get("agent.monitor")

    def health(self, service: str) -> Health:
        """The last known health of `service` ("unknown" if never watched)."""
        return self._health.get(service, "unknown")

    def watching(self, service: str) -> ProcessRecord | None:
        """The process of the current watch of `service`, if it is watched."""
        watch = self._watches.get(service)
        return None if watch is None else watch.record

    def set(self, service: str, value: Health) -> None:
        """Record `value` without a watch (a step just learnt it)."""
        self._health[service] = value

    def watch(
        self,
        service: str,
        spec: HealthSpec,
        record: ProcessRecord,
        cwd: Path,
        env: Mapping[str, str],
        initial: Health,
    ) -> None:
        """Start watching `service` (replacing any earlier watch)."""
        self.unwatch(service)
        watch = _Watch(spec, record, cwd, env, initial)
        self._watches[service] = watch
        self._health[service] = initial
        self._tasks.spawn(self._run(service, watch), f"monitor:{service}")

    def unwatch(self, service: str, health_now: Health | None = None) -> None:
        """Stop watching `service`; optionally record its health from now on."""
        watch = self._watches.pop(service, None)
        if watch is not None:
            watch.stopped.set()
        if health_now is not None:
            self._health[service] = health_now

    def unwatch_all(self) -> None:
        for service in list(self._watches):
            self.unwatch(service)

    async def _run(self, service: str, watch: _Watch) -> None:
        passes = fails = 0
        while not await _stopped_within(watch.stopped, watch.spec.interval):
            if not driver.is_alive(watch.record):
                ended = driver.exit_reason(watch.record)
                self._log.warning("service.exited", service=service, reason=ended)
                await self._change(service, watch, "unhealthy", ended)
                await self._on_exit(service, watch.record, ended)
                return
            reason = await health.probe(watch.spec, watch.cwd, watch.env)
            if watch.stopped.is_set():
                return
            passes, fails = (passes + 1, 0) if reason is None else (0, fails + 1)
            if passes >= watch.spec.healthy_after and watch.health != "healthy":
                await self._change(service, watch, "healthy", "")
            elif fails >= watch.spec.healthy_after and watch.health != "unhealthy":
                await self._change(service, watch, "unhealthy", reason or "")

    async def _change(self, service: str, watch: _Watch, value: Health, reason: str) -> None:
        watch.health = value
        self._health[service] = value
        self._log.info("health.changed", service=service, health=value, reason=reason)
        try:
            await self._on_change(service, value, reason)
        except LockstepError as e:
            self._log.warning("health.report_failed", service=service, error=str(e))


async def _stopped_within(event: asyncio.Event, seconds: float) -> bool:
    """Wait up to `seconds` for `event`; whether it is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
    return event.is_set()
