"""What runs on this host: start, stop, adopt, health-watch and restart services, run hooks.

The agent's steps call it to (re)start a service from a release dir and wait for it
to be healthy; the agent service calls `adopt` at start-up (SPEC 6.6: a live service
recorded in the store is adopted, not restarted; a dead one is started again from its
recorded release). Every start is recorded in the store before its health is known,
so a crash mid-step never loses track of a process.

Crash supervision (SPEC 6.2): the monitor calls `exited` when a watched process ends.
Steps that stop or switch a service hold `lock(name)` and unwatch it before stopping
it, so only unexpected exits arrive there. The service is restarted from its current
release after a short backoff; `crash_loop_exits` exits within `crash_loop_window`
make a crash loop: reported once through `on_crash_loop`, recorded in the store, and
the service is left down and unhealthy until a step deploys or reverts it.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from agent import driver, health, hooks, interpolate
from agent.driver import ProcessRecord
from agent.exits import ExitHistory, backoff
from agent.hooks import HookFailed
from agent.monitor import Monitor
from agent.releases import Releases
from agent.store import ServiceRow, Store
from shared import log
from shared.config import AgentSettings
from shared.errors import LockstepError, PermanentError
from shared.messages import CrashLoop, Health, ServiceState
from shared.specs import HealthSpec, ServiceVersion

__all__ = ["HealthWait", "HookFailed", "ProcessDriver", "Supervisor"]

OnCrashLoop = Callable[[CrashLoop], Awaitable[None]]
HealthWait = Callable[
    [HealthSpec, Callable[[], str | None], Path | None, Mapping[str, str] | None], Awaitable[None]
]
"""How a started service is awaited until healthy: `agent.health.wait_healthy` by default."""


class ProcessDriver(Protocol):
    """What runs a service's process: the module `agent.driver` by default. The fleet
    benchmark (tests/perf/perfdriver.py) passes one that starts nothing."""

    def start(
        self, command: str, cwd: Path, env: Mapping[str, str], log_path: Path
    ) -> ProcessRecord: ...

    def is_alive(self, record: ProcessRecord) -> bool: ...

    def exit_reason(self, record: ProcessRecord) -> str: ...

    def kill_leftovers(self, record: ProcessRecord) -> None: ...

    async def stop(self, record: ProcessRecord, grace: float) -> None: ...


class Supervisor:
    """The services of one host and their processes."""

    def __init__(
        self,
        host_id: str,
        labels: Mapping[str, str],
        releases: Releases,
        store: Store,
        monitor: Monitor,
        settings: AgentSettings,
        on_crash_loop: OnCrashLoop,
        process_driver: ProcessDriver = driver,
        health_wait: HealthWait = health.wait_healthy,
    ) -> None:
        self.host_id = host_id
        self.labels = dict(labels)
        self.releases = releases
        self.store = store
        self.monitor = monitor
        self.settings = settings
        self.exits = ExitHistory(settings.crash_loop_exits, settings.crash_loop_window)
        self._on_crash_loop = on_crash_loop
        self._driver = process_driver
        self._health_wait = health_wait
        self._locks: dict[str, asyncio.Lock] = {}
        self._log = log.get("agent.supervisor", host_id=host_id)

    def lock(self, name: str) -> asyncio.Lock:
        """Held by whatever stops, switches or restarts `name` (steps, crash handling)."""
        return self._locks.setdefault(name, asyncio.Lock())

    def render(self, spec: ServiceVersion) -> ServiceVersion:
        """`spec` with its variables expanded for this host and its release dir."""
        release_dir = self.releases.release_dir(spec.name, spec.version)  # absolute
        values = interpolate.variables(
            self.host_id, self.labels, spec.name, spec.version, release_dir
        )
        return interpolate.render(spec, values)

    async def start(self, spec: ServiceVersion) -> ProcessRecord:
        """Start `spec` from releases/<version> and record it as starting."""
        rendered = self.render(spec)
        release_dir = self.releases.release_dir(spec.name, spec.version)
        log_file = self.releases.log_file(spec.name, spec.version)
        record = self._driver.start(rendered.run, release_dir, rendered.env, log_file)
        row = ServiceRow(spec.name, spec.version, spec, record, str(release_dir), "starting")
        await self.store.put_service(row)
        self.monitor.set(spec.name, "starting")
        self._log.info("service.started", service=spec.name, version=spec.version, pid=record.pid)
        return record

    async def wait_healthy(self, spec: ServiceVersion, record: ProcessRecord) -> None:
        """Wait for the started `spec` to be healthy, then watch it; else `HealthFailed`."""
        rendered = self.render(spec)
        release_dir = self.releases.release_dir(spec.name, spec.version)

        def exited() -> str | None:
            return None if self._driver.is_alive(record) else self._driver.exit_reason(record)

        try:
            await self._health_wait(rendered.health, exited, release_dir, rendered.env)
        except health.HealthFailed:
            await self.store.set_health(spec.name, "unhealthy")
            self.monitor.set(spec.name, "unhealthy")
            raise
        await self.store.set_health(spec.name, "healthy")
        self.monitor.watch(spec.name, rendered.health, record, release_dir, rendered.env, "healthy")

    async def stop(self, name: str) -> None:
        """Stop the recorded process of `name` on purpose, if any (the row stays).

        Unwatched first, so the exit is not taken for a crash; a deliberate stop also
        ends any crash loop of the service and clears its exit history.
        """
        self.monitor.unwatch(name, "stopped")
        self.exits.clear(name)
        await self.store.clear_crash_loop(name)
        row = await self.store.service(name)
        if row is not None and row.process is not None:
            await self._driver.stop(row.process, self.settings.stop_grace)
            self._log.info("service.stopped", service=name, version=row.version)

    async def run_hook(self, spec: ServiceVersion, hook: str) -> None:
        """Run hook `hook` of `spec` in its release dir (nothing if unset)."""
        if not getattr(spec.hooks, hook):
            return
        rendered = self.render(spec)
        command = getattr(rendered.hooks, hook)
        release_dir = self.releases.release_dir(spec.name, spec.version)
        log_file = self.releases.log_file(spec.name, spec.version)
        timeout = self.settings.hook_timeout
        try:
            outcome = await hooks.run(command, release_dir, rendered.env, log_file, timeout)
            reason = "" if outcome.code == 0 else outcome.describe(timeout)
        except OSError as e:
            reason = f"cannot run it in {release_dir}: {e.strerror or e}"
        if reason:
            self._log.warning("hook.failed", service=spec.name, version=spec.version,
                              hook=hook, reason=reason)  # fmt: skip
            raise HookFailed(f"{hook} hook failed: {reason}")
        self._log.info("hook.done", service=spec.name, version=spec.version, hook=hook)

    async def adopt(self) -> None:
        """Adopt every recorded service that still runs; start the dead ones again.

        A service left down after a crash loop stays down (and unhealthy), and so does
        one whose `current` was switched away by a step that the agent's death cut short:
        that step is resumed and starts the version it switched to (I5).
        """
        for row in await self.store.services():
            switch = await self.store.switching(row.service)
            if switch is not None and switch.to_version != row.version:
                self._log.info("service.switch_pending", service=row.service,
                               version=row.version, switching_to=switch.to_version)  # fmt: skip
                continue
            if await self.store.crash_looped(row.service) == row.version:
                self.monitor.set(row.service, "unhealthy")
                self._log.warning("service.crash_loop_kept", service=row.service,
                                  version=row.version)  # fmt: skip
                continue
            if row.process is not None and self._driver.is_alive(row.process):
                rendered = self.render(row.spec)
                initial: Health = "healthy" if row.health == "healthy" else "starting"
                self.monitor.watch(
                    row.service, rendered.health, row.process, Path(row.release_dir),
                    rendered.env, initial,
                )  # fmt: skip
                self._log.info("service.adopted", service=row.service, pid=row.process.pid)
                continue
            await self.restart(row)

    async def restart(self, row: ServiceRow) -> bool:
        """Start `row`'s service again from its recorded release and watch it."""
        if not await asyncio.to_thread(_is_dir, row.release_dir):
            self._log.error("service.release_missing", service=row.service, version=row.version)
            return False
        try:
            record = await self.start(row.spec)
        except PermanentError as e:
            self._log.error("service.restart_failed", service=row.service, error=str(e))
            return False
        rendered = self.render(row.spec)
        self.monitor.watch(
            row.service, rendered.health, record, Path(row.release_dir), rendered.env, "starting"
        )
        self._log.info("service.restarted", service=row.service, pid=record.pid)
        return True

    # --- crash supervision ---------------------------------------------------------

    async def exited(self, name: str, record: ProcessRecord, reason: str) -> None:
        """The watched process of `name` exited unexpectedly: restart it, or give up."""
        if self.monitor.watching(name) != record:
            return  # a step took the service over
        exits = self.exits.record(name, time.monotonic())
        logger = self._log.bind(service=name, pid=record.pid)
        if not self.exits.is_loop(exits):
            delay = backoff(exits)
            logger.warning("service.crashed", reason=reason, exits=exits, restart_in=delay)
            await asyncio.sleep(delay)
        report = None
        async with self.lock(name):
            row = await self.store.service(name)
            if self.monitor.watching(name) != record or row is None or row.process != record:
                return  # stopped or switched on purpose meanwhile
            self._driver.kill_leftovers(record)  # soon after the exit, its pgid is still its own
            if self.exits.is_loop(exits):
                report = await self._crash_loop(row, exits, reason)
            elif not await self.restart(row):
                self.monitor.unwatch(name, "unhealthy")
        if report is not None:  # outside the lock: a broker outage must not block reverts
            try:
                await self._on_crash_loop(report)
            except LockstepError as e:
                self._log.warning("crash_loop.report_failed", service=name, error=str(e))

    async def _crash_loop(self, row: ServiceRow, exits: int, reason: str) -> CrashLoop:
        window = self.settings.crash_loop_window
        self.monitor.unwatch(row.service, "unhealthy")
        await self.store.set_crash_loop(row.service, row.version, exits)
        await self.store.put_service(replace(row, process=None, health="unhealthy"))
        self._log.error("service.crash_loop", service=row.service, version=row.version,
                        exits=exits, window=window, reason=reason)  # fmt: skip
        return CrashLoop(host_id=self.host_id, service=row.service, version=row.version,
                         exits=exits, window=window)  # fmt: skip

    async def states(self) -> list[ServiceState]:
        """What runs here, for AgentHello and heartbeats."""
        states = []
        for row in await self.store.services():
            known = self.monitor.health(row.service)
            states.append(
                ServiceState(
                    service=row.service,
                    version=row.version,
                    health=row.health if known == "unknown" else known,
                    pid=row.process.pid if row.process else None,
                )
            )
        return states


def _is_dir(path: str) -> bool:
    return os.path.isdir(path)
