"""`deploy --wait` and `rollback --wait`: follow one deployment by its events, not polls.

Called by coordinator/cli/main.py. `Subscription.open` opens an exclusive queue on
`lockstep.events` bound to `deployment.#` before the request is sent, so no event of
the deployment can fall between the coordinator's reply and the subscription.
`to_the_end` then shows a line per phase change from that deployment's events alone
(the coordinator publishes the whole document at each one) and asks for the document
once, when an event says the deployment ended.

A query stands in for lost events, never as a poll: when the subscription came back
after a reconnect (what was published meanwhile is gone), and when the deployment has
been silent for `SILENCE` seconds, doubling up to `MAX_SILENCE` while it stays silent
(a long bake, or a deployment queued behind another).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeGuard

from coordinator.cli.client import ask
from coordinator.machine import TERMINAL
from shared import topology
from shared.messages import Event, QueryRequest
from shared.transport import Broker, Delivery

SILENCE = 10.0
"""Seconds without an event of the deployment before the coordinator is asked once."""
MAX_SILENCE = 60.0
"""The longest wait between two such questions while the deployment stays silent."""
DEPLOYMENT_EVENTS = topology.event_key("deployment.#")
"""Binding pattern: every `deployment.<state>` event."""


class Subscription:
    """The deployment events published since `open`, in arrival order."""

    def __init__(self) -> None:
        self._inbox: asyncio.Queue[Event | None] = asyncio.Queue()
        """Events, and None where the subscription came back after a reconnect."""

    @classmethod
    async def open(cls, broker: Broker) -> Subscription:
        """Start receiving deployment events; they are bound once this returns."""
        subscription = cls()
        await broker.subscribe(
            topology.EVENTS,
            [DEPLOYMENT_EVENTS],
            subscription._on_event,
            on_restored=subscription._on_restored,
        )
        return subscription

    async def _on_event(self, delivery: Delivery) -> None:
        if isinstance(delivery.envelope.body, Event):
            self._inbox.put_nowait(delivery.envelope.body)

    def _on_restored(self) -> None:
        self._inbox.put_nowait(None)

    async def news(self, deployment_id: str, silence: float) -> dict[str, Any] | None:
        """The data of the next event about `deployment_id` (other deployments' events
        are dropped); None after `silence` seconds without one, or if some were lost."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + silence
        while True:
            try:
                event = await asyncio.wait_for(self._inbox.get(), deadline - loop.time())
            except TimeoutError:
                return None
            if event is None:
                return None
            if event.data.get("deployment_id") == deployment_id:
                return event.data


async def to_the_end(
    broker: Broker,
    subscription: Subscription,
    doc: dict[str, Any],
    show: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """The document of `doc`'s deployment once it is terminal, asked for once at the end
    (and once per lost subscription or silence); `show` sees each state on the way."""
    deployment_id = doc["deployment_id"]
    silence = SILENCE
    while doc["state"] not in TERMINAL:
        show(doc)
        news = await subscription.news(deployment_id, silence)
        if _under_way(news):
            doc, silence = news, SILENCE
            continue
        silence = SILENCE if news is not None else min(silence * 2, MAX_SILENCE)
        query = QueryRequest(what="deployment", deployment_id=deployment_id)
        doc = await ask(broker, "query", query)
    return doc


def _under_way(news: dict[str, Any] | None) -> TypeGuard[dict[str, Any]]:
    """Whether an event's data is a whole document of a deployment still under way (an
    end, or anything less than a document, is worth asking the coordinator about)."""
    return (
        news is not None
        and news.get("state") not in TERMINAL
        and isinstance(news.get("participants"), list)
    )
