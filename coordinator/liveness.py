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
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from coordinator.records import AgentRecord
from coordinator.store import Store
from shared.messages import Health, ServiceState


@dataclass(frozen=True)
class View:
    """What a host runs, as its report sent at `at` said (labels: None if not said)."""

    at: float
    services: tuple[ServiceState, ...]
    labels: dict[str, str] | None


class Liveness:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._seen: dict[str, float] = {}
        self._dirty: set[str] = set()
        self._views: dict[str, View] = {}
        """The newest view applied per host, written or not."""
        self._unwritten: dict[str, View] = {}
        self._lag: float | None = None
        self.behind = 0.0
        """How far behind its heartbeats this coordinator was at the last flush: the
        least delay (handled minus sent) of the heartbeats handled since the flush
        before (0 when none came)."""

    async def beat(
        self, host: str, sent_at: float, services: Sequence[ServiceState],
        labels: dict[str, str] | None,
    ) -> None:  # fmt: skip
        """A heartbeat of `host` sent at `sent_at`: note it, and what it says runs."""
        now = time.time()
        seen = min(sent_at, now)
        self._lag = now - seen if self._lag is None else min(self._lag, now - seen)
        if seen > self._seen.get(host, 0.0):
            self._seen[host] = seen
            self._dirty.add(host)
        view = View(sent_at, tuple(services), labels)
        known = self._views.get(host)
        if known is not None and (sent_at < known.at or _same(known, view)):
            return
        self._apply(host, view)

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

    def forget(self, host: str) -> None:
        """The store was told what `host` runs directly (its hello): start from there."""
        self._views.pop(host, None)
        self._unwritten.pop(host, None)

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
                {h: self._seen[h] for h in dirty},
                {h: (v.at, [s.model_dump() for s in v.services], v.labels)
                 for h, v in views.items()},
            )  # fmt: skip
        except BaseException:
            self._dirty |= dirty  # written with the next flush
            self._unwritten = {**views, **self._unwritten}
            raise

    async def agents(self, *, approved_only: bool = True) -> list[AgentRecord]:
        """The store's agents with their newest `last_seen` and view."""
        return self.merge(await self.store.agents(approved_only=approved_only))

    def merge(self, agents: list[AgentRecord]) -> list[AgentRecord]:
        """`agents` (store records) with the newest `last_seen` and views in memory."""
        return [self._newest(agent) for agent in agents]

    def _newest(self, agent: AgentRecord) -> AgentRecord:
        seen = max(agent.last_seen, self._seen.get(agent.host_id, 0.0))
        view = self._views.get(agent.host_id)  # never older than the store's (see forget)
        if view is None:
            return agent if seen == agent.last_seen else replace(agent, last_seen=seen)
        labels = agent.labels if view.labels is None else view.labels
        return replace(agent, last_seen=seen, services=view.services, labels=labels)


def _same(known: View, view: View) -> bool:
    """Whether `view` tells nothing `known` did not (labels not said: unchanged)."""
    return known.services == view.services and view.labels in (None, known.labels)
