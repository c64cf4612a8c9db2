"""What the coordinator does with agents' reports and with alerts.

The coordinator's handler table (coordinator.service) routes each report kind here
once the enrollment gate admitted it, and each alert from lockstep.alerts: a hello or
a heartbeat updates what a host runs; a vote or a step result drives its deployment
(`Deployments.drive`); an agent in doubt is told the decision again; a health failure,
a crash loop or an alert may fail a deployment in flight or start an automatic
rollback (SPEC 6.2), as `coordinator.triggers` decides. A report about a pair that is
not a participant, or a service the host does not run, changes nothing (SPEC 7).
"""

from __future__ import annotations

import asyncio
import time

from coordinator import machine, triggers
from coordinator.liveness import Liveness
from coordinator.requests import Requests, body
from coordinator.runtime import Deployments
from coordinator.store import Store
from shared import log
from shared.config import CoordinatorSettings
from shared.errors import BrokerUnavailable
from shared.messages import (
    Abort,
    AgentHello,
    Alert,
    Body,
    Commit,
    CrashLoop,
    Health,
    HealthChange,
    Heartbeat,
    Inquiry,
    Ping,
    RollbackRequest,
    StepResult,
    Vote,
)
from shared.tasks import TaskGroup
from shared.transport import Delivery, Unroutable

TELLING = 200
"""Pings telling hosts their heartbeat period published at once (a fleet-wide change)."""


