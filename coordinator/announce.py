"""Events for other systems: recorded in the store, published on lockstep.events (SPEC 5).

The runtime calls `Announcer.deployment` whenever a deployment changes phase; the
enrollment gate, the watch and the coordinator's reactions call `emit` for agent and
alert events. Publishing is best effort: an event the broker did not take is logged,
never retried in the way of the deployment (the store keeps the record).
"""

from __future__ import annotations

from typing import Any

from coordinator import views
from coordinator.store import Store
from shared import log, topology
from shared.errors import BrokerUnavailable
from shared.messages import Event, make
from shared.transport import Broker


class Announcer:
    def __init__(self, store: Store, broker: Broker) -> None:
        self.store = store
        self.broker = broker
        self._log = log.get("announce")

    async def deployment(self, deployment_id: str) -> None:
        """deployment.<state>; at the end also release.<state> and, for a rollback that
        completed, deployment.rolled_back with its trigger and reason (SPEC 5, 6.2)."""
        record = await self.store.deployment(deployment_id)
        if record is None:
            return
        doc = views.deployment(record)
        await self.publish(f"deployment.{doc['state']}", doc)
        if record.ended_at is None:
            return
        rolled_back = record.kind == "rollback" and doc["state"] == "completed"
        if rolled_back:
            await self.publish("deployment.rolled_back", doc)
        releases = {r.id: r for r in await self.store.releases()}
        made = releases.get(record.release_id) if record.release_id is not None else None
        if made is not None and made.deployment_id == deployment_id:
            await self.publish(f"release.{made.state}", views.release(made))
        left = releases.get(record.from_release_id) if record.from_release_id is not None else None
        if rolled_back and left is not None and left.state == "bad":
            await self.publish("release.bad", views.release(left))

    async def emit(self, deployment_id: str | None, kind: str, data: dict[str, Any]) -> None:
        """Record the event `kind`, then publish it."""
        await self.store.add_events(deployment_id, [(kind, data)])
        await self.publish(kind, data)

    async def publish(self, kind: str, data: dict[str, Any]) -> None:
        try:
            await self.broker.publish(
                topology.EVENTS, topology.event_key(kind),
                make(Event(type=kind, data=data), self.broker.name),
            )  # fmt: skip
        except BrokerUnavailable as e:
            self._log.warning("event.unpublished", type=kind, error=str(e))
