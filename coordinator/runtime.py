"""The coordinator's deployments in flight: typed state in memory, one lock each.

The coordinator's handlers call `Deployments.drive(id, event)` for every vote, step
result, timer and operator action. The state of each deployment in flight lives here
(loaded from the store once), guarded by a lock of its own, so deployments never wait
for each other. Events that arrive while a deployment's lock is held are queued and
applied together by the holder: the pure machine steps each, the store writes the
deployment's header and only the participant rows that changed in ONE transaction
(group commit: one fsync for a batch of votes, not one per vote), and only then are
the resulting commands published, concurrently. The store therefore always knows at
least as much as any agent was told (the decision is durable before a commit is sent).

Timers are durable deadlines: a timer's deadline is saved with the state that started
it, and when the process starts again (`Recovered` starts the timers of the phase it
was in) each fires at its first deadline, not a full period after the restart. The
last deployments that ended stay in memory, so the reports that trail one (late
votes, repeated results, inquiries) are answered without reading the store.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from coordinator import machine
from coordinator.machine import Key
from coordinator.records import DeploymentRecord
from coordinator.store import Store
from shared import faults, log, metrics, topology
from shared.errors import BrokerUnavailable
from shared.messages import Abort, Body, Commit, Prepare, Revert, make
from shared.tasks import TaskGroup
from shared.transport import Broker, Unroutable

ENDED_KEPT = 64
"""How many ended deployments stay in memory."""
OnPhase = Callable[[str], Awaitable[None]]
Pending = tuple[machine.Event, "asyncio.Future[None] | None"]
"""An event waiting to be applied, and the future its sender awaits (None: a follow-up)."""


@dataclass
class Live:
    """One deployment in flight: its record, its machine state, its lock and the events
    waiting for the lock's holder."""

    record: DeploymentRecord
    state: machine.Deployment
    deadlines: dict[str, float]
    """When each timer it started fires (token -> time), as saved."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    pending: list[Pending] = field(default_factory=list)


class Deployments:
    def __init__(
        self, store: Store, broker: Broker, tasks: TaskGroup, command_ttl: float,
        on_phase: OnPhase, on_finished: Callable[[machine.Deployment], Coroutine[Any, Any, None]],
    ) -> None:  # fmt: skip
        self.store = store
        self.broker = broker
        self.command_ttl = command_ttl
        self._tasks = tasks
        self._on_phase = on_phase
        self._on_finished = on_finished
        self._live: dict[str, Live] = {}
        self._ended: OrderedDict[str, machine.Deployment] = OrderedDict()
        self._log = log.get("deployments")

    async def drive(self, deployment_id: str, event: machine.Event) -> None:
        """Apply `event` (with whatever else waits for this deployment), persist, act."""
        if deployment_id in self._ended:
            return  # it ended: nothing changes it any more
        live = await self._load(deployment_id)
        if live is None:
            if deployment_id not in self._ended:
                self._log.warning("deployment.unknown", deployment_id=deployment_id)
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        live.pending.append((event, done))
        if live.lock.locked():
            await done  # the holder applies it with its own
            return
        async with live.lock:
            batch: list[Pending] = []
            try:
                while live.pending:
                    batch, live.pending = live.pending, []
                    live.pending += await self._apply_batch(live, batch)
            except BaseException as e:  # cancelled: nobody is left to apply what waits
                if done.done() and not done.cancelled():
                    done.exception()  # its own outcome, retrieved: it raises instead
                done.cancel()
                for _, waiting in batch + live.pending:
                    if waiting is not None and not waiting.done():
                        waiting.set_exception(e)
                live.pending = []
                raise
            if live.state.done:
                self._live.pop(deployment_id, None)
                self._remember(live.state)
        await done  # its own outcome: raises if its event could not be applied

    async def _apply_batch(self, live: Live, batch: list[Pending]) -> list[Pending]:
        """Apply `batch` in one go; if that fails (nothing was saved or sent), each
        event alone, so one event that cannot be applied fails alone. Settles every
        waiter; the follow-up events to apply next."""
        try:
            follow_ups = await self._apply(live, [e for e, _ in batch])
        except Exception as e:
            if len(batch) == 1:
                if batch[0][1] is None:  # a follow-up: nobody waits to hear it failed
                    self._log.exception("deployment.event_failed", deployment_id=live.state.id,
                                        event=type(batch[0][0]).__name__)  # fmt: skip
                _settle(batch, e)
                return []
            after: list[Pending] = []
            for one in batch:
                after += await self._apply_batch(live, [one])
            return after
        _settle(batch, None)
        return [(follow_up, None) for follow_up in follow_ups]

    async def state(self, deployment_id: str) -> machine.Deployment | None:
        """The deployment's state as the machine last left it (None: no such deployment)."""
        live = self._live.get(deployment_id)
        if live is not None:
            return live.state
        if deployment_id in self._ended:
            return self._ended[deployment_id]
        record = await self.store.deployment(deployment_id)
        if record is not None and record.machine.done:
            self._remember(record.machine)
        return None if record is None else record.machine

    def _remember(self, state: machine.Deployment) -> None:
        self._ended[state.id] = state
        while len(self._ended) > ENDED_KEPT:
            self._ended.popitem(last=False)

    async def _load(self, deployment_id: str) -> Live | None:
        """The deployment in flight (loaded once); None if unknown or ended."""
        live = self._live.get(deployment_id)
        if live is None:
            record = await self.store.deployment(deployment_id)
            if record is None:
                return None
            if record.machine.done:
                self._remember(record.machine)
                return None
            deadlines = await self.store.deadlines(deployment_id)
            live = self._live.setdefault(deployment_id, Live(record, record.machine, deadlines))
        return live

    async def _apply(self, live: Live, events: list[machine.Event]) -> list[machine.Event]:
        before = state = live.state
        actions: list[machine.Action] = []
        for event in events:
            state, more = machine.step(state, event)
            actions += more
        if state == before and not actions:
            return []
        changed = [p for k, p in state.participants.items() if before.participants.get(k) is not p]
        phases: list[tuple[str, dict[str, Any]]] = (
            [] if state.phase == before.phase else [(f"deployment.{state.phase}", {})]
        )
        now = time.time()
        started = [a for a in actions if isinstance(a, machine.StartTimer)]
        timers = {a.token: now + a.seconds for a in started if a.token not in live.deadlines}
        if any(isinstance(a, machine.Send) for a in actions):
            # A command sent again (after a restart) gets its full period to be answered:
            # results queued while this process was down are read only once it consumes.
            for a in started:
                if a.token in live.deadlines:
                    live.deadlines[a.token] = max(live.deadlines[a.token], now + a.seconds)
        await self.store.save_deployment(state, phases, changed, timers)
        live.deadlines.update(timers)
        live.state = state
        _fault_points(before, state)
        # Saved: from here on nothing raises, and every action is carried out whatever
        # became of the others (a timer must start even if a send failed).
        follow_ups: list[machine.Event] = []
        for action in actions:
            try:
                follow_ups += await self._perform(live, state, action)
            except Exception:
                self._log.exception("deployment.action_failed", deployment_id=state.id,
                                    action=type(action).__name__)  # fmt: skip
        if any(isinstance(a, machine.Send) and a.command == "prepare" for a in actions):
            faults.point("coordinator.prepare_sent")
        if state.phase != before.phase:
            try:
                await self._on_phase(state.id)
            except Exception:
                self._log.exception("deployment.announce_failed", deployment_id=state.id)
        return follow_ups

    async def _perform(
        self, live: Live, d: machine.Deployment, action: machine.Action
    ) -> list[machine.Event]:
        match action:
            case machine.Send():
                return await self._send(live.record, d, action)
            case machine.StartTimer():
                due = live.deadlines[action.token]
                self._tasks.spawn(
                    self._timer(d.id, action.token, due), f"timer:{d.id}:{action.token}"
                )
            case machine.Finished():
                metrics.DEPLOYMENTS.labels(action.phase).inc()
                self._tasks.spawn(self._on_finished(d), f"finished:{d.id}")
                self._log.info("deployment.finished", deployment_id=d.id, state=action.phase,
                               reason=action.reason)  # fmt: skip
        return []

    async def _timer(self, deployment_id: str, token: str, due: float) -> None:
        await asyncio.sleep(max(0.0, due - time.time()))
        await self.drive(deployment_id, machine.TimedOut(token))

    async def _send(
        self, record: DeploymentRecord, d: machine.Deployment, send: machine.Send
    ) -> list[machine.Event]:
        """Publish one command per key, concurrently; votes for hosts it cannot reach."""
        needs_specs = send.command in ("prepare", "revert")  # commit/abort carry no spec
        catalog = await self.store.catalog() if needs_specs else {}
        rollback = record.kind == "rollback"
        trusted = await self.store.approved_hosts()
        keys = [key for key in send.keys if key[0] in trusted]
        failed: list[machine.Event] = []
        for key in sorted(set(send.keys) - set(keys)):  # its key was revoked meanwhile
            self._log.warning("command.withheld", deployment_id=d.id, host_id=key[0],
                              service=key[1], command=send.command)  # fmt: skip
            if send.command == "prepare":
                failed.append(machine.Voted(key, False, "the host's key is not approved"))
        bodies = [_command(d, send.command, key, catalog, rollback) for key in keys]
        results = await asyncio.gather(
            *(self._publish(key[0], body) for key, body in zip(keys, bodies, strict=True)),
            return_exceptions=True,
        )
        for key, result in zip(keys, results, strict=True):
            if isinstance(result, Unroutable | BrokerUnavailable):
                self._log.warning(
                    "command.unsent", deployment_id=d.id, host_id=key[0], service=key[1],
                    command=send.command, error=str(result),
                )  # fmt: skip
                if send.command == "prepare":
                    failed.append(machine.Voted(key, False, f"host unreachable: {result}"))
            elif isinstance(result, BaseException):
                raise result
        return failed

    async def _publish(self, host: str, body: Body) -> None:
        """Sign, address and date `body` for `host` (SPEC 7), and publish it."""
        now = datetime.now(UTC)
        expires = now + timedelta(seconds=self.command_ttl)
        envelope = make(body, self.broker.name, to=host, sent_at=now, expires_at=expires)
        await self.broker.publish(
            topology.COMMANDS, topology.host_key(host), envelope, mandatory=True
        )

    publish_command = _publish