class Reactions:
    def __init__(
        self, store: Store, liveness: Liveness, deployments: Deployments, requests: Requests,
        settings: CoordinatorSettings, tasks: TaskGroup,
    ) -> None:  # fmt: skip
        self.store = store
        self.liveness = liveness
        self.deployments = deployments
        self.requests = requests
        self.settings = settings
        self._tasks = tasks
        self._log = log.get("coordinator")

    async def on_hello(self, delivery: Delivery) -> None:
        hello = body(delivery, AgentHello)
        services = [s.model_dump() for s in hello.services]
        sent_at = delivery.envelope.sent_at.timestamp()
        await self.store.agent_seen(hello.host_id, services, hello.labels, sent_at)
        self.liveness.hello(hello.host_id, hello.services)
        period = self.liveness.period  # a new agent beats at its own setting: tell it
        if period is not None and period != self.settings.heartbeat_interval:
            self.tell([hello.host_id], period)

    async def on_heartbeat(self, delivery: Delivery) -> None:
        beat = body(delivery, Heartbeat)
        sent_at = delivery.envelope.sent_at.timestamp()
        host = beat.host_id
        if await self.liveness.beat(host, sent_at, beat.services, beat.labels, beat.interval):
            period = self.liveness.period
            assert period is not None  # beat() asks for a telling only once it is sized
            self.tell([host], period)

    def tell(self, hosts: list[str], period: float) -> None:
        """Tell `hosts` the period to beat at (in the background: heartbeats and sweeps
        never wait for it), TELLING at a time."""
        for host in hosts:
            self.liveness.told(host, period)
        for start in range(0, len(hosts), TELLING):
            chunk = hosts[start : start + TELLING]
            self._tasks.spawn(self._tell(chunk, period), f"pace:{chunk[0]}+{len(chunk)}")

    async def _tell(self, hosts: list[str], period: float) -> None:
        ping = Ping(heartbeat_interval=period)
        results = await asyncio.gather(
            *(self.deployments.publish_command(h, ping) for h in hosts), return_exceptions=True
        )
        for host, result in zip(hosts, results, strict=True):
            if isinstance(result, Unroutable | BrokerUnavailable):  # told again later
                self.liveness.untold(host, period)
                self._log.warning("heartbeat.untold", host_id=host, period=period,
                                  error=str(result))  # fmt: skip
            elif isinstance(result, BaseException):
                raise result

    async def on_vote(self, delivery: Delivery) -> None:
        vote = body(delivery, Vote)
        event = machine.Voted((vote.host_id, vote.service), vote.yes, vote.reason, vote.version)
        await self.deployments.drive(vote.deployment_id, event)

    async def on_step(self, delivery: Delivery) -> None:
        """What runs after a step, recorded; then the step drives its deployment."""
        result = body(delivery, StepResult)
        if not await self._takes_part(result.deployment_id, result.host_id, result.service):
            self._log.warning(
                "report.unrelated", kind=result.KIND, host_id=result.host_id,
                deployment_id=result.deployment_id, service=result.service,
            )  # fmt: skip
            return
        health: Health = "healthy" if result.ok else "unhealthy"
        sent_at = delivery.envelope.sent_at.timestamp()
        view = (result.host_id, result.service, result.running, health, sent_at)
        if not self.liveness.step(*view):  # a host not yet in memory: straight to the store
            await self.store.agent_service(*view)
            self.liveness.forget(result.host_id)
        key = (result.host_id, result.service)
        event = machine.StepDone(key, result.step, result.ok, result.reason)
        await self.deployments.drive(result.deployment_id, event)

    async def on_inquiry(self, delivery: Delivery) -> None:
        """An agent in doubt: send it the decision again (presumed abort if none)."""
        asked = body(delivery, Inquiry)
        state = await self.deployments.state(asked.deployment_id)
        answer = triggers.on_inquiry(state, (asked.host_id, asked.service))
        if answer is None:
            return  # its batch has not come yet: the commit (or abort) will follow
        told: Body = Abort(deployment_id=asked.deployment_id, service=asked.service)
        if answer == "commit" and state is not None:
            version = state.participants[(asked.host_id, asked.service)].version
            told = Commit(deployment_id=asked.deployment_id, service=asked.service,
                          version=version)  # fmt: skip
        self._log.info("inquiry.answered", deployment_id=asked.deployment_id,
                       host_id=asked.host_id, command=told.KIND)  # fmt: skip
        await self.deployments.publish_command(asked.host_id, told)

    async def on_failure(self, delivery: Delivery) -> None:
        """A health change or a crash loop: recorded; one of a participant that committed
        fails its deployment (compensation)."""
        failure = delivery.envelope.body
        assert isinstance(failure, HealthChange | CrashLoop)
        agents = await self.liveness.agents()
        runs = {(a.host_id, s.service) for a in agents for s in a.services}
        if (failure.host_id, failure.service) not in runs:
            self._log.warning("report.unrelated", kind=failure.KIND, host_id=failure.host_id,
                              service=failure.service)  # fmt: skip
            return  # a service the host does not run: changes nothing
        await self.store.add_events(None, [(failure.KIND, failure.model_dump())])
        if isinstance(failure, HealthChange) and failure.health != "unhealthy":
            return
        deployment_id = triggers.on_host_failure(
            failure.host_id, failure.service, failure.version, await self.store.in_flight()
        )
        if deployment_id is None:
            return
        if isinstance(failure, CrashLoop):
            cause, what = "crash_loop", f"exited {failure.exits} times in {failure.window:g}s"
        else:
            cause, what = "health", f"unhealthy: {failure.reason}"
        reason = f"{failure.service} {failure.version} on {failure.host_id} {what}"
        await self.deployments.drive(deployment_id, machine.Failed(reason, cause))  # type: ignore[arg-type]

    async def on_alert(self, delivery: Delivery) -> None:
        """An alert: ignored (recorded why), fails a deploy in flight, or rolls back."""
        alert = body(delivery, Alert)
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
                await self.deployments.drive(
                    decision.deployment_id, machine.Failed(reason, "alert")
                )
            case triggers.Rollback():
                await self.store.add_events(None, [("alert.received", record)])
                request = RollbackRequest(services=list(decision.services))
                await self.requests.rollback(
                    delivery.envelope.id, request, trigger="alert", reason=reason
                )

    async def _takes_part(self, deployment_id: str, host: str, service: str) -> bool:
        """Whether (host, service) is a participant of the deployment: a report about any
        other changes nothing (SPEC 7)."""
        state = await self.deployments.state(deployment_id)
        return state is not None and (host, service) in state.participants
