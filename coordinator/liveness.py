"""Agents' liveness, kept in memory off the deployments' critical path (issue 9).

The coordinator's heartbeat consumer calls `Liveness.beat` for every admitted heartbeat
(they arrive on a queue of their own). `last_seen` is the agent's send time, clamped to
now, so a backlog delivered after an outage cannot make a dead host look alive; what a
host runs is written to the store only when it changed (and only from a report newer
than the last one applied). `flush` writes every `last_seen` in one transaction; the
watch calls it once per sweep. `merge` lays the in-memory times over store rows for
everything that judges liveness (status, agents, planning, the watch).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from coordinator.records import AgentRecord
from coordinator.store import Store
from shared.messages import ServiceState


class Liveness:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._seen: dict[str, float] = {}
        self._dirty: set[str] = set()
        self._views: dict[str, tuple[float, list[dict[str, Any]]]] = {}

    async def beat(
        self, host: str, sent_at: float, services: Sequence[ServiceState],
        labels: dict[str, str] | None,
    ) -> None:  # fmt: skip
        """A heartbeat of `host` sent at `sent_at`: note it; store a changed service view."""
        seen = min(sent_at, time.time())
        if seen > self._seen.get(host, 0.0):
            self._seen[host] = seen
            self._dirty.add(host)
        view = [s.model_dump() for s in services]
        known = self._views.get(host)
        if known is not None and (known[1] == view or sent_at < known[0]):
            return
        if await self.store.agent_services(host, view, labels, sent_at):
            self._views[host] = (sent_at, view)

    def forget(self, host: str) -> None:
        """A step result changed what `host` runs: the next heartbeat's view is news."""
        self._views.pop(host, None)

    async def flush(self) -> None:
        """Write every `last_seen` noted since the last flush, in one transaction."""
        if self._dirty:
            dirty, self._dirty = self._dirty, set()
            await self.store.set_last_seen({h: self._seen[h] for h in dirty})

    async def agents(self, *, approved_only: bool = True) -> list[AgentRecord]:
        """The store's agents with their newest `last_seen`."""
        return self.merge(await self.store.agents(approved_only=approved_only))

    def merge(self, agents: list[AgentRecord]) -> list[AgentRecord]:
        """`agents` (store records) with the newest `last_seen` known in memory."""
        return [self._newest(agent) for agent in agents]

    def _newest(self, agent: AgentRecord) -> AgentRecord:
        seen = self._seen.get(agent.host_id, 0.0)
        return agent if seen <= agent.last_seen else replace(agent, last_seen=seen)
