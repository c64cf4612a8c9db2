"""Agents' liveness and what they run, kept in memory off the deployments' critical path.

The coordinator's heartbeat consumer calls `Liveness.beat` for every admitted heartbeat
(they arrive on a queue of their own), and its step-result handler calls `step`.
`last_seen` is the agent's send time, clamped to now, so a backlog delivered after an
outage cannot make a dead host look alive. What a host runs is kept per host as of the
newest report applied (an older report changes nothing, I3). Nothing here writes per
message: `flush` writes every changed `last_seen` and view in one transaction, and
the watch calls it once per sweep; a view lost in a crash before its flush is told
again by the host's next heartbeat. `agents` lays what is in memory over the store's
records for everything that judges liveness or reads what runs where (status, agents,
planning, the watch, the health triggers), and `now` is the time to judge them at.

Each host is judged by the period it beats at (`AgentRecord.heartbeat_interval`):
what its heartbeats say, or the period it was told if that is longer and not yet
confirmed. The watch sets the fleet's `period` once a sweep (`coordinator.pace`), and
`beat` answers whether the host should be told it; `told` records the telling. A
period told and not confirmed within `RETELL_AFTER` is told once more (a lost Ping),
not again until the host says hello: an agent that predates the Ping's period refuses
it (to lockstep.dead) and keeps its own, which is no harm, only more heartbeats.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from coordinator import pace
from coordinator.records import AgentRecord
from coordinator.store import Store
from shared.config import CoordinatorSettings
from shared.messages import Health, ServiceState

RETELL_AFTER = 60.0
"""Seconds after which a period told and not confirmed (a lost Ping) is told again."""
TELLS = 2
"""How many times one period is told to a host that does not say it."""


@dataclass(frozen=True)
class View:
    """What a host runs, as its report sent at `at` said (labels: None if not said)."""

    at: float
    services: tuple[ServiceState, ...]
    labels: dict[str, str] | None


class Liveness:
    def __init__(self, store: Store, settings: CoordinatorSettings) -> None:
        self.store = store
        self.settings = settings
        self.since = time.time()
        """When this coordinator began listening (see `_presumed`)."""
        self.period: float | None = None
        """The period the fleet should beat at (None until the first sweep sized it)."""
        self._interval: dict[str, float] = {}
        """The period each host is judged by: said, or told if longer and unconfirmed."""
        self._told: dict[str, tuple[float, float, int]] = {}
        """Host -> (period told, when, how many times), until its heartbeats say it."""
        self._seen: dict[str, float] = {}
        self._dirty: set[str] = set()
        self._views: dict[str, View] = {}
        """The newest view applied per host, written or not."""
        self._unwritten: dict[str, View] = {}
        self._lag: float | None = None
        self._records: dict[str, AgentRecord] = {}
        """The store's approved agents as last read, at `_version` of its agents table."""
        self._merged: dict[str, AgentRecord] = {}
        """`_records` with what is in memory laid over them; `_changed` hosts re-laid."""
        self._version = -1
        self._changed: set[str] = set()
        self._hellos: dict[str, dict[str, str]] = {}
        """What each host that came up said it runs (service -> version), while that is
        still what it runs and no sweep found it needs nothing (`came_up`)."""
        self.woken = asyncio.Event()
        """Set by every hello and by a deployment's end: the watch sweeps soon."""
        self.behind = 0.0
        """How far behind its heartbeats this coordinator was at the last flush: the
        least delay (handled minus sent) of the heartbeats handled since the flush
        before (0 when none came)."""

    async def beat(
        self, host: str, sent_at: float, services: Sequence[ServiceState],
        labels: dict[str, str] | None, interval: float | None = None,
    ) -> bool:  # fmt: skip
        """A heartbeat of `host` sent at `sent_at`, beating every `interval` seconds:
        note it, and what it says runs. True if the host should be told `period`."""
        now = time.time()
        seen = min(sent_at, now)
        self._lag = now - seen if self._lag is None else min(self._lag, now - seen)
        if seen > self._seen.get(host, 0.0):
            self._seen[host] = seen
            self._dirty.add(host)
            self._changed.add(host)
        said = interval or self.settings.heartbeat_interval
        told = self._told.get(host)
        if told is not None and said == told[0]:
            del self._told[host]
        self._judge(host, said)
        view = View(sent_at, tuple(services), labels)
        known = self._views.get(host)
        if known is None or (sent_at >= known.at and not _same(known, view)):
            self._apply(host, view)
        return self._should_tell(host, said, now)

    def told(self, host: str, period: float) -> None:
        """`host` was told to beat every `period` seconds (judged so, if longer)."""
        before = self._told.get(host)
        times = before[2] + 1 if before is not None and before[0] == period else 1
        self._told[host] = (period, time.time(), times)
        said = self._interval.get(host)
        if said is None and host in self._records:  # not heard since a restart
            said = self._records[host].heartbeat_interval
        self._judge(host, said or period)

    def untold(self, host: str, period: float) -> None:
        """Telling `host` the `period` failed (not sent): it was not told, so it is
        told at its next heartbeat, which also judges it by what it says again."""
        told = self._told.get(host)
        if told is not None and told[0] == period:
            del self._told[host]

    def size(self, agents: int) -> float:
        """The fleet has `agents` live agents: the period it should beat at follows."""
        base = self.settings.heartbeat_interval
        self.period = pace.period(agents, base, self.settings.max_heartbeats_per_second,
                                  self.period or base)  # fmt: skip
        return self.period

    def _should_tell(self, host: str, said: float, now: float) -> bool:
        if self.period is None or said == self.period:
            return False
        told = self._told.get(host)
        if told is None or told[0] != self.period:
            return True
        return told[2] < TELLS and now - told[1] > RETELL_AFTER

    def _judge(self, host: str, said: float) -> None:
        told = self._told.get(host)
        judged = max(said, told[0]) if told is not None else said
        if self._interval.get(host) != judged:
            self._interval[host] = judged
            self._dirty.add(host)
            self._changed.add(host)

    def step(
        self, host: str, service: str, version: str | None, health: Health, sent_at: float
    ) -> bool:
        """What a step result sent at `sent_at` says `host` runs for `service`; False if
        no view of the host is in memory yet (the caller records it in the store)."""
        known = self._views.get(host)
        if known is None:
            return False
        if sent_at < known.at:
            return True  # a newer report was applied: this one tells nothing new
        services = [s for s in known.services if s.service != service]
        if version is not None:
            services.append(ServiceState(service=service, version=version, health=health))
        services.sort(key=lambda s: s.service)
        self._apply(host, View(sent_at, tuple(services), None))
        return True

    def _apply(self, host: str, view: View) -> None:
        known = self._views.get(host)
        if view.labels is None and known is not None:
            view = replace(view, labels=known.labels)
        self._views[host] = self._unwritten[host] = view
        self._changed.add(host)

    def hello(self, host: str, services: Iterable[ServiceState]) -> None:
        """`host` came up and said it runs `services` (the store has it): start from
        there, and let the watch know."""
        self.forget(host)
        self._hellos[host] = {s.service: s.version for s in services if s.version is not None}
        self.woken.set()

    def came_up(self, agents: Iterable[AgentRecord]) -> set[str]:
        """The `agents` whose hello is the truth of what they run: they came up, and
        still run what they said then (a step since, or a deployment's results, makes
        them hosts like any other: forgotten here)."""
        hellos = self._hellos
        for agent in agents:
            said = hellos.get(agent.host_id)
            if said is not None and said != agent.running():
                del hellos[agent.host_id]
        return set(hellos)

    def settled(self, hosts: Iterable[str]) -> None:
        """A sweep found that `hosts`, which came up, need nothing: forget their hellos."""
        for host in hosts:
            self._hellos.pop(host, None)

    def ended(self, hosts: Iterable[str]) -> None:
        """A deployment in which `hosts` took part ended: what they run is no longer
        what they said when they came up, but what its results said."""
        self.settled(hosts)
        self.woken.set()

    def forget(self, host: str) -> None:
        """The store was told what `host` runs directly (its hello): start from there.
        A restarted agent beats at its own period again until it is told otherwise."""
        self._views.pop(host, None)
        self._unwritten.pop(host, None)
        self._told.pop(host, None)
        self._changed.add(host)

    def now(self) -> float:
        """The time liveness is judged at: now, less how far behind its heartbeats this
        coordinator is (`behind`). A coordinator busy with a deploy, or catching up after
        a pause, then never takes its own backlog for silent hosts; and a silent fleet is
        still judged at the wall clock, since no heartbeat handled means no delay."""
        return time.time() - self.behind

    async def flush(self) -> None:
        """Write every `last_seen` and view noted since the last flush, in one transaction."""
        self.behind, self._lag = self._lag or 0.0, None
        if not self._dirty and not self._unwritten:
            return
        dirty, self._dirty = self._dirty, set()
        views, self._unwritten = self._unwritten, {}
        try:
            await self.store.save_liveness(
                {h: (self._seen.get(h, 0.0), self._interval.get(h)) for h in dirty},
                {h: (v.at, [s.model_dump() for s in v.services], v.labels)
                 for h, v in views.items()},
            )  # fmt: skip
        except BaseException:
            self._dirty |= dirty  # written with the next flush
            self._unwritten = {**views, **self._unwritten}
            raise

    async def agents(self, *, approved_only: bool = True) -> list[AgentRecord]:
        """The store's agents with their newest `last_seen` and view. The approved ones
        (every sweep, plan and status reads them) are read from the store only after
        it changed them, and re-laid only where something new came in since."""
        if not approved_only:
            return [self._newest(a) for a in await self.store.agents(approved_only=False)]
        if self._version != self.store.agents_changed:
            self._version = self.store.agents_changed
            self._records = {a.host_id: a for a in await self.store.agents()}
            self._merged = {h: self._newest(a) for h, a in self._records.items()}
            self._changed.clear()
        for host in self._changed & self._records.keys():
            self._merged[host] = self._newest(self._records[host])
        self._changed.clear()
        return list(self._merged.values())

    def _newest(self, agent: AgentRecord) -> AgentRecord:
        host = agent.host_id
        seen = max(agent.last_seen, self._seen.get(host, self._presumed(agent)))
        interval = self._interval.get(host, agent.heartbeat_interval)
        view = self._views.get(host)  # never older than the store's (see forget)
        if view is None:
            if seen == agent.last_seen and interval == agent.heartbeat_interval:
                return agent
            return replace(agent, last_seen=seen, heartbeat_interval=interval)
        labels = agent.labels if view.labels is None else view.labels
        return replace(agent, last_seen=seen, services=view.services, labels=labels,
                       heartbeat_interval=interval)  # fmt: skip

    def _presumed(self, agent: AgentRecord) -> float:
        """When a host not heard from since this coordinator began listening counts as
        last seen: then, if it was alive when the store last heard of it (a restart or
        a standby's takeover is this coordinator's silence, not the host's: a host is
        lost only after a full period of listening), else never."""
        return self.since if agent.state == "alive" else 0.0


def _same(known: View, view: View) -> bool:
    """Whether `view` tells nothing `known` did not (labels not said: unchanged)."""
    return known.services == view.services and view.labels in (None, known.labels)
