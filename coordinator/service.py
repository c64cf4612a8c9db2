"""The coordinator process: the table of message handlers, started and stopped.

`serve` runs one; `Coordinator.handle` is the transport's handler for both of its
queues. A delivery is handled to the end (store written) before the transport acks
it. Agent reports pass the enrollment gate first (`coordinator.enrollment`: signed by
an approved key, from the host's own broker user); requests pass the operators
allow-list, and who asked is recorded. Then the kind's handler runs: requests in
`coordinator.requests`, reports and alerts in `coordinator.reactions`. Deployments
advance only through the runtime (`coordinator.runtime.Deployments.drive`), which
applies the pure state machine, saves the result and then sends the commands: the
store always knows at least as much as any agent was told.

Only the active coordinator runs (`coordinator.leadership`): `serve` waits as a
standby until this process holds the lease, then starts one with every commit fenced
by the lease's epoch and every publish confirmed by the lease, and stops it when the
lease is lost (and waits again).
"""

from __future__ import annotations

import asyncio
import math
import os
import socket
import time
from collections.abc import Awaitable, Callable
from functools import cached_property
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator import machine, trust
from coordinator.announce import Announcer
from coordinator.enrollment import Enrollment, Policy
from coordinator.intake import Intake
from coordinator.leadership import Leadership
from coordinator.liveness import Liveness
from coordinator.reactions import Reactions
from coordinator.requests import Requests
from coordinator.runtime import Deployments
from coordinator.store import Store
from coordinator.watch import Watch
from shared import log, metrics, signing, topology
from shared.config import BrokerSettings, CoordinatorSettings
from shared.errors import Fenced, ProtocolError, Refused, StoreUnavailable, UserError
from shared.messages import (
    AgentHello,
    Alert,
    Body,
    ControlRequest,
    CrashLoop,
    DeployRequest,
    ErrorInfo,
    HealthChange,
    Heartbeat,
    Inquiry,
    QueryRequest,
    RegisterRequest,
    Reply,
    RollbackRequest,
    StepResult,
    Vote,
)
from shared.tasks import TaskGroup
from shared.transport import Broker, Delivery, cluster
from shared.transport.connection import safe_url

CONCURRENT = 64
"""Deliveries handled at once: reports of one deployment that arrive together are then
applied in one transaction (coordinator.runtime)."""
IN_ORDER = topology.REQUEST_KINDS | {"alert"}
"""Kinds handled one at a time in arrival order (queued deployments are FIFO; a burst of
alerts causes one rollback)."""

Handler = Callable[[Delivery], Awaitable[Body | None]]


