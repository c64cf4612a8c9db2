"""What runs on this host: start, stop, adopt and health-watch services, run hooks.

The agent's steps call it to (re)start a service from a release dir and wait for it
to be healthy; the agent service calls `adopt` at start-up (SPEC 6.6: a live service
recorded in the store is adopted, not restarted; a dead one is started again from its
recorded release). Every start is recorded in the store before its health is known,
so a crash mid-step never loses track of a process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping
from pathlib import Path

from agent import driver, health, interpolate
from agent.driver import ProcessRecord
from agent.monitor import Monitor
from agent.releases import Releases
from agent.store import ServiceRow, Store
from shared import log
from shared.config import AgentSettings
from shared.errors import PermanentError
from shared.messages import Health, ServiceState
from shared.specs import ServiceVersion

HOOK_TIMEOUT = 300.0
"""Longest a hook (e.g. a migration) may run before it counts as failed."""


class HookFailed(PermanentError):
    """A before_start/after_start/before_rollback hook exited non-zero or timed out."""


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
    ) -> None:
        self.host_id = host_id
        self.labels = dict(labels)
        self.releases = releases
        self.store = store
        self.monitor = monitor
        self.settings = settings
        self._log = log.get("agent.supervisor", host_id=host_id)

    def render(self, spec: ServiceVersion) -> ServiceVersion:
        """`spec` with its variables expanded for this host and its release dir."""
        release_dir = self.releases.release_dir(spec.name, spec.version)
        values = interpolate.variables(
            self.host_id, self.labels, spec.name, spec.version, release_dir.resolve()
        )
        return interpolate.render(spec, values)

    async def start(self, spec: ServiceVersion) -> ProcessRecord:
        """Start `spec` from releases/<version> and record it as starting."""
        rendered = self.render(spec)
        release_dir = self.releases.release_dir(spec.name, spec.version)
        log_file = self.releases.log_file(spec.name, spec.version)
        record = driver.start(rendered.run, release_dir, rendered.env, log_file)
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
            return None if driver.is_alive(record) else driver.exit_reason(record)

        try:
            await health.wait_healthy(rendered.health, exited, release_dir, rendered.env)
        except health.HealthFailed:
            await self.store.set_health(spec.name, "unhealthy")
            self.monitor.set(spec.name, "unhealthy")
            raise
        await self.store.set_health(spec.name, "healthy")
        self.monitor.watch(spec.name, rendered.health, record, release_dir, rendered.env, "healthy")

    async def stop(self, name: str) -> None:
        """Stop the recorded process of `name`, if any (the row stays)."""
        self.monitor.unwatch(name, "stopped")
        row = await self.store.service(name)
        if row is not None and row.process is not None:
            await driver.stop(row.process, self.settings.stop_grace)
            self._log.info("service.stopped", service=name, version=row.version)

    async def run_hook(self, spec: ServiceVersion, hook: str) -> None:
        """Run hook `hook` of `spec` in its release dir (nothing if unset)."""
        rendered = self.render(spec)
        command = getattr(rendered.hooks, hook)
        if not command:
            return
        release_dir = self.releases.release_dir(spec.name, spec.version)
        log_file = self.releases.log_file(spec.name, spec.version)
        code = await _shell(command, release_dir, rendered.env, log_file)
        if code != 0:
            reason = "timed out" if code is None else f"exited with status {code}"
            self._log.warning("hook.failed", service=spec.name, hook=hook, reason=reason)
            raise HookFailed(f"{hook} hook {reason}")
        self._log.info("hook.done", service=spec.name, hook=hook)

    async def adopt(self) -> None:
        """Adopt every recorded service that still runs; start the dead ones again."""
        for row in await self.store.services():
            if row.process is not None and driver.is_alive(row.process):
                rendered = self.render(row.spec)
                initial: Health = "healthy" if row.health == "healthy" else "starting"
                self.monitor.watch(
                    row.service, rendered.health, row.process, Path(row.release_dir),
                    rendered.env, initial,
                )  # fmt: skip
                self._log.info("service.adopted", service=row.service, pid=row.process.pid)
                continue
            await self._restart(row)

    async def _restart(self, row: ServiceRow) -> None:
        if not _is_dir(row.release_dir):
            self._log.error("service.release_missing", service=row.service, version=row.version)
            return
        try:
            record = await self.start(row.spec)
        except PermanentError as e:
            self._log.error("service.restart_failed", service=row.service, error=str(e))
            return
        rendered = self.render(row.spec)
        self.monitor.watch(
            row.service, rendered.health, record, Path(row.release_dir), rendered.env, "starting"
        )
        self._log.info("service.restarted", service=row.service, pid=record.pid)

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


async def _shell(command: str, cwd: Path, env: Mapping[str, str], log_file: Path) -> int | None:
    """Exit status of `command` run in `cwd`, or None if it ran past HOOK_TIMEOUT."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as out:
        proc = await asyncio.create_subprocess_shell(
            command, cwd=cwd, env={**os.environ, **env}, stdin=asyncio.subprocess.DEVNULL,
            stdout=out, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        return await asyncio.wait_for(proc.wait(), HOOK_TIMEOUT)
    except (TimeoutError, asyncio.CancelledError) as e:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        if isinstance(e, asyncio.CancelledError):
            raise
        return None
