"""The agent's service loop: consume commands, run them per service, report back.

`agent.main.run` builds one `Agent` and awaits `start()`/`stop()`; tests do the same
in-process. Start-up opens the store, loads (or makes) the agent's key pair, connects,
adopts the services recorded in the store, says hello (with its public key: SPEC 7
enrollment), starts heartbeats, resumes commands received before a crash (verified
again: the log is no back door), then consumes `lockstep.agent.<host_id>` (declared by
the coordinator or `broker add-agent`; the agent declares nothing), then asks the
coordinator about every prepared transaction it holds (`agent.indoubt`). The delivery
handler verifies a command (`agent.trust`: signature, address, expiry, replay), records
it durably (`agent.store.commands`) and hands it to that service's serial worker
(`agent.workers`), so the transport acks at once (SPEC 5: commands are never held
unacked for the length of a deploy). Reports and heartbeats go out through
`agent.reporter`. A watched service that exits goes to the supervisor's crash handling,
which reports a crash loop through the reporter. `stop()` leaves every service
running: the next agent adopts them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent import driver, health, trust
from agent.driver import ProcessRecord
from agent.indoubt import InDoubt, stale_after
from agent.monitor import Monitor
from agent.releases import Releases
from agent.reporter import RETRY_MAX, Reporter
from agent.steps import Steps
from agent.store import Store
from agent.supervisor import HealthWait, ProcessDriver, Supervisor
from agent.workers import Workers, recorded
from shared import log, metrics, signing, topology
from shared.config import AgentSettings, BrokerSettings, SecuritySettings
from shared.errors import ProtocolError, TransientError
from shared.messages import (
    Abort,
    AgentHello,
    Commit,
    Envelope,
    Health,
    HealthChange,
    Ping,
    Prepare,
    Revert,
    ServiceState,
    decode,
)
from shared.tasks import TaskGroup
from shared.transport import Broker, Delivery

DB_NAME = "agent.db"
SEEN_KEPT = 7 * 24 * 3600.0
"""How long received command ids are remembered at least (twice a command's life if
that is longer), so a replay is refused as long as the command would be valid."""


class Agent:
    """One host's agent."""

    def __init__(
        self,
        host_id: str,
        labels: Mapping[str, str],
        state_dir: Path,
        broker_settings: BrokerSettings,
        agent_settings: AgentSettings,
        coordinator_key: Ed25519PublicKey,
        security: SecuritySettings | None = None,
        *,
        share: Broker | None = None,
        process_driver: ProcessDriver = driver,
        health_wait: HealthWait = health.wait_healthy,
    ) -> None:
        """`share`: a connected Broker whose connection this agent uses (default: its
        own). `process_driver`, `health_wait`: how services run and are awaited healthy
        (default: `agent.driver`, `agent.health.wait_healthy`). The three let the fleet
        benchmark host many agents in one process (tests/perf/fleet.py)."""
        self.host_id = host_id
        self.labels = dict(labels)
        self.state_dir = state_dir
        self.broker_settings = broker_settings
        self.settings = agent_settings
        self.security = security or SecuritySettings()
        self.coordinator_key = coordinator_key
        self.sender = f"agent:{host_id}"
        self.signer = signing.Signer(signing.own_key(state_dir))
        self.broker = Broker(
            broker_settings, name=self.sender, signer=self.signer,
            dead_letter_via=(topology.REPORTS, topology.DEAD_KEY), share=share,
        )  # fmt: skip
        self._process_driver = process_driver
        self._health_wait = health_wait
        self.releases = Releases(state_dir)
        self._tasks = TaskGroup(self.sender)
        self.monitor = Monitor(self._tasks, self._on_health, self._on_exit)
        self.reporter = Reporter(self.broker, host_id, self.labels, self.signer.public,
                                 agent_settings, self._states)  # fmt: skip
        self._store: Store | None = None
        self._supervisor: Supervisor | None = None
        self._workers: Workers | None = None
        self._log = log.get("agent", host_id=host_id)

    @property
    def store(self) -> Store:
        if self._store is None:
            raise RuntimeError("the agent is not started")
        return self._store

    async def start(self) -> None:
        """Open the store, connect, adopt services, say hello, then consume commands."""
        self._store = await Store.open(self.state_dir / DB_NAME)
        self._supervisor = Supervisor(
            self.host_id, self.labels, self.releases, self._store, self.monitor, self.settings,
            on_crash_loop=self.reporter.report, process_driver=self._process_driver,
            health_wait=self._health_wait,
        )  # fmt: skip
        steps = Steps(self._supervisor, self.settings)
        self._workers = Workers(
            self._tasks, self._store.commands, steps, self.reporter.report, self.host_id
        )
        indoubt = InDoubt(
            self._store, self.reporter.publish, self.host_id,
            stale_after(self.settings.heartbeat_interval),
        )  # fmt: skip
        kept = max(SEEN_KEPT, 2 * (self.security.command_ttl + self.security.clock_skew))
        await self._store.commands.forget_seen(time.time() - kept)
        await self.broker.connect()
        await self._supervisor.adopt()
        states = await self._supervisor.states()
        hello = AgentHello(host_id=self.host_id, labels=self.labels, services=states,
                           public_key=self.signer.public)  # fmt: skip
        await self.reporter.report(hello)  # retried until the topology exists
        self._log.info("agent.key", fingerprint=signing.fingerprint(self.signer.public))
        self._tasks.spawn(self.reporter.heartbeats(), "heartbeats", forever=True)
        await self._resume()
        await self._consume(topology.agent_queue_name(self.host_id))
        in_doubt = await indoubt.ask_all()
        self._tasks.spawn(indoubt.run(), "indoubt", forever=True)
        self._log.info("agent.started", labels=self.labels, services=len(states),
                       in_doubt=in_doubt)  # fmt: skip

    async def stop(self) -> None:
        """Stop consuming and working; every service keeps running."""
        if self._workers is not None:
            self._workers.stopping = True
        self.monitor.unwatch_all()
        await self._tasks.close()
        await self.broker.close()
        if self._store is not None:
            await self._store.close()
            self._store = None
        self._log.info("agent.stopped")

    async def _consume(self, queue_name: str) -> None:
        """Consume this host's queue once someone with the right to declared it."""
        delay = 0.2
        while True:
            try:
                await self.broker.consume(queue_name, self._on_delivery)
                return
            except TransientError as e:
                self._log.info("agent.waiting_for_queue", queue=queue_name, error=str(e))
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)

    async def _resume(self) -> None:
        """Run again the commands received before a restart, once verified again: the
        signature and address as on arrival, the expiry as of when it arrived (it was
        fresh then, and acked; a decision must not be lost to a long outage)."""
        for record in await self.store.commands.pending():
            logger = self._log.bind(
                command_id=record.id, step=record.step, service=record.service,
                deployment_id=record.deployment_id,
            )  # fmt: skip
            received = await self.store.commands.received_at(record.id)
            try:
                if received is None:
                    raise ProtocolError("no record of when it was received", "expired")
                self._verify(decode(record.body.encode()), datetime.fromtimestamp(received, UTC))
            except ProtocolError as e:
                logger.warning("command.refused", reason=e.reason, resumed=True)
                metrics.REFUSED.labels(e.code).inc()
                await self.store.commands.drop(record.id)
                continue
            logger.info("command.resumed")
            self._workers_or_fail().dispatch(record)

    def _verify(self, envelope: Envelope, at: datetime | None = None) -> None:
        trust.check_command(envelope, self.host_id, self.coordinator_key,
                            at or datetime.now(UTC), self.security.clock_skew)  # fmt: skip

    # --- receiving ----------------------------------------------------------------

    async def _on_delivery(self, delivery: Delivery) -> None:
        envelope = delivery.envelope
        self._verify(envelope)
        body = envelope.body
        if isinstance(body, Ping):
            if body.heartbeat_interval is None:
                await self.reporter.heartbeat()  # asked how it is
            else:  # told how often to beat: the next heartbeat says it, no sooner
                self.reporter.pace(body.heartbeat_interval, envelope.sent_at)
            return
        if not isinstance(body, Prepare | Commit | Abort | Revert):
            raise ProtocolError(f"kind: an agent does not accept {envelope.kind!r} messages")
        if await self.store.commands.seen(envelope.id):
            if delivery.redelivered:  # the broker's own redelivery (an ack was lost): once
                self._log.info("command.redelivered", command_id=envelope.id)
                return
            raise trust.replayed(envelope)
        service = body.spec.name if isinstance(body, Prepare) else body.service
        record = await self.store.commands.add(
            envelope.id, body.deployment_id, service, body.KIND, delivery.raw.decode()
        )
        if record.state == "done" and record.result is not None:
            self._log.info("command.duplicate", command_id=envelope.id, step=record.step,
                           service=service, deployment_id=body.deployment_id)  # fmt: skip
            await self.reporter.publish(recorded(record))
            return
        self._workers_or_fail().dispatch(record, body)

    def _workers_or_fail(self) -> Workers:
        if self._workers is None:
            raise RuntimeError("the agent is not started")
        return self._workers

    # --- the host's services --------------------------------------------------------

    async def _states(self) -> list[ServiceState]:
        """What runs on this host now (heartbeats carry it)."""
        return await self._supervisor_or_fail().states()

    def _supervisor_or_fail(self) -> Supervisor:
        if self._supervisor is None:
            raise RuntimeError("the agent is not started")
        return self._supervisor

    async def _on_exit(self, service: str, record: ProcessRecord, reason: str) -> None:
        await self._supervisor_or_fail().exited(service, record, reason)

    async def _on_health(self, service: str, health: Health, reason: str) -> None:
        await self.store.set_health(service, health)
        row = await self.store.service(service)
        version = row.version if row is not None else None
        change = HealthChange(
            host_id=self.host_id, service=service, version=version, health=health, reason=reason
        )
        # Retried until the broker takes it (a lost failure would let a bad release pass
        # its bake), in the background so probing goes on meanwhile.
        self._tasks.spawn(self.reporter.report(change), f"report:health:{service}")
