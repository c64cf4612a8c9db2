"""The coordinator's watch over the fleet: liveness and convergence.

A loop started by the coordinator sweeps every heartbeat interval. It marks agents
`lost` after `lost_after_missed` missed heartbeats and `alive` again when they report
(publishing `agent.lost` / `agent.returned`), and it converges hosts: a live host that
runs something other than the current release for its labels gets a single-host
deployment through the same prepare/commit path. A host running a version lockstep
never deployed is reported (`agent.drift`), not overwritten, until an operator says
`lockstep agents converge HOST`. A drift must be seen on two sweeps in a row, after
the fleet has been quiet for two heartbeats, so reports still in flight after a
deployment never start a needless one.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from coordinator import convergence, views
from coordinator.intake import Intake, Request
from coordinator.liveness import Liveness
from coordinator.records import AgentRecord
from coordinator.store import Store
from shared import log
from shared.config import CoordinatorSettings
from shared.errors import UserError

Emit = Callable[[str | None, str, dict[str, Any]], Awaitable[None]]
RETRY_AFTER = 15.0
"""Seconds before convergence of a host is tried again after an attempt."""


class Watch:
    def __init__(
        self, store: Store, liveness: Liveness, settings: CoordinatorSettings, intake: Intake,
        emit: Emit,
    ) -> None:  # fmt: skip
        self.store = store
        self.liveness = liveness
        self.settings = settings
        self.intake = intake
        self._emit = emit
        self._seen: dict[str, dict[str, str]] = {}
        self._retry_at: dict[str, float] = {}
        self._reported: set[tuple[str, str, str]] = set()
        self._log = log.get("watch")

    @property
    def lost_after(self) -> float:
        return self.settings.heartbeat_interval * self.settings.lost_after_missed

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval)
            try:
                await self.sweep()
            except Exception:  # one bad sweep must not end the watch
                self._log.exception("watch.sweep_failed")

    async def sweep(self) -> None:
        now = time.time()
        await self.liveness.flush()
        agents = await self.liveness.agents()
        for agent in agents:
            await self._liveness(agent, now)
        release_id, release = await self.store.current_release()
        in_flight = await self.store.in_flight()
        quiet = now - await self.store.last_ended() > 2 * self.settings.heartbeat_interval
        if release_id is None or in_flight or not quiet:
            self._seen.clear()
            return
        catalog = await self.store.catalog()
        deployed = await self.store.deployed_pairs()
        for agent in agents:
            if views.alive(agent.last_seen, now, self.lost_after):
                await self._converge(agent, release, catalog, deployed, now)

    async def _liveness(self, agent: AgentRecord, now: float) -> None:
        alive = views.alive(agent.last_seen, now, self.lost_after)
        if alive == (agent.state == "alive"):
            return
        state, event = ("alive", "agent.returned") if alive else ("lost", "agent.lost")
        await self.store.set_agent(agent.host_id, state=state)
        self._log.info(event, host_id=agent.host_id)
        await self._emit(None, event, {"host_id": agent.host_id, "last_seen": agent.last_seen})

    async def _converge(
        self, agent: AgentRecord, release: dict[str, str], catalog: Any,
        deployed: set[tuple[str, str]], now: float,
    ) -> None:  # fmt: skip
        host = agent.host_id
        want = convergence.desired(agent.labels, release, catalog)
        drift = convergence.drift(want, agent.running(), deployed, agent.overwrite)
        for name, version in drift.unknown.items():
            if (host, name, version) not in self._reported:
                self._reported.add((host, name, version))
                await self._emit(None, "agent.drift", {
                    "host_id": host, "service": name, "runs": version, "release": want[name],
                    "why": "lockstep never deployed this version; `lockstep agents converge` "
                           "replaces it"})  # fmt: skip
        previous, self._seen[host] = self._seen.get(host), drift.fix
        if not drift.fix or previous != drift.fix or now < self._retry_at.get(host, 0.0):
            return
        self._retry_at[host] = now + RETRY_AFTER
        reason = f"converge {host} to the current release"
        request = Request(services=drift.fix, kind="converge", trigger="converge", host=host,
                          reason=reason, queue=False)  # fmt: skip
        try:
            await self.intake.submit(uuid.uuid4().hex, request)
        except UserError as e:
            self._log.info("converge.skipped", host_id=host, reason=str(e))
            return
        if agent.overwrite:
            await self.store.set_agent(host, overwrite=False)
