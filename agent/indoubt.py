"""In-doubt transactions (SPEC 6.5 "agent dies after voting"): ask for the outcome.

A participant that voted YES may not decide alone. The agent service calls
`InDoubt.ask_all` once it consumes its queue after a start, which publishes an
`Inquiry` for every transaction recorded `prepared`; `InDoubt.run` (a background
task) asks again every `every` seconds about a transaction still prepared
`stale_after` seconds after it last changed (2 x heartbeat_interval + 30 s: no
decision came although the coordinator saw this agent alive). The coordinator answers
by sending the decision again as a normal command. `due` is the pure decision, and
`next_look` when to look again: the task sleeps until the first moment anything could
be due (a transaction prepared after a look is due `stale` seconds after it at the
earliest), so an idle agent reads its store about once a `stale`, not every second.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping

from agent.store import Store, Txn
from shared import log
from shared.errors import TransientError
from shared.messages import Inquiry

RESEND_EVERY = 10.0
"""Seconds between two inquiries about the same transaction."""
GRACE = 30.0
"""Added to two heartbeat intervals: how long a decision may take to arrive."""
TICK = 1.0
"""The least time between two looks for transactions in doubt."""

Key = tuple[str, str]
Publish = Callable[[Inquiry], Awaitable[None]]


def stale_after(heartbeat_interval: float) -> float:
    """Seconds after which a prepared transaction with no outcome is in doubt."""
    return 2 * heartbeat_interval + GRACE


def due(
    txns: Iterable[Txn], now: float, asked: Mapping[Key, float], stale: float, every: float
) -> list[Txn]:
    """The prepared `txns` to ask about at `now` (wall-clock seconds)."""
    return [
        t
        for t in txns
        if t.state == "prepared"
        and now - t.updated_at >= stale
        and now - asked.get((t.deployment_id, t.service), float("-inf")) >= every
    ]


def next_look(
    txns: Iterable[Txn], now: float, asked: Mapping[Key, float], stale: float, every: float
) -> float:
    """Seconds from `now` until one of `txns` (or one prepared after `now`) may be due."""
    times = [now + stale]
    for t in txns:
        if t.state == "prepared":
            last = asked.get((t.deployment_id, t.service), float("-inf"))
            times.append(max(t.updated_at + stale, last + every))
    return max(0.0, min(times) - now)


class InDoubt:
    """Asks the coordinator about this host's prepared transactions."""

    def __init__(
        self, store: Store, publish: Publish, host_id: str, stale: float,
        every: float = RESEND_EVERY, tick: float = TICK,
    ) -> None:  # fmt: skip
        self.store = store
        self.host_id = host_id
        self.stale = stale
        self.every = every
        self.tick = tick
        self._publish = publish
        self._asked: dict[Key, float] = {}
        self._log = log.get("agent.indoubt", host_id=host_id)

    async def ask_all(self) -> int:
        """Ask about every prepared transaction (after a start); how many."""
        txns = await self.store.txns(None, ("prepared",))
        for txn in txns:
            await self._ask(txn, "start")
        return len(txns)

    async def run(self) -> None:
        """Forever: ask again about transactions left in doubt."""
        wait = 0.0  # the first look right away: ask_all has just asked
        while True:
            await asyncio.sleep(max(self.tick, wait))
            txns = await self.store.txns(None, ("prepared",))
            self._forget(txns)
            now = time.time()
            for txn in due(txns, now, self._asked, self.stale, self.every):
                await self._ask(txn, "stale")
            wait = next_look(txns, time.time(), self._asked, self.stale, self.every)

    async def _ask(self, txn: Txn, why: str) -> None:
        inquiry = Inquiry(deployment_id=txn.deployment_id, host_id=self.host_id,
                          service=txn.service)  # fmt: skip
        try:
            await self._publish(inquiry)
        except TransientError as e:
            self._log.warning("inquiry.failed", deployment_id=txn.deployment_id,
                              service=txn.service, error=str(e))  # fmt: skip
            return
        self._asked[(txn.deployment_id, txn.service)] = time.time()
        self._log.info("inquiry.sent", deployment_id=txn.deployment_id, service=txn.service,
                       why=why, prepared_for=round(time.time() - txn.updated_at, 1))  # fmt: skip

    def _forget(self, prepared: Iterable[Txn]) -> None:
        """Drop what is known of transactions that are no longer in doubt."""
        keep = {(t.deployment_id, t.service) for t in prepared}
        for key in set(self._asked) - keep:
            del self._asked[key]
