"""The coordinator process: consumes requests and reports, drives deployments.

Every side effect of the coordinator lives here. A delivery is handled to the end
(store written) before the transport acks it. Agent reports pass the enrollment gate
first (`coordinator.enrollment`: signed by an approved key, from the host's own broker
user); requests pass the operators allow-list, and who asked is recorded. Commands
are signed, addressed (`to`) and expire (`expires_at`). Deployments advance only through
`drive`, which loads the deployment, applies the pure state machine, saves the result
and then performs the actions: the store always knows at least as much as any agent
was told.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator import machine, rollback, triggers, trust, views
from coordinator.enrollment import Enrollment, Policy
from coordinator.intake import Intake, Request
from coordinator.liveness import Liveness
from coordinator.runtime import Deployments
from coordinator.store import Store
from coordinator.watch import Watch
from shared import log, metrics, signing, topology
from shared.config import BrokerSettings, CoordinatorSettings
from shared.errors import BrokerUnavailable, ProtocolError, Refused, UserError
from shared.messages import (
    Abort,
    AgentHello,
    Alert,
    Body,
    Commit,
    ControlRequest,
    CrashLoop,
    DeployRequest,
    ErrorInfo,
    Event,
    HealthChange,
    Heartbeat,
    Inquiry,
    QueryRequest,
    RegisterRequest,
    Reply,
    RollbackRequest,
    StepResult,
    Vote,
    make,
)
from shared.tasks import TaskGroup
from shared.transport import Broker, Delivery

SENDER = "coordinator"
CONCURRENT = 64
"""Deliveries handled at once: reports of one deployment that arrive together are then
applied in one transaction (coordinator.runtime)."""
IN_ORDER = topology.REQUEST_KINDS | {"alert"}
"""Kinds handled one at a time in arrival order (queued deployments are FIFO; a burst of
alerts causes one rollback)."""


class Coordinator:
    def __init__(
        self, db: Path, broker: BrokerSettings, settings: CoordinatorSettings,
        key: Ed25519PrivateKey, policy: Policy | None = None,
    ) -> None:  # fmt: skip
        self.db_path = db
        self.settings = settings
        self.policy = policy or Policy()
        self.broker = Broker(broker, f"coordinator:{db.name}", signer=signing.Signer(key))
        self._queue_type = broker.agent_queue_type
        self._tasks = TaskGroup("coordinator")
        self._log = log.get("coordinator")
        self._in_order = asyncio.Lock()
        self.store: Store
        self.intake: Intake
        self.enrollment: Enrollment
        self.deployments: Deployments
        self.liveness: Liveness

    async def start(self) -> None:
        self.store = await Store.open(self.db_path)
        self.liveness = Liveness(self.store)
        self.intake = Intake(self.store, self.liveness, self.lost_after, self._begin)
        self.enrollment = Enrollment(
            self.store, self.broker, self.policy, self._queue_type, self._emit
        )
        self.deployments = Deployments(
            self.store, self.broker, self._tasks, self.policy.security.command_ttl,
            self._emit_deployment, self.intake.start_ready,
        )  # fmt: skip
        await self.broker.connect()
        await self.broker.declare(topology.coordinator_queue(), topology.heartbeats_queue())
        for record in await self.store.in_flight():
            if record.state != "queued":
                self._log.info("deployment.recovering", deployment_id=record.id)
                await self.drive(record.id, machine.Recovered())
        await self.intake.start_ready()
        await self.broker.consume(topology.COORDINATOR_QUEUE, self.handle, concurrency=CONCURRENT)
        await self.broker.consume(topology.HEARTBEATS_QUEUE, self.handle, concurrency=CONCURRENT)
        watch = Watch(self.store, self.liveness, self.settings, self.intake, self._emit)
        self._tasks.spawn(watch.run(), "watch", forever=True)
        self._log.info("coordinator.started", db=str(self.db_path))

    async def stop(self) -> None:
        await self._tasks.close()
        await self.broker.close()
        await self.store.close()

    def _begin(self, deployment_id: str) -> None:
        self._tasks.spawn(self.drive(deployment_id, machine.Started()), f"start:{deployment_id}")

    @property
    def lost_after(self) -> float:
        return self.settings.heartbeat_interval * self.settings.lost_after_missed

    # --- one delivery ---------------------------------------------------------------

    async def handle(self, delivery: Delivery) -> Body | None:
        body = delivery.envelope.body
        kind = delivery.envelope.kind
        try:
            if kind in topology.REPORT_KINDS and not await self.enrollment.admit(delivery):
                return None
            if kind in topology.REQUEST_KINDS:
                self._authorize(delivery)
            if kind in IN_ORDER:
                async with self._in_order:  # FIFO: handled in the order they arrived
                    return await self._dispatch(delivery, body)
            return await self._dispatch(delivery, body)
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

    async def _dispatch(self, delivery: Delivery, body: Body) -> Body | None:
        """The handler of the body's kind (the table below); its reply, if any."""
        handler = self._handlers.get(type(body))
        if handler is None:
            raise ProtocolError(f"kind: {delivery.envelope.kind} is not for the coordinator")
        return await handler(delivery)

    @cached_property
    def _handlers(self) -> dict[type[Body], Callable[[Delivery], Awaitable[Body | None]]]:
        return {
            RegisterRequest: self._on_register, DeployRequest: self._on_deploy,
            RollbackRequest: self._on_rollback, ControlRequest: self._on_control,
            QueryRequest: self._on_query, Inquiry: self._on_inquiry, AgentHello: self._on_hello,
            Heartbeat: self._on_heartbeat, Vote: self._on_vote, StepResult: self._on_step,
            HealthChange: self._on_failure, CrashLoop: self._on_failure, Alert: self._on_alert,
        }  # fmt: skip

    # --- the handlers: one per kind ----------------------------------------------------

    async def _on_register(self, delivery: Delivery) -> Body:
        body = _body(delivery, RegisterRequest)
        registered = await self.store.register(body.versions)
        return Reply(ok=True, data={"versions": views.registered(registered)})

    async def _on_deploy(self, delivery: Delivery) -> Body:
        body = _body(delivery, DeployRequest)
        request = Request(services=body.services, strategy=body.strategy, queue=body.queue,
                          requested_by=delivery.user_id or "")  # fmt: skip
        data = await self.intake.submit(delivery.envelope.id, request, body.dry_run)
        return Reply(ok=True, data=data)

    async def _on_rollback(self, delivery: Delivery) -> Body:
        body = _body(delivery, RollbackRequest)
        data = await self.rollback(delivery.envelope.id, body, requested_by=delivery.user_id or "")
        return Reply(ok=True, data=data)

    async def _on_control(self, delivery: Delivery) -> Body:
        return Reply(ok=True, data=await self.control(_body(delivery, ControlRequest)))

    async def _on_query(self, delivery: Delivery) -> Body:
        return Reply(ok=True, data=await self.query(_body(delivery, QueryRequest)))

    async def _on_inquiry(self, delivery: Delivery) -> None:
        await self._inquiry(_body(delivery, Inquiry))

    async def _on_hello(self, delivery: Delivery) -> None:
        body = _body(delivery, AgentHello)
        services = [s.model_dump() for s in body.services]
        sent_at = delivery.envelope.sent_at.timestamp()
        await self.store.agent_seen(body.host_id, services, body.labels, sent_at)
        self.liveness.forget(body.host_id)

    async def _on_heartbeat(self, delivery: Delivery) -> None:
        body = _body(delivery, Heartbeat)
        sent_at = delivery.envelope.sent_at.timestamp()
        await self.liveness.beat(body.host_id, sent_at, body.services, body.labels)

    async def _on_vote(self, delivery: Delivery) -> None:
        body = _body(delivery, Vote)
        vote = machine.Voted((body.host_id, body.service), body.yes, body.reason, body.version)
        await self.drive(body.deployment_id, vote)

    async def _on_step(self, delivery: Delivery) -> None:
        body = _body(delivery, StepResult)
        await self._step_result(body, delivery.envelope.sent_at.timestamp())

    async def _on_failure(self, delivery: Delivery) -> None:
        body = delivery.envelope.body
        assert isinstance(body, HealthChange | CrashLoop)
        await self._host_failure(body)

    async def _on_alert(self, delivery: Delivery) -> None:
        await self._alert(delivery.envelope.id, _body(delivery, Alert))

    async def _step_result(self, body: StepResult, sent_at: float) -> None:
        """What runs after a step, recorded; then the step drives its deployment. A result
        about a pair that is not a participant changes nothing (SPEC 7)."""
        if not await self._takes_part(body.deployment_id, body.host_id, body.service):
            self._log.warning("report.unrelated", kind=body.KIND, host_id=body.host_id,
                              deployment_id=body.deployment_id, service=body.service)  # fmt: skip
            return
        health = "healthy" if body.ok else "unhealthy"
        await self.store.agent_service(body.host_id, body.service, body.running, health, sent_at)
        self.liveness.forget(body.host_id)
        event = machine.StepDone((body.host_id, body.service), body.step, body.ok, body.reason)
        await self.drive(body.deployment_id, event)

    # --- requests ---------------------------------------------------------------------

    async def query(self, body: QueryRequest) -> dict[str, Any]:
        now = time.time()
        if body.what == "status":
            release_id, services = await self.store.current_release()
            return views.status(
                release_id,
                services,
                await self.store.in_flight(),
                await self.liveness.agents(),
                now,
                self.lost_after,
            )
        if body.what == "history":
            page = await self.store.deployments(limit=body.limit, before=body.before)
            return views.history(page, await self.store.releases(), body.limit)
        if body.what == "agents":
            rows = await self.liveness.agents(approved_only=False)
            return views.agents(rows, now, self.lost_after, self.enrollment.heard)
        if body.what == "events":
            return {"events": [views.event(e) for e in await self.store.events(body.after)]}
        record = await self.store.deployment(body.deployment_id or "")
        if record is None:
            raise UserError("deployment_id", f"no deployment {body.deployment_id!r}")
        return views.deployment(record)

    async def rollback(
        self,
        request_id: str,
        body: RollbackRequest,
        trigger: str = "operator",
        reason: str = "",
        requested_by: str = "",
    ) -> dict[str, Any]:
        """Deploy the last good (or named) release, or move back only some services."""
        releases = await self.store.releases()
        current_id, current = await self.store.current_release()
        if body.to is not None:
            target = rollback.named(releases, body.to, body.force)
        else:
            found = rollback.last_good(releases, current_id)
            if found is None:
                raise UserError("rollback", "there is no earlier good release to roll back to")
            target = found
        services = dict(target.services)
        if body.services and body.to is None:
            catalog = await self.store.catalog()
            services = rollback.dependents_target(current, services, body.services, catalog)
        reuse = target.id if services == target.services else None  # else: a new release
        request = Request(services=services, strategy=body.strategy, kind="rollback",
                          trigger=trigger, release_id=reuse, reason=reason,
                          requested_by=requested_by)  # fmt: skip
        return await self.intake.submit(request_id, request)

    async def control(self, body: ControlRequest) -> dict[str, Any]:
        """An operator's pause, resume or abort of a deployment, converge of a host, or
        approve, reject, revoke or remove of an agent's key."""
        action = body.action
        if action in ("approve", "reject", "revoke", "remove"):
            return await self.enrollment.control(action, body.host_id)
        if action == "converge":
            if not body.host_id or not await self.store.set_agent(body.host_id, overwrite=True):
                raise UserError("host", f"no agent {body.host_id!r}")
            return {"host_id": body.host_id, "overwrite": True}
        assert action in ("pause", "resume", "abort")
        deployment_id = body.deployment_id or await self._only_in_flight()
        if await self.store.deployment(deployment_id) is None:
            raise UserError("deployment_id", f"no deployment {deployment_id!r}")
        await self.drive(deployment_id, machine.Control(action))
        record = await self.store.deployment(deployment_id)
        assert record is not None
        return views.deployment(record)

    async def _only_in_flight(self) -> str:
        records = await self.store.in_flight()
        if len(records) != 1:
            ids = ", ".join(r.id for r in records) or "none"
            raise UserError(
                "deployment_id", f"name the deployment ({len(records)} in flight: {ids})"
            )
        return records[0].id

    async def _inquiry(self, body: Inquiry) -> None:
        """An agent in doubt: send it the decision again (presumed abort if none)."""
        state = await self.deployments.state(body.deployment_id)
        answer = triggers.on_inquiry(state, (body.host_id, body.service))
        if answer is None:
            return  # its batch has not come yet: the commit (or abort) will follow
        body_out: Body = Abort(deployment_id=body.deployment_id, service=body.service)
        if answer == "commit" and state is not None:
            version = state.participants[(body.host_id, body.service)].version
            body_out = Commit(deployment_id=body.deployment_id, service=body.service,
                              version=version)  # fmt: skip
        self._log.info("inquiry.answered", deployment_id=body.deployment_id,
                       host_id=body.host_id, command=body_out.KIND)  # fmt: skip
        await self.deployments.publish_command(body.host_id, body_out)

    # --- automatic rollback triggers (SPEC 6.2) ------------------------------------------

    async def _takes_part(self, deployment_id: str, host: str, service: str) -> bool:
        """Whether (host, service) is a participant of the deployment: a report about any
        other changes nothing (SPEC 7)."""
        state = await self.deployments.state(deployment_id)
        return state is not None and (host, service) in state.participants

    async def _host_failure(self, body: HealthChange | CrashLoop) -> None:
        agents = await self.store.agents()
        runs = {(a.host_id, s.service) for a in agents for s in a.services}
        if (body.host_id, body.service) not in runs:
            self._log.warning("report.unrelated", kind=body.KIND, host_id=body.host_id,
                              service=body.service)  # fmt: skip
            return  # a service the host does not run: changes nothing
        await self.store.add_events(None, [(body.KIND, body.model_dump())])
        if isinstance(body, HealthChange) and body.health != "unhealthy":
            return
        in_flight = await self.store.in_flight()
        deployment_id = triggers.on_host_failure(
            body.host_id, body.service, body.version, in_flight
        )
        if deployment_id is None:
            return
        if isinstance(body, CrashLoop):
            cause, what = "crash_loop", f"exited {body.exits} times in {body.window:g}s"
        else:
            cause, what = "health", f"unhealthy: {body.reason}"
        reason = f"{body.service} {body.version} on {body.host_id} {what}"
        await self.drive(deployment_id, machine.Failed(reason, cause))  # type: ignore[arg-type]

    async def _alert(self, alert_id: str, alert: Alert) -> None:
        _, current = await self.store.current_release()
        decision = triggers.on_alert(
            alert.service, alert.severity, threshold=self.settings.alert_min_severity,
            current=current, in_flight=await self.store.in_flight(),
            last_completed=await self.store.last_completed(), now=time.time(),
            window=self.settings.auto_rollback_window,
        )  # fmt: skip
        record = {**alert.model_dump(), "decision": type(decision).__name__}
        reason = f"alert {alert.service}.{alert.severity}: {alert.reason or 'no reason given'}"
        match decision:
            case triggers.Ignore():
                await self.store.add_events(
                    None, [("alert.ignored", {**record, "why": decision.reason})]
                )
            case triggers.FailInFlight():
                await self.store.add_events(decision.deployment_id, [("alert.received", record)])
                await self.drive(decision.deployment_id, machine.Failed(reason, "alert"))
            case triggers.Rollback():
                await self.store.add_events(None, [("alert.received", record)])
                request = RollbackRequest(services=list(decision.services))
                await self.rollback(alert_id, request, trigger="alert", reason=reason)

    # --- the deployment loop ------------------------------------------------------------

    async def drive(self, deployment_id: str, event: machine.Event) -> None:
        """Apply `event` to a deployment (coordinator.runtime: persist, then act)."""
        await self.deployments.drive(deployment_id, event)

    # --- events for other systems ---------------------------------------------------------

    async def _emit_deployment(self, deployment_id: str) -> None:
        """deployment.<state>; at the end also release.<state> and, for a rollback that
        completed, deployment.rolled_back with its trigger and reason (SPEC 5, 6.2)."""
        record = await self.store.deployment(deployment_id)
        if record is None:
            return
        doc = views.deployment(record)
        await self._publish_event(f"deployment.{doc['state']}", doc)
        if record.ended_at is None:
            return
        rolled_back = record.kind == "rollback" and doc["state"] == "completed"
        if rolled_back:
            await self._publish_event("deployment.rolled_back", doc)
        releases = {r.id: r for r in await self.store.releases()}
        made = releases.get(record.release_id) if record.release_id is not None else None
        if made is not None and made.deployment_id == deployment_id:
            await self._publish_event(f"release.{made.state}", views.release(made))
        left = releases.get(record.from_release_id) if record.from_release_id is not None else None
        if rolled_back and left is not None and left.state == "bad":
            await self._publish_event("release.bad", views.release(left))

    async def _emit(self, deployment_id: str | None, kind: str, data: dict[str, Any]) -> None:
        await self.store.add_events(deployment_id, [(kind, data)])
        await self._publish_event(kind, data)

    async def _publish_event(self, kind: str, data: dict[str, Any]) -> None:
        try:
            await self.broker.publish(
                topology.EVENTS, topology.event_key(kind), make(Event(type=kind, data=data), SENDER)
            )
        except BrokerUnavailable as e:
            self._log.warning("event.unpublished", type=kind, error=str(e))


async def serve(
    db: Path, broker: BrokerSettings, settings: CoordinatorSettings, key: Ed25519PrivateKey,
    policy: Policy, metrics_port: int | None = None,
) -> None:  # fmt: skip
    """Run a coordinator until cancelled (SIGTERM/SIGINT)."""
    coordinator = Coordinator(db, broker, settings, key, policy)
    metrics.serve(metrics_port)
    await coordinator.start()
    try:
        await asyncio.Event().wait()
    finally:
        await coordinator.stop()


B = TypeVar("B", bound=Body)


def _body(delivery: Delivery, kind: type[B]) -> B:
    """The delivery's body, of the kind its handler was chosen for."""
    body = delivery.envelope.body
    assert isinstance(body, kind)
    return body
