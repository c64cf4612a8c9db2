"""What the coordinator answers on lockstep.requests: register, deploy, rollback,
query, and the operator's control of deployments and agents.

The coordinator's handler table (coordinator.service) routes each request kind to a
method here, after the operators allow-list; the reply is the returned `Reply`.
Deploys and rollbacks go through `coordinator.intake` (validated, queued, started);
control of a deployment goes through the runtime (`Deployments.drive`).
"""

from __future__ import annotations

from typing import Any, TypeVar

from coordinator import machine, rollback, views
from coordinator.enrollment import Enrollment
from coordinator.intake import Intake, Request
from coordinator.liveness import Liveness
from coordinator.runtime import Deployments
from coordinator.store import Store
from shared.errors import UserError
from shared.messages import (
    Body,
    ControlRequest,
    DeployRequest,
    QueryRequest,
    RegisterRequest,
    Reply,
    RollbackRequest,
)
from shared.transport import Delivery


class Requests:
    def __init__(
        self, store: Store, intake: Intake, deployments: Deployments, liveness: Liveness,
        enrollment: Enrollment, lost_after: views.LostAfter,
    ) -> None:  # fmt: skip
        self.store = store
        self.intake = intake
        self.deployments = deployments
        self.liveness = liveness
        self.enrollment = enrollment
        self.lost_after = lost_after

    # --- the handlers: one per kind ---------------------------------------------------

    async def on_register(self, delivery: Delivery) -> Body:
        registered = await self.store.register(body(delivery, RegisterRequest).versions)
        return Reply(ok=True, data={"versions": views.registered(registered)})

    async def on_deploy(self, delivery: Delivery) -> Body:
        asked = body(delivery, DeployRequest)
        request = Request(services=asked.services, strategy=asked.strategy, queue=asked.queue,
                          requested_by=delivery.user_id or "")  # fmt: skip
        data = await self.intake.submit(delivery.envelope.id, request, asked.dry_run)
        return Reply(ok=True, data=data)

    async def on_rollback(self, delivery: Delivery) -> Body:
        asked = body(delivery, RollbackRequest)
        data = await self.rollback(delivery.envelope.id, asked, requested_by=delivery.user_id or "")
        return Reply(ok=True, data=data)

    async def on_control(self, delivery: Delivery) -> Body:
        return Reply(ok=True, data=await self.control(body(delivery, ControlRequest)))

    async def on_query(self, delivery: Delivery) -> Body:
        return Reply(ok=True, data=await self.query(body(delivery, QueryRequest)))

    # --- what they do -------------------------------------------------------------------

    async def query(self, asked: QueryRequest) -> dict[str, Any]:
        now = self.liveness.now()  # the clock the watch and the planner judge liveness by
        if asked.what == "status":
            release_id, services = await self.store.current_release()
            return views.status(
                release_id, services, await self.store.in_flight(),
                await self.liveness.agents(), now, self.lost_after, await self.store.lease(),
            )  # fmt: skip
        if asked.what == "history":
            page = await self.store.deployments(limit=asked.limit, before=asked.before)
            return views.history(page, await self.store.releases(), asked.limit)
        if asked.what == "agents":
            agents = await self.liveness.agents(approved_only=False)
            return views.agents(agents, now, self.lost_after, self.enrollment.heard)
        if asked.what == "events":
            return {"events": [views.event(e) for e in await self.store.events(asked.after)]}
        record = await self.store.deployment(asked.deployment_id or "")
        if record is None:
            raise UserError("deployment_id", f"no deployment {asked.deployment_id!r}")
        return views.deployment(record)

    async def rollback(
        self, request_id: str, asked: RollbackRequest, trigger: str = "operator",
        reason: str = "", requested_by: str = "",
    ) -> dict[str, Any]:  # fmt: skip
        """Deploy the last good (or named) release, or move back only some services."""
        releases = await self.store.releases()
        current_id, current = await self.store.current_release()
        if asked.to is not None:
            target = rollback.named(releases, asked.to, asked.force)
        else:
            found = rollback.last_good(releases, current_id)
            if found is None:
                raise UserError("rollback", "there is no earlier good release to roll back to")
            target = found
        services = dict(target.services)
        if asked.services and asked.to is None:
            catalog = await self.store.catalog()
            services = rollback.dependents_target(current, services, asked.services, catalog)
        reuse = target.id if services == target.services else None  # else: a new release
        request = Request(services=services, strategy=asked.strategy, kind="rollback",
                          trigger=trigger, release_id=reuse, reason=reason,
                          requested_by=requested_by)  # fmt: skip
        return await self.intake.submit(request_id, request)

    async def control(self, asked: ControlRequest) -> dict[str, Any]:
        """An operator's pause, resume or abort of a deployment, converge of a host, or
        approve, reject, revoke or remove of an agent's key."""
        action = asked.action
        if action in ("approve", "reject", "revoke", "remove"):
            return await self.enrollment.control(action, asked.host_id)
        if action == "converge":
            if not asked.host_id or not await self.store.set_agent(asked.host_id, overwrite=True):
                raise UserError("host", f"no agent {asked.host_id!r}")
            return {"host_id": asked.host_id, "overwrite": True}
        assert action in ("pause", "resume", "abort")
        deployment_id = asked.deployment_id or await self._only_in_flight()
        if await self.store.deployment(deployment_id) is None:
            raise UserError("deployment_id", f"no deployment {deployment_id!r}")
        await self.deployments.drive(deployment_id, machine.Control(action))
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


B = TypeVar("B", bound=Body)


def body(delivery: Delivery, kind: type[B]) -> B:
    """The delivery's body, of the kind its handler was chosen for."""
    found = delivery.envelope.body
    assert isinstance(found, kind)
    return found
