"""Fixtures of the agent tests: a test playing coordinator and in-process agents."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.service import Agent
from shared import signing, topology
from shared.config import AgentSettings, BrokerSettings
from shared.messages import Body, Envelope, make
from shared.transport import Broker, Delivery
from tests.agent.helpers import eventually
from tests.support.artifacts import free_port
from tests.support.procs import Procs

B = TypeVar("B", bound=Body)
HOST = "h1"


@dataclass
class Coordinator:
    """The test plays coordinator: it declares HOST's queue (as the real one does),
    collects reports and sends HOST commands signed with the coordinator's key."""

    broker: Broker
    reports: list[Envelope] = field(default_factory=list)

    async def start(self) -> None:
        await self.broker.declare(
            topology.coordinator_queue(), topology.heartbeats_queue(), topology.agent_queue(HOST)
        )
        await self.broker.consume(topology.COORDINATOR_QUEUE, self._on_report)
        await self.broker.consume(topology.HEARTBEATS_QUEUE, self._on_report)

    async def _on_report(self, delivery: Delivery) -> None:
        self.reports.append(delivery.envelope)

    async def send(self, body: Body, envelope: Envelope | None = None) -> Envelope:
        """Publish `envelope` (default: a fresh command for HOST, valid for a minute);
        the broker signs it."""
        envelope = envelope or command(body)
        await self.broker.publish(
            topology.COMMANDS, topology.host_key(HOST), envelope, mandatory=True
        )
        return envelope


    def bodies(self, kind: type[B], **match: Any) -> list[B]:
        found = [e.body for e in self.reports if isinstance(e.body, kind)]
        return [b for b in found if all(getattr(b, k) == v for k, v in match.items())]

    async def wait(self, kind: type[B], count: int = 1, timeout: float = 20, **match: Any) -> B:
        """The `count`-th report of `kind` whose fields equal `match`."""
        what = f"{count} x {kind.__name__} {match}"
        found = await eventually(
            lambda: len(self.bodies(kind, **match)) >= count, what, timeout=timeout
        )
        assert found
        return self.bodies(kind, **match)[count - 1]


def command(body: Body, host: str = HOST, ttl: float = 60.0) -> Envelope:
    """A command envelope as the coordinator makes one: addressed and expiring."""
    now = datetime.now(UTC)
    return make(body, "coordinator", to=host, sent_at=now, expires_at=now + timedelta(seconds=ttl))


@dataclass
class Fleet:
    """Agents for HOST sharing one state dir; stopped (services left running) at teardown."""

    amqp_url: str
    state_dir: Path
    port: int
    trusted: Ed25519PrivateKey
    agents: list[Agent] = field(default_factory=list)

    @property
    def labels(self) -> dict[str, str]:
        return {"role": "web", "demo_port": str(self.port)}

    async def start_agent(self, **settings: Any) -> Agent:
        """An agent for HOST; `settings` override the fast test AgentSettings."""
        fast: dict[str, Any] = {"heartbeat_interval": 0.5, "stop_grace": 3, "keep_releases": 3}
        agent = Agent(
            HOST,
            self.labels,
            self.state_dir,
            BrokerSettings(amqp_url=self.amqp_url),
            AgentSettings(**{**fast, **settings}),
            self.trusted.public_key(),
        )
        self.agents.append(agent)
        await agent.start()
        return agent

    async def stop_agent(self, agent: Agent) -> None:
        self.agents.remove(agent)
        await agent.stop()


@pytest.fixture
async def coordinator(broker: Broker, coordinator_key: Ed25519PrivateKey) -> Coordinator:
    broker.signer = signing.Signer(coordinator_key)
    c = Coordinator(broker)
    await c.start()
    return c


@pytest.fixture
async def fleet(
    amqp_url: str, tmp_path: Path, procs: Procs, coordinator_key: Ed25519PrivateKey
) -> AsyncIterator[Fleet]:
    f = Fleet(amqp_url, tmp_path / "state", free_port(), coordinator_key)
    yield f
    for agent in list(f.agents):
        await f.stop_agent(agent)
