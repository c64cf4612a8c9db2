"""The coordinator's watch over the fleet: liveness and convergence.

A loop started by the coordinator sweeps every heartbeat interval. It marks agents
`lost` after `lost_after_missed` missed heartbeats of the period each beats at, and
`alive` again when they report (publishing `agent.lost` / `agent.returned`), judged at
`Liveness.now()` so that a coordinator behind on its heartbeats never takes its
backlog for silent hosts; and it sizes the period the fleet should beat at from the
number alive (`Liveness.size`, `coordinator.pace`). It
converges hosts: the live hosts that run something other than the current release for
their labels are gathered by the change they need (`convergence.groups`), and each
group gets ONE deployment through the same prepare/commit path, in batches, beside any
unrelated deployment in flight (a group whose services are locked waits for a later
sweep). A host running a version lockstep never deployed is reported (`agent.drift`),
not overwritten, until an operator says `lockstep agents converge HOST`. A drift must
be seen on two sweeps in a row, after the fleet has been quiet for two heartbeats, so
reports still in flight after a deployment never start a needless one; except on a
host that came up (said hello) and still runs what it said then, whose hello is the
truth of what it runs (`Liveness.came_up`): it is converged at the first sweep that
sees it, quiet fleet or not. Hellos (and a deployment's end) bring the next sweep
forward, to once no host said hello for `SETTLE` seconds, so a rack coming back
together is converged together, in one deployment, at once. A stalled sweep does not
size the fleet's heartbeat period: its silent fleet is not a smaller one.
"""

from __future__ import annotations

import asyncio
import contextlib
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
Tell = Callable[[list[str], float], None]
RETRY_AFTER = 15.0
"""Seconds before the same convergence of a host is tried again after an attempt (a
host that needs another change since, say one back after a later release, need not
wait)."""
SETTLE = 0.5
"""After a hello, the next sweep comes once no other host said hello for this long."""