def _settle(batch: list[Pending], error: Exception | None) -> None:
    for _, waiting in batch:
        if waiting is not None and not waiting.done():
            if error is None:
                waiting.set_result(None)
            else:
                waiting.set_exception(error)


def _command(
    d: machine.Deployment, command: str, key: Key, catalog: dict[Any, Any], rollback: bool
) -> Body:
    p = d.participants[key]
    if command == "prepare":
        spec = catalog[(p.service, p.version)]
        return Prepare(deployment_id=d.id, spec=spec, from_version=p.from_version,
                       rollback=rollback)  # fmt: skip
    if command == "commit":
        return Commit(deployment_id=d.id, service=p.service, version=p.version)
    if command == "abort":
        return Abort(deployment_id=d.id, service=p.service)
    to = catalog.get((p.service, p.from_version)) if p.from_version else None
    return Revert(deployment_id=d.id, service=p.service, to=to)


def _fault_points(before: machine.Deployment, after: machine.Deployment) -> None:
    """The named crash points of the fault suite (no-ops unless a test asks), reached
    once the transition is durable and before anything is sent for it."""
    if before.decision is None and after.decision == "commit":
        faults.point("coordinator.decided")
    if after.phase == "committing" and after.step_index >= 1 and before.step_index == 0:
        faults.point("coordinator.mid_commit")