class Coordinator:
    def __init__(
        self, db: str | Path, broker: BrokerSettings, settings: CoordinatorSettings,
        key: Ed25519PrivateKey, policy: Policy | None = None,
        leadership: Leadership | None = None,
    ) -> None:  # fmt: skip
        """`db`: a SQLite file or a `postgresql://` URL. `leadership`: the lease this
        process holds (None: it acts unfenced, as tests that run one alone do)."""
        self.db_path = db
        self.settings = settings
        self.policy = policy or Policy()
        self.leadership = leadership
        gate = leadership.confirm if leadership is not None else None
        name = f"coordinator:{socket.gethostname()}:{os.getpid()}"  # also the envelopes' sender
        if leadership is not None:  # a stalled one's connection, and its consumer, go soon
            beat = str(max(5, math.ceil(2 * settings.lease_ttl)))
            broker = broker.model_copy(
                update={"amqp_url": cluster.with_default(broker.amqp_url, "heartbeat", beat)}
            )
        self.broker = Broker(broker, name, signer=signing.Signer(key), gate=gate)
        self._queue_type = broker.agent_queue_type
        self._tasks = TaskGroup("coordinator")
        self._log = log.get("coordinator")
        self._in_order = asyncio.Lock()
        self.store: Store
        self.intake: Intake
        self.enrollment: Enrollment
        self.deployments: Deployments
        self.liveness: Liveness
        self.requests: Requests
        self.reactions: Reactions

    async def start(self) -> None:
        self.store = await Store.open(self.db_path)
        if self.leadership is not None and self.leadership.epoch is not None:
            self.store.fence(self.leadership.epoch, self.leadership.fenced)
        announce = Announcer(self.store, self.broker)
        self.liveness = Liveness(self.store, self.settings)
        self.intake = Intake(self.store, self.liveness, self.settings.lost_after_for, self._begin)
        self.enrollment = Enrollment(
            self.store, self.broker, self.policy, self._queue_type, announce.emit
        )
        self.deployments = Deployments(
            self.store, self.broker, self._tasks, self.policy.security.command_ttl,
            announce.deployment, self._finished,
        )  # fmt: skip
        self.requests = Requests(self.store, self.intake, self.deployments, self.liveness,
                                 self.enrollment, self.settings.lost_after_for)  # fmt: skip
        self.reactions = Reactions(self.store, self.liveness, self.deployments, self.requests,
                                   self.settings, self._tasks)  # fmt: skip
        await self.broker.connect()
        await self.broker.declare(topology.coordinator_queue(), topology.heartbeats_queue())
        await self.broker.delete_queue(topology.LEGACY_HEARTBEATS_QUEUE)
        for record in await self.store.in_flight():
            if record.state != "queued":
                self._log.info("deployment.recovering", deployment_id=record.id)
                await self.deployments.drive(record.id, machine.Recovered())
        await self.intake.start_ready()
        await self.broker.consume(topology.COORDINATOR_QUEUE, self.handle, concurrency=CONCURRENT)
        # Heartbeats are transient: auto-ack, and one at a time (each is handled in memory,
        # without an await that would let the others overtake it).
        await self.broker.consume(topology.HEARTBEATS_QUEUE, self.handle, auto_ack=True)
        self.liveness.since = time.time()  # listening from now (Liveness._presumed)
        watch = Watch(self.store, self.liveness, self.settings, self.intake, announce.emit,
                      self.reactions.tell)  # fmt: skip
        self._tasks.spawn(watch.run(), "watch", forever=True)
        self._log.info("coordinator.started", db=safe_url(str(self.db_path)))

    async def stop(self) -> None:
        """Stop (also after a `start` that failed part way)."""
        await self._tasks.close()
        await self.broker.close()
        store: Store | None = getattr(self, "store", None)
        if store is not None:
            await store.close()

    async def _finished(self, deployment: machine.Deployment) -> None:
        """A deployment ended: its hosts' views come from its results now (the watch
        judges them as usual), and what queued behind it may start."""
        self.liveness.ended(host for host, _ in deployment.participants)
        await self.intake.start_ready()

    def _begin(self, deployment_id: str) -> None:
        started = self.deployments.drive(deployment_id, machine.Started())
        self._tasks.spawn(started, f"start:{deployment_id}")

    # --- one delivery ---------------------------------------------------------------

    async def handle(self, delivery: Delivery) -> Body | None:
        kind = delivery.envelope.kind
        try:
            if kind in topology.REPORT_KINDS and not await self.enrollment.admit(delivery):
                return None
            if kind in topology.REQUEST_KINDS:
                self._authorize(delivery)
            if kind in IN_ORDER:
                async with self._in_order:  # FIFO: handled in the order they arrived
                    return await self._dispatch(delivery)
            return await self._dispatch(delivery)
        except UserError as e:
            if not delivery.reply_to:
                raise ProtocolError(str(e)) from e
            return Reply(ok=False, error=ErrorInfo(kind="user", field=e.field, reason=e.reason))

    def _authorize(self, delivery: Delivery) -> None:
        """Refuse a request from a broker user outside the operators allow-list."""
        try:
            trust.authorize(delivery.user_id, self.policy.operators)
        except Refused as e:
            metrics.REFUSED.labels(e.code).inc()
            self._log.warning("request.refused", user_id=delivery.user_id, reason=e.reason)
            raise UserError("user_id", e.reason) from e

    async def _dispatch(self, delivery: Delivery) -> Body | None:
        """The handler of the body's kind (the table below); its reply, if any."""
        handler = self._handlers.get(type(delivery.envelope.body))
        if handler is None:
            raise ProtocolError(f"kind: {delivery.envelope.kind} is not for the coordinator")
        return await handler(delivery)

    @cached_property
    def _handlers(self) -> dict[type[Body], Handler]:
        """Message kind -> its handler: requests, then agents' reports and alerts."""
        requests, reactions = self.requests, self.reactions
        return {
            RegisterRequest: requests.on_register, DeployRequest: requests.on_deploy,
            RollbackRequest: requests.on_rollback, ControlRequest: requests.on_control,
            QueryRequest: requests.on_query,
            AgentHello: reactions.on_hello, Heartbeat: reactions.on_heartbeat,
            Vote: reactions.on_vote, StepResult: reactions.on_step,
            Inquiry: reactions.on_inquiry, HealthChange: reactions.on_failure,
            CrashLoop: reactions.on_failure, Alert: reactions.on_alert,
        }  # fmt: skip


async def serve(
    db: str | Path, broker: BrokerSettings, settings: CoordinatorSettings,
    key: Ed25519PrivateKey, policy: Policy, metrics_port: int | None = None,
) -> None:  # fmt: skip
    """Run a coordinator until cancelled (SIGTERM/SIGINT): a standby until it holds the
    lease, then the active one until it loses it, and so on; the lease is given up on
    the way out, so a standby takes over at once."""
    metrics.serve(metrics_port)
    leases = await Store.open(db)
    leadership = Leadership(leases, settings.lease_ttl)
    log_ = log.get("coordinator")
    try:
        while True:
            await leadership.take()
            coordinator = Coordinator(db, broker, settings, key, policy, leadership)
            holding = asyncio.create_task(leadership.hold(), name="lease")  # from now on
            try:
                await coordinator.start()
                await holding  # until the lease is lost
            except (Fenced, StoreUnavailable) as e:  # lost while starting: wait again
                log_.warning("coordinator.start_abandoned", error=str(e))
            finally:
                holding.cancel()
                try:
                    await holding
                except asyncio.CancelledError:
                    pass
                except Exception:  # it must not keep this one from stopping
                    log_.exception("lease.hold_failed")
                await coordinator.stop()
    finally:
        await leadership.release()
        await leases.close()

