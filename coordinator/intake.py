"""Turning requests into deployments: validate, queue behind overlapping work, start.

Called by the coordinator loop for deploy, rollback and convergence requests, and
again whenever a deployment ends. Every request is resolved and planned at once (bad
input is refused before anything is stored or sent), then stored `queued` with its
lock set, then `start_ready` starts every queued deployment whose locks are free, in
FIFO order. Locks are not rows of their own: they are derived from the deployments in
flight, so a coordinator restart can never leave a lock that nothing holds.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from pydantic import BaseModel, ConfigDict

from coordinator import convergence, machine, views
from coordinator.liveness import Liveness
from coordinator.planner import AgentInfo, Plan, plan
from coordinator.records import DeploymentRecord
from coordinator.resolver import resolve
from coordinator.store import Store
from shared import log
from shared.errors import UserError
from shared.specs import Strategy


class Request(BaseModel):
    """What was asked; stored with a queued deployment and planned when it starts."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    services: dict[str, str]
    strategy: Strategy = Strategy()
    kind: str = "deploy"
    """deploy, rollback or converge."""
    trigger: str = "operator"
    release_id: int | None = None
    """An existing release this returns to (rollbacks, convergence)."""
    reason: str = ""
    host: str | None = None
    """Convergence, as first stored: the one host to bring to the current release."""
    hosts: tuple[str, ...] = ()
    """Convergence: the hosts to bring to the current release, which all need the same
    change from the same versions (`convergence.groups`)."""
    queue: bool = True
    """False: refuse rather than wait behind an overlapping deployment."""
    requested_by: str = ""
    """The broker user who asked (validated by the broker); empty for automatic ones."""


class Intake:
    def __init__(
        self, store: Store, liveness: Liveness, lost_after: views.LostAfter,
        start: Callable[[str], None],
    ) -> None:
        self.store = store
        self.liveness = liveness
        self.lost_after = lost_after
        self._start = start
        self._lock = asyncio.Lock()
        self._log = log.get("intake")

    async def submit(
        self, request_id: str, request: Request, dry_run: bool = False
    ) -> dict[str, Any]:
        """Accept `request` durably (idempotent by `request_id`); its deployment document."""
        earlier = await self.store.deployment_by_request(request_id)
        if earlier is not None:
            return views.deployment(earlier)
        target, the_plan, catalog = await self._plan(request)
        if dry_run:
            return {"services": target, "plan": the_plan.to_dict(),
                    "strategy": request.strategy.model_dump(mode="json")}  # fmt: skip
        # What it names, not only what differs now: it is planned again when it starts.
        held = convergence.locks({*the_plan.changed, *request.services}, target, catalog)
        deployment_id = uuid.uuid4().hex[:12]
        async with self._lock:
            busy = await self.held()
            if held & busy and not request.queue:
                raise UserError("services", f"{', '.join(sorted(held & busy))} "
                                "are being deployed; not queued (--no-queue)")  # fmt: skip
            waiting = machine.queued(deployment_id, request.strategy, request.reason)
            await self.store.queue_deployment(
                deployment_id=deployment_id, request_id=request_id, trigger=request.trigger,
                kind=request.kind, target=target, request=request.model_dump(mode="json"),
                locks=sorted(held), machine=waiting,
                requested_by=request.requested_by,
            )  # fmt: skip
            await self._start_ready()
        row = await self.store.deployment(deployment_id)
        assert row is not None
        return views.deployment(row)

    async def start_ready(self) -> None:
        """Start every queued deployment whose locks are free, oldest first."""
        async with self._lock:
            await self._start_ready()

    async def held(self) -> set[str]:
        """The services locked by the deployments in flight or queued."""
        records = await self.store.in_flight(participants=False)
        return {name for record in records for name in record.locks}

    async def _start_ready(self) -> None:
        records = await self.store.in_flight(participants=False)
        held = {n for r in records if r.state != "queued" for n in r.locks}
        for record in sorted((r for r in records if r.state == "queued"), key=_age):
            locks = set(record.locks)
            if locks & held:
                held |= locks  # FIFO: a later overlapping request waits behind this one
                continue
            if await self._begin(record):
                held |= locks

    async def _begin(self, record: DeploymentRecord) -> bool:
        """Plan and start a queued deployment; False if it could not start (it is aborted)."""
        deployment_id = record.id
        request = Request.model_validate(record.request)
        try:
            target, the_plan, _ = await self._plan(request)
        except UserError as e:
            unstarted = replace(machine.queued(deployment_id, request.strategy),
                                phase="aborted", reason=f"could not start: {e}")  # fmt: skip
            await self.store.save_deployment(unstarted, [("deployment.aborted", {})])
            return False
        current_id, _ = await self.store.current_release()
        release_id = request.release_id
        if not the_plan.changed or request.kind == "converge":
            release_id = current_id
        steps = [
            [machine.Participant(p.host, p.service, p.version, p.from_version) for p in batch]
            for wave in the_plan.waves
            for batch in wave.batches
        ]
        state = machine.new(
            deployment_id, request.strategy, steps, dict(the_plan.rank), request.reason
        )
        await self.store.start_deployment(
            deployment_id=deployment_id, target=target, from_release_id=current_id,
            release_id=release_id, plan=the_plan.to_dict(), machine=state,
        )  # fmt: skip
        self._log.info("deployment.started", deployment_id=deployment_id, kind=request.kind,
                       trigger=request.trigger, services=target)  # fmt: skip
        self._start(deployment_id)
        return True

    async def _plan(self, request: Request) -> tuple[dict[str, str], Plan, Any]:
        catalog = await self.store.catalog()
        _, current = await self.store.current_release()
        agents = await self.liveness.agents()
        now = self.liveness.now()
        running = {a.host_id: a.running() for a in agents}
        live = [AgentInfo(a.host_id, a.labels, views.host_alive(a, now, self.lost_after))
                for a in agents]  # fmt: skip
        if request.kind == "converge":
            hosts = request.hosts or (request.host or "",)
            target = dict(current)
            runs = running.get(hosts[0], {})  # the group's hosts all run the same of these
            base = {**current, **{s: v for s, v in runs.items() if s in request.services}}
            for name in request.services:
                if runs.get(name) is None:
                    base.pop(name, None)
            live = [a for a in live if a.host_id in hosts]
            the_plan = plan(base, target, catalog, live, request.strategy, running)
            return target, the_plan, catalog
        target = resolve(current, request.services, catalog)
        the_plan = plan(current, target, catalog, live, request.strategy, running,
                        consumers_first=request.kind == "rollback")  # fmt: skip
        return target, the_plan, catalog


def _age(record: DeploymentRecord) -> float:
    return record.started_at
