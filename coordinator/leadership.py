"""Which coordinator is active: the lease in the shared store, taken, kept and lost.

`coordinator.service.serve` runs every coordinator process as a standby first: it
`take`s the lease (waiting while another holds it), then starts the coordinator and
`hold`s the lease, renewing it, until it is lost; then it stops the coordinator and is
a standby again. Timing rules in `coordinator.lease`; the store's side in
`coordinator.store.leases`.

The lease is what decides; the coordinator queue's single active consumer follows it:
a coordinator consumes the queue only while it holds the lease (it subscribes after
taking it and closes its connection when it loses it), so the broker's active
consumer is the lease holder, or a former holder that has not noticed yet. Such a
former holder (stalled past its lease, then resumed) cannot act: every commit it tries
is refused at the store by the epoch (`Fenced`: the delivery it was handling is
requeued, for the new holder), and every publish first passes `confirm`, which it
fails, so it sends no command; and the first refusal ends its `hold`. A holder that
cannot reach the store for a lease's length steps down too, and takes the lease again
(or a standby does) once the store is back: the coordinator then starts afresh from
what the store holds, as after a crash.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid

from coordinator import lease
from coordinator.records import LeaseRecord
from coordinator.store import Store
from shared import log
from shared.errors import Fenced, StoreUnavailable


class Leadership:
    """This process's claim to be the active coordinator."""

    def __init__(self, store: Store, ttl: float) -> None:
        """`store`: a connection of the lease's own (not the coordinator's)."""
        self.store = store
        self.ttl = ttl
        self.holder = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.epoch: int | None = None
        self._trusted_until = 0.0
        self._lost = asyncio.Event()
        self._news = asyncio.Event()
        self._log = log.get("leadership", holder=self.holder)

    async def take(self) -> int:
        """Wait until this process holds the lease (a standby meanwhile); its epoch."""
        told: LeaseRecord | None = None
        while True:
            sent = time.monotonic()
            try:
                epoch = await self.store.take_lease(self.holder, self.host, self.pid, self.ttl)
                if epoch is None and told is None:
                    told = await self.store.lease()
                    self._log.info("coordinator.standby", active_host=told.host,
                                   active_pid=told.pid, epoch=told.epoch)  # fmt: skip
            except StoreUnavailable as e:
                self._log.warning("lease.store_unavailable", error=str(e))
                epoch = None
            if epoch is not None:
                self.epoch, self._trusted_until = epoch, lease.trusted_until(sent, self.ttl)
                self._lost.clear()
                self._log.info("coordinator.active", epoch=epoch, host=self.host, pid=self.pid)
                return epoch
            await asyncio.sleep(lease.look_every(self.ttl))

    async def hold(self) -> None:
        """Renew the lease until it is lost: taken over (this one stalled past it), or a
        commit refused by its epoch (`fenced`). Returns then."""
        while not self._lost.is_set():
            try:
                await asyncio.wait_for(self._lost.wait(), lease.renew_every(self.ttl))
                break
            except TimeoutError:
                pass
            await self._renew()
        self._log.warning("coordinator.stepping_down", epoch=self.epoch)

    async def _renew(self) -> None:
        assert self.epoch is not None
        sent = time.monotonic()
        try:
            held = await self.store.renew_lease(self.epoch, self.holder, self.ttl)
        except Exception as e:  # not renewed (store away or failing): trusted a while, not more
            self._log.warning("lease.store_unavailable", error=str(e))
            if time.monotonic() > self._trusted_until:
                # The store has been gone for a lease's length: step down, and start
                # afresh once it is back (what a failed write left in memory, or a
                # timer whose event could not be saved, is then read back from it).
                self._log.warning("lease.store_lost", epoch=self.epoch)
                self._lost.set()
        else:
            if held:
                self._trusted_until = lease.trusted_until(sent, self.ttl)
            else:
                self._log.warning("lease.taken_over", epoch=self.epoch)
                self._lost.set()
        self._news.set()
        self._news = asyncio.Event()

    def fenced(self) -> None:
        """The store refused a commit at this epoch: another coordinator is active."""
        self._lost.set()

    async def confirm(self) -> None:
        """Return if this process may publish now: it holds the lease and trusts it
        (else it waits for the next renewal, up to a lease's length). `Fenced` if the
        lease is lost, or not confirmed in that time."""
        deadline = time.monotonic() + self.ttl
        while not self._lost.is_set():
            if time.monotonic() < self._trusted_until:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                await asyncio.wait_for(self._news.wait(), left)
            except TimeoutError:
                break
        raise Fenced(self.epoch or 0, None)

    async def release(self) -> None:
        """Give the lease up (stopping): a standby takes over without waiting for it to
        expire. Only after the coordinator stopped: nothing of this one writes after."""
        if self.epoch is None or self._lost.is_set():
            return
        self._lost.set()  # nothing of this one may publish from here on
        self._trusted_until = 0.0
        try:
            await self.store.release_lease(self.epoch, self.holder)
        except StoreUnavailable as e:
            self._log.warning("lease.release_failed", error=str(e))
