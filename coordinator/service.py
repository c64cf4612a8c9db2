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
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator import machine, rollback, triggers, trust, views
from coordinator.enrollment import Enrollment, Policy
from coordinator.intake import Intake, Request
from coordinator.machine import Key
from coordinator.store import Store
from coordinator.watch import Watch
from shared import faults, log, metrics, signing, topology
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
    Prepare,
    QueryRequest,
    RegisterRequest,
    Reply,
    Revert,
    RollbackRequest,
    StepResult,
    Vote,
    make,
)
from shared.tasks import TaskGroup
from shared.transport import Broker, Delivery, Unroutable

SENDER = "coordinator"


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
        self._lock = asyncio.Lock()
        self._log = log.get("coordinator")
        self.store: Store
        self.intake: Intake
        self.enrollment: Enrollment

    async def start(self) -> None:
        self.store = await Store.open(self.db_path)
        self.intake = Intake(self.store, self.lost_after, self._begin)
        self.enrollment = Enrollment(
            self.store, self.broker, self.policy, self._queue_type, self._emit
        )
        await self.broker.connect()
        await self.broker.declare(topology.coordinator_queue())
        for row in await self.store.in_flight():
            if row["state"] != "queued":
                self._log.info("deployment.recovering", deployment_id=row["deployment_id"])
                await self.drive(row["deployment_id"], machine.Recovered())
        await self.intake.start_ready()
        await self.broker.consume(topology.COORDINATOR_QUEUE, self.handle)
        watch = Watch(self.store, self.settings, self.intake, self._emit)
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
        match body:
            case RegisterRequest():
                return Reply(ok=True, data={"versions": await self.store.register(body.versions)})
            case DeployRequest():
                request = Request(services=body.services, strategy=body.strategy, queue=body.queue,
                                  requested_by=delivery.user_id or "")  # fmt: skip
                data = await self.intake.submit(delivery.envelope.id, request, body.dry_run)
                return Reply(ok=True, data=data)
            case RollbackRequest():
                data = await self.rollback(delivery.envelope.id, body,
                                           requested_by=delivery.user_id or "")  # fmt: skip
                return Reply(ok=True, data=data)
            case ControlRequest():
                return Reply(ok=True, data=await self.control(body))
            case Inquiry():
                await self._inquiry(body)
            case QueryRequest():
                return Reply(ok=True, data=await self.query(body))
            case AgentHello() | Heartbeat():
                await self._agent_report(body, delivery.envelope.sent_at.timestamp())
            case Vote():
                key = (body.host_id, body.service)
                vote = machine.Voted(key, body.yes, body.reason, body.version)
                await self.drive(body.deployment_id, vote)
            case StepResult():
                await self._step_result(body, delivery.envelope.sent_at.timestamp())
            case HealthChange() | CrashLoop():
                await self._host_failure(body)
            case Alert():
                await self._alert(delivery.envelope.id, body)
            case _:
                raise ProtocolError(f"kind: {delivery.envelope.kind} is not for the coordinator")
        return None

    async def _step_result(self, body: StepResult, sent_at: float) -> None:
        """What runs after a step, recorded; then the step drives its deployment. A result
        about a pair that is not a participant changes nothing (SPEC 7)."""
        if not await self._takes_part(body.deployment_id, body.host_id, body.service):
            self._log.warning("report.unrelated", kind=body.KIND, host_id=body.host_id,
                              deployment_id=body.deployment_id, service=body.service)  # fmt: skip
            return
        health = "healthy" if body.ok else "unhealthy"
        await self.store.agent_service(body.host_id, body.service, body.running, health, sent_at)
        event = machine.StepDone((body.host_id, body.service), body.step, body.ok, body.reason)
        await self.drive(body.deployment_id, event)

    async def _agent_report(self, body: AgentHello | Heartbeat, sent_at: float) -> None:
        services = [s.model_dump() for s in body.services]
        if await self.store.agent_seen(body.host_id, services, body.labels, sent_at):
            await self._emit(
                None, "agent.registered", {"host_id": body.host_id, "labels": body.labels}
            )

    # --- requests ---------------------------------------------------------------------

    async def query(self, body: QueryRequest) -> dict[str, Any]:
        now = time.time()
        if body.what == "status":
            release_id, services = await self.store.current_release()
            return views.status(
                release_id,
                services,
                await self.store.in_flight(),
                await self.store.agents(),
                now,
                self.lost_after,
            )
        if body.what == "history":
            page = await self.store.deployments(limit=body.limit, before=body.before)
            return views.history(page, await self.store.releases(), body.limit)
        if body.what == "agents":
            rows = await self.store.agents(approved_only=False)
            return views.agents(rows, now, self.lost_after, self.enrollment.heard)
        if body.what == "events":
            return {"events": await self.store.events(body.after)}
        row = await self.store.deployment(body.deployment_id or "")
        if row is None:
            raise UserError("deployment_id", f"no deployment {body.deployment_id!r}")
        return views.deployment(row)

    async def rollback(
        self, request_id: str, body: RollbackRequest, trigger: str = "operator", reason: str = "",
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
        services, reuse = dict(target["services"]), target["release_id"]
        if body.services and body.to is None:
            catalog = await self.store.catalog()
            services = rollback.dependents_target(current, services, body.services, catalog)
            reuse = reuse if services == target["services"] else None
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
        row = await self.store.deployment(deployment_id)
        assert row is not None
        return views.deployment(row)

    async def _only_in_flight(self) -> str:
        rows = await self.store.in_flight()
        if len(rows) != 1:
            ids = ", ".join(r["deployment_id"] for r in rows) or "none"
            raise UserError("deployment_id", f"name the deployment ({len(rows)} in flight: {ids})")
        return str(rows[0]["deployment_id"])

    async def _inquiry(self, body: Inquiry) -> None:
        """An agent in doubt: send it the decision again (presumed abort if none)."""
        row = await self.store.deployment(body.deployment_id)
        state = machine.from_dict(row["machine"]) if row else None
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
        await self._publish_command(body.host_id, body_out)

    # --- automatic rollback triggers (SPEC 6.2) ------------------------------------------

    async def _takes_part(self, deployment_id: str, host: str, service: str) -> bool:
        """Whether (host, service) is a participant of the deployment: a report about any
        other changes nothing (SPEC 7)."""
        row = await self.store.deployment(deployment_id)
        return row is not None and any(
            (p["host"], p["service"]) == (host, service) for p in row["machine"]["participants"]
        )

    async def _host_failure(self, body: HealthChange | CrashLoop) -> None:
        agents = await self.store.agents()
        runs = {(a["host_id"], s["service"]) for a in agents for s in a["services"]}
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
        """Apply `event` to a deployment: persist the new state, then act on it."""
        follow_ups: list[machine.Event] = []
        async with self._lock:
            row = await self.store.deployment(deployment_id)
            if row is None:
                self._log.warning("deployment.unknown", deployment_id=deployment_id)
                return
            before = machine.from_dict(row["machine"])
            after, actions = machine.step(before, event)
            if after == before and not actions:
                return
            events: list[tuple[str, dict[str, Any]]] = (
                [] if after.phase == before.phase else [(f"deployment.{after.phase}", {})]
            )
            await self.store.save_deployment(machine.to_dict(after), events)
            _fault_points(before, after)
            for action in actions:
                follow_ups += await self._perform(row, after, action)
            if any(isinstance(a, machine.Send) and a.command == "prepare" for a in actions):
                faults.point("coordinator.prepare_sent")
            if after.phase != before.phase:
                await self._emit_deployment(deployment_id)
        for follow_up in follow_ups:
            await self.drive(deployment_id, follow_up)

    async def _perform(
        self, row: dict[str, Any], d: machine.Deployment, action: machine.Action
    ) -> list[machine.Event]:
        match action:
            case machine.Send():
                return await self._send(row, d, action)
            case machine.StartTimer():
                self._tasks.spawn(self._timer(d.id, action), f"timer:{d.id}:{action.token}")
            case machine.Finished():
                metrics.DEPLOYMENTS.labels(action.phase).inc()
                self._tasks.spawn(self.intake.start_ready(), f"dequeue:{d.id}")
                self._log.info(
                    "deployment.finished",
                    deployment_id=d.id,
                    state=action.phase,
                    reason=action.reason,
                )
        return []

    async def _timer(self, deployment_id: str, timer: machine.StartTimer) -> None:
        await asyncio.sleep(timer.seconds)
        await self.drive(deployment_id, machine.TimedOut(timer.token))

    async def _send(
        self, row: dict[str, Any], d: machine.Deployment, send: machine.Send
    ) -> list[machine.Event]:
        needs_specs = send.command in ("prepare", "revert")  # commit/abort carry no spec
        catalog = await self.store.catalog() if needs_specs else {}
        rollback = row["kind"] == "rollback"
        trusted = {a["host_id"] for a in await self.store.agents()}
        keys = [key for key in send.keys if key[0] in trusted]
        failed: list[machine.Event] = []
        for key in sorted(set(send.keys) - set(keys)):  # its key was revoked meanwhile
            self._log.warning("command.withheld", deployment_id=d.id, host_id=key[0],
                              service=key[1], command=send.command)  # fmt: skip
            if send.command == "prepare":
                failed.append(machine.Voted(key, False, "the host's key is not approved"))
        bodies = [self._command(d, send.command, key, catalog, rollback) for key in keys]
        results = await asyncio.gather(
            *(self._publish_command(key[0], body) for key, body in zip(keys, bodies, strict=True)),
            return_exceptions=True,
        )
        for key, result in zip(keys, results, strict=True):
            if isinstance(result, Unroutable | BrokerUnavailable):
                self._log.warning(
                    "command.unsent",
                    deployment_id=d.id,
                    host_id=key[0],
                    service=key[1],
                    command=send.command,
                    error=str(result),
                )
                if send.command == "prepare":
                    failed.append(machine.Voted(key, False, f"host unreachable: {result}"))
            elif isinstance(result, BaseException):
                raise result
        return failed

    def _command(
        self, d: machine.Deployment, command: str, key: Key, catalog: dict[Any, Any], rollback: bool
    ) -> Body:
        p = d.participants[key]
        if command == "prepare":
            spec = catalog[(p.service, p.version)]
            return Prepare(
                deployment_id=d.id, spec=spec, from_version=p.from_version, rollback=rollback
            )
        if command == "commit":
            return Commit(deployment_id=d.id, service=p.service, version=p.version)
        if command == "abort":
            return Abort(deployment_id=d.id, service=p.service)
        to = catalog.get((p.service, p.from_version)) if p.from_version else None
        return Revert(deployment_id=d.id, service=p.service, to=to)

    async def _publish_command(self, host: str, body: Body) -> None:
        """Sign, address and date `body` for `host` (SPEC 7), and publish it."""
        now = datetime.now(UTC)
        expires = now + timedelta(seconds=self.policy.security.command_ttl)
        envelope = make(body, SENDER, to=host, sent_at=now, expires_at=expires)
        await self.broker.publish(
            topology.COMMANDS, topology.host_key(host), envelope, mandatory=True
        )

    # --- events for other systems ---------------------------------------------------------

    async def _emit_deployment(self, deployment_id: str) -> None:
        """deployment.<state>; at the end also release.<state> and, for a rollback that
        completed, deployment.rolled_back with its trigger and reason (SPEC 5, 6.2)."""
        row = await self.store.deployment(deployment_id)
        if row is None:
            return
        doc = views.deployment(row)
        await self._publish_event(f"deployment.{doc['state']}", doc)
        if row["ended_at"] is None:
            return
        rolled_back = row["kind"] == "rollback" and doc["state"] == "completed"
        if rolled_back:
            await self._publish_event("deployment.rolled_back", doc)
        releases = {r["release_id"]: r for r in await self.store.releases()}
        made = releases.get(row["release_id"])
        if made is not None and made["deployment_id"] == deployment_id:
            await self._publish_event(f"release.{made['state']}", made)
        left = releases.get(row["from_release_id"])
        if rolled_back and left is not None and left["state"] == "bad":
            await self._publish_event("release.bad", left)

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


def _fault_points(before: machine.Deployment, after: machine.Deployment) -> None:
    """The named crash points of the fault suite (no-ops unless a test asks)."""
    if before.decision is None and after.decision == "commit":
        faults.point("coordinator.decided")
    if after.phase == "committing" and after.step_index == 1 and before.step_index == 0:
        faults.point("coordinator.mid_commit")


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