class Watch:
    def __init__(
        self, store: Store, liveness: Liveness, settings: CoordinatorSettings, intake: Intake,
        emit: Emit, tell: Tell,
    ) -> None:  # fmt: skip
        """`tell`: tells hosts the heartbeat period (coordinator.reactions)."""
        self._tell = tell
        self.store = store
        self.liveness = liveness
        self.settings = settings
        self.intake = intake
        self._emit = emit
        self._seen: dict[str, dict[str, str]] = {}
        self._tried: dict[str, tuple[dict[str, str], float]] = {}
        """Host -> (the change last tried on it, when it may be tried again)."""
        self._reported: set[tuple[str, str, str]] = set()
        self._last_sweep = time.time()
        self._log = log.get("watch")

    async def run(self) -> None:
        while True:
            await self._next_sweep()
            try:
                await self.sweep()
            except Exception:  # one bad sweep must not end the watch
                self._log.exception("watch.sweep_failed")

    async def _next_sweep(self) -> None:
        """Wait a heartbeat interval, or less: until hosts said hello (or a deployment
        ended) and then none did for SETTLE seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.heartbeat_interval
        hello = self.liveness.woken
        while await _within(hello, deadline - loop.time()):
            hello.clear()
            settled = min(deadline, loop.time() + SETTLE)
            if not await _within(hello, settled - loop.time()):
                return

    async def sweep(self) -> None:
        now = time.time()
        # A sweep long overdue means this process was stalled (paused, swapped, starved):
        # the silence it sees is its own, so nobody is declared lost on this sweep.
        stalled = now - self._last_sweep > 2 * self.settings.heartbeat_interval
        self._last_sweep = now
        await self.liveness.flush()
        judged = self.liveness.now()
        agents = await self.liveness.agents()
        alive = [a for a in agents if await self._liveness(a, judged, may_lose=not stalled)]
        if not stalled:  # a stalled sweep's silent fleet is not a smaller fleet
            self._pace(alive)
        release_id, release = await self.store.current_release()
        last_ended = await self.store.last_ended()
        quiet = now - last_ended > 2 * self.settings.heartbeat_interval
        hellos = self.liveness.came_up(agents)
        if not quiet:
            self._seen = {h: fix for h, fix in self._seen.items() if h in hellos}
        if release_id is None or not (quiet or hellos):
            self._seen.clear()
            return
        catalog = await self.store.catalog()
        deployed = await self.store.deployed_pairs()
        live = [a for a in agents if views.host_alive(a, judged, self.settings.lost_after_for)
                and (quiet or a.host_id in hellos)]  # fmt: skip
        fixes = {a.host_id: await self._drift(a, release, catalog, deployed, a.host_id in hellos)
                 for a in live}  # fmt: skip
        self.liveness.settled(h for h, fix in fixes.items() if not fix and h in hellos)
        due = {h: fix for h, fix in fixes.items() if fix and self._may_try(h, fix, now)}
        running = {a.host_id: dict(a.running()) for a in live}
        overwrite = {a.host_id for a in live if a.overwrite}
        busy = await self.intake.held() if due else set()
        for group in convergence.groups(due, running):
            if busy.isdisjoint(group.fix):  # else it waits: those services are moving
                await self._converge(group, overwrite, now)

    def _pace(self, alive: list[AgentRecord]) -> None:
        """Size the fleet's heartbeat period from the `alive` agents; tell a new one to
        those that beat at another."""
        before = self.liveness.period
        period = self.liveness.size(len(alive))
        if period != before:
            self._log.info("heartbeat.period", agents=len(alive), period=period, before=before)
            base = self.settings.heartbeat_interval
            told = [a.host_id for a in alive if (a.heartbeat_interval or base) != period]
            if before is not None or period != base:
                self._tell(told, period)

    async def _liveness(self, agent: AgentRecord, now: float, *, may_lose: bool) -> bool:
        """Mark `agent` lost or alive again if it changed; whether it is alive."""
        alive = views.host_alive(agent, now, self.settings.lost_after_for)
        if alive == (agent.state == "alive") or not (alive or may_lose):
            return alive
        state, event = ("alive", "agent.returned") if alive else ("lost", "agent.lost")
        await self.store.set_agent(agent.host_id, state=state)
        self._log.info(event, host_id=agent.host_id)
        await self._emit(None, event, {"host_id": agent.host_id, "last_seen": agent.last_seen})
        return alive

    async def _drift(
        self, agent: AgentRecord, release: dict[str, str], catalog: Any,
        deployed: set[tuple[str, str]], came_up: bool,
    ) -> dict[str, str]:  # fmt: skip
        """What `agent` must be moved to, once the same drift was seen on two sweeps in a
        row, or at once if it `came_up` and still runs what its hello said (reporting,
        once each, what it runs that lockstep never deployed)."""
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
        return drift.fix if came_up or previous == drift.fix else {}

    def _may_try(self, host: str, fix: dict[str, str], now: float) -> bool:
        tried = self._tried.get(host)
        return tried is None or tried[0] != fix or now >= tried[1]

    async def _converge(self, group: convergence.Group, overwrite: set[str], now: float) -> None:
        """One deployment that brings every host of `group` to the current release."""
        for host in group.hosts:
            self._tried[host] = (group.fix, now + RETRY_AFTER)
        hosts = ", ".join(group.hosts) if len(group.hosts) <= 3 else f"{len(group.hosts)} hosts"
        request = Request(services=group.fix, kind="converge", trigger="converge",
                          hosts=group.hosts, reason=f"converge {hosts} to the current release",
                          queue=False)  # fmt: skip
        try:
            await self.intake.submit(uuid.uuid4().hex, request)
        except UserError as e:
            self._log.info("converge.skipped", hosts=list(group.hosts), reason=str(e))
            return
        for host in overwrite.intersection(group.hosts):
            await self.store.set_agent(host, overwrite=False)


async def _within(event: asyncio.Event, seconds: float) -> bool:
    """Wait up to `seconds` for `event`; whether it is set."""
    if seconds > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), seconds)
    return event.is_set()
