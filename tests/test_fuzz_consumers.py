"""Fuzzing both consumers against the real broker (SPEC 6.5, 7; invariant I6).

Arbitrary bytes, arbitrary (and envelope-shaped) JSON, and mutations of valid signed
envelopes are published with plain aio-pika, the way any other system could: to
`lockstep.commands` key `host.h1` for an in-process `agent.service.Agent`, and to
`lockstep.reports`, `lockstep.requests` and `lockstep.alerts` for an in-process
`coordinator.service.Coordinator`. For every example:

- the message is dead-lettered into `lockstep.dead` with its body and a non-empty
  `x-lockstep-reason` header (not dropped, not requeued, not the queue's own
  dead-lettering, which would carry no reason);
- nothing escapes the consumer: a valid message published right after is still
  handled (a signed Ping gets a heartbeat; a `query` request gets a reply). Each
  consumer handles its queue in order, so that answer also means the example was
  handled, and its dead letter (published and confirmed before the ack) is waiting;
- nothing changed: every table of the consumer's SQLite store is as it was.

The mutations and the oracle are those of tests/unit/test_fuzz_decode.py: an example
the pure decode-and-verify path would accept (a mutation that decodes to the same
signed envelope, a request or an alert that happens to be valid) is not one this test
is about, and is discarded with `assume`.

How hypothesis meets asyncio here: the tests are `async def` and decorated with
`@given`; pytest-asyncio (asyncio_mode=auto) runs each example's coroutine on the
test's event loop, the same loop its async fixtures ran on. So the vhost, the broker
connections and the agent or coordinator are made once per test, not per example, and
every example reuses them: hence the suppressed `function_scoped_fixture` health check
(sharing them is the point; each example leaves them as it found them, which is
exactly what it asserts). Examples are bounded (`max_examples` per test, no deadline:
each one is a broker round trip), for a total of well under a minute.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractQueue
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from agent.service import DB_NAME, Agent
from agent.trust import check_command
from coordinator.enrollment import Policy
from coordinator.service import Coordinator
from shared import signing, topology
from shared.config import BrokerSettings, CoordinatorSettings, SecuritySettings
from shared.errors import DecodeError, Refused
from shared.messages import (
    AgentHello,
    Body,
    CrashLoop,
    Envelope,
    HealthChange,
    Heartbeat,
    Inquiry,
    Ping,
    QueryRequest,
    StepResult,
    Vote,
    decode,
    decode_alert,
    make,
)
from shared.transport import Broker
from tests.agent.conftest import HOST, Fleet, command
from tests.agent.conftest import Coordinator as StandIn
from tests.agent.helpers import eventually
from tests.support.artifacts import free_port
from tests.unit.test_fuzz_decode import (
    KINDS,
    command_bodies,
    ids,
    json_values,
    mutated,
    names,
    versions,
)

CAP = BrokerSettings().max_message_bytes
AGENT_HOST = "fuzzed-host"
"""The host the coordinator knows (approved key) and fuzzed reports claim to be."""

FUZZ = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

raw_bytes = st.binary(max_size=512)
envelope_shaped = st.fixed_dictionaries(
    {},
    optional={
        "kind": st.sampled_from(KINDS) | st.text(max_size=10),
        "id": ids | json_values,
        "sent_at": st.datetimes(timezones=st.just(UTC)).map(datetime.isoformat) | json_values,
        "expires_at": st.none() | st.text(max_size=30),
        "sender": st.sampled_from(["coordinator", f"agent:{AGENT_HOST}"]) | json_values,
        "to": st.sampled_from([HOST, AGENT_HOST]) | json_values,
        "body": st.dictionaries(st.text(max_size=12), json_values, max_size=5),
        "sig": st.none() | st.text(max_size=90),
    },
)
arbitrary_json = (json_values | envelope_shaped).map(lambda v: json.dumps(v).encode())


def _tables(db: Path) -> dict[str, list[Any]]:
    """Every row of every table of a SQLite store (read-only)."""
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {n: conn.execute(f'SELECT * FROM "{n}"').fetchall() for n in names}


@dataclass
class Wire:
    """Plain aio-pika, as any other system on the broker: publishes raw bodies and
    drains lockstep.dead (declared by whoever declares the topology)."""

    channel: AbstractChannel
    _dead: AbstractQueue | None = None

    async def publish(self, exchange: str, key: str, raw: bytes) -> None:
        target = await self.channel.get_exchange(exchange)
        await target.publish(aio_pika.Message(raw, delivery_mode=2), key)

    async def dead_letters(self, at_least: int = 0, timeout: float = 10) -> list[tuple[bytes, str]]:
        """(body, reason header) of what lockstep.dead holds, once it holds `at_least`."""
        if self._dead is None:
            self._dead = await self.channel.get_queue(topology.DEAD_QUEUE)
        found: list[tuple[bytes, str]] = []
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            message = await self._dead.get(fail=False)
            if message is not None:
                await message.ack()
                reason = (message.headers or {}).get(topology.REASON_HEADER)
                found.append((message.body, str(reason) if reason else ""))
                continue
            if len(found) >= at_least or asyncio.get_running_loop().time() > deadline:
                return found
            await asyncio.sleep(0.02)  # poll interval within the deadline


@pytest.fixture
async def wire(amqp_url: str, request: pytest.FixtureRequest) -> AsyncIterator[Wire]:
    connection = await aio_pika.connect(
        amqp_url, client_properties={"connection_name": f"fuzz:{request.node.nodeid}"}
    )
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        yield Wire(channel)


def _refused_once(dead: list[tuple[bytes, str]], raw: bytes) -> str:
    """The one dead letter `raw` made: its reason."""
    assert [body for body, _ in dead] == [raw[:CAP]], f"dead-lettered: {dead!r}"
    reason = dead[0][1]
    assert reason, "dead-lettered without a reason"
    return reason


# --- the agent ----------------------------------------------------------------------


@dataclass
class AgentRig:
    stand_in: StandIn
    agent: Agent
    wire: Wire
    key: Ed25519PrivateKey

    def sign(self, body: Body) -> Envelope:
        return signing.Signer(self.key).sign(command(body))

    async def throw(self, raw: bytes) -> str:
        """Publish `raw` as a command for HOST: the reason it was dead-lettered with."""
        db = self.agent.state_dir / DB_NAME
        before = _tables(db)
        beats = len(self.stand_in.bodies(Heartbeat))
        await self.wire.publish(topology.COMMANDS, topology.host_key(HOST), raw)
        await self.stand_in.send(Ping())  # signed, addressed, fresh
        await self.stand_in.wait(Heartbeat, count=beats + 1, timeout=10)
        reason = _refused_once(await self.wire.dead_letters(at_least=1), raw)
        assert _tables(db) == before, "a refused command changed the agent's store"
        assert not (self.agent.state_dir / "services").exists(), "a refused command left files"
        return reason


@pytest.fixture
async def agent_rig(
    broker: Broker, wire: Wire, amqp_url: str, tmp_path: Path, coordinator_key: Ed25519PrivateKey
) -> AsyncIterator[AgentRig]:
    broker.signer = signing.Signer(coordinator_key)
    stand_in = StandIn(broker)
    await stand_in.start()
    fleet = Fleet(amqp_url, tmp_path / "state", free_port(), coordinator_key)
    agent = await fleet.start_agent(heartbeat_interval=3600)  # heartbeats answer pings only
    await stand_in.wait(AgentHello)
    assert await wire.dead_letters() == []
    yield AgentRig(stand_in, agent, wire, coordinator_key)
    await fleet.stop_agent(agent)


def _agent_would_run(raw: bytes, rig: AgentRig, original: Envelope | None = None) -> bool:
    """Whether the agent's pure checks pass (then `raw` is the same command as `original`)."""
    try:
        envelope = decode(raw)
        check_command(envelope, HOST, rig.key.public_key(), datetime.now(UTC), 30.0)
    except (DecodeError, Refused):
        return False
    assert original is not None, f"random input made a valid command: {raw!r}"
    assert signing.canonical(envelope) == signing.canonical(original)
    return True


@FUZZ
@given(raw=raw_bytes)
@example(raw=b"")
@example(raw=b"{" * (CAP + 1))
async def test_agent_dead_letters_arbitrary_bytes_and_keeps_serving(
    agent_rig: AgentRig, raw: bytes
) -> None:
    assert not _agent_would_run(raw, agent_rig)
    await agent_rig.throw(raw)


@FUZZ
@given(raw=arbitrary_json)
async def test_agent_dead_letters_arbitrary_json_and_keeps_serving(
    agent_rig: AgentRig, raw: bytes
) -> None:
    assert not _agent_would_run(raw, agent_rig)
    await agent_rig.throw(raw)


@FUZZ
@given(data=st.data(), body=command_bodies)
async def test_agent_refuses_every_mutation_of_a_signed_command_before_touching_the_host(
    agent_rig: AgentRig, data: st.DataObject, body: Body
) -> None:
    original = agent_rig.sign(body)
    raw = data.draw(mutated(original, command_bodies, agent_rig.sign), label="mutated")
    assume(not _agent_would_run(raw, agent_rig, original))
    reason = await agent_rig.throw(raw)
    assert reason.split(":")[0] != "replayed", "a forged command was checked against the log"


# --- the coordinator ------------------------------------------------------------------

report_bodies: st.SearchStrategy[Body] = st.one_of(
    st.builds(Vote, deployment_id=ids, host_id=st.just(AGENT_HOST), service=names,
              version=versions, yes=st.booleans()),
    st.builds(StepResult, deployment_id=ids, host_id=st.just(AGENT_HOST), service=names,
              step=st.sampled_from(["commit", "revert", "abort"]), ok=st.booleans(),
              running=st.none() | versions),
    st.builds(Heartbeat, host_id=st.just(AGENT_HOST), services=st.just([])),
    st.builds(HealthChange, host_id=st.just(AGENT_HOST), service=names,
              version=st.none() | versions, health=st.sampled_from(["healthy", "unhealthy"])),
    st.builds(CrashLoop, host_id=st.just(AGENT_HOST), service=names, version=versions,
              exits=st.integers(1, 9), window=st.floats(1, 60)),
    st.builds(Inquiry, deployment_id=ids, host_id=st.just(AGENT_HOST), service=names),
)  # fmt: skip

targets = st.one_of(
    st.just((topology.REPORTS, topology.REPORTS_KEY)),
    st.sampled_from(topology.REQUEST_KEYS).map(lambda key: (topology.REQUESTS, key)),
    st.sampled_from(["orders.critical", "payments.warning", "x"]).map(
        lambda key: (topology.ALERTS, key)
    ),
)


@dataclass
class CoordinatorRig:
    coordinator: Coordinator
    client: Broker
    wire: Wire
    key: Ed25519PrivateKey
    """The enrolled (approved) agent's key."""

    def sign(self, body: Body) -> Envelope:
        return signing.Signer(self.key).sign(make(body, f"agent:{AGENT_HOST}"))

    async def throw(self, exchange: str, key: str, raw: bytes) -> str:
        """Publish `raw` to `exchange`/`key`: the reason it was dead-lettered with."""
        before = _tables(self.coordinator.db_path)
        await self.wire.publish(exchange, key, raw)
        reply = await self.client.request("query", QueryRequest(what="status"), wait=10)
        assert reply.ok, reply
        reason = _refused_once(await self.wire.dead_letters(at_least=1), raw)
        assert _tables(self.coordinator.db_path) == before, "a refused message changed the store"
        return reason


@pytest.fixture
async def coordinator_rig(
    amqp_url: str, wire: Wire, tmp_path: Path, coordinator_key: Ed25519PrivateKey,
    request: pytest.FixtureRequest,
) -> AsyncIterator[CoordinatorRig]:  # fmt: skip
    settings = BrokerSettings(amqp_url=amqp_url)
    policy = Policy(security=SecuritySettings(agent_users="shared"), auto_approve=True)
    coordinator = Coordinator(
        tmp_path / "coordinator.db", settings, CoordinatorSettings(heartbeat_interval=3600),
        coordinator_key, policy,
    )  # fmt: skip
    await coordinator.start()
    key = signing.generate()
    client = Broker(settings, f"test:{request.node.nodeid}", signer=signing.Signer(key))
    await client.connect()
    try:
        hello = AgentHello(host_id=AGENT_HOST, labels={}, services=[],
                           public_key=signing.public_text(key.public_key()))  # fmt: skip
        await client.publish(
            topology.REPORTS, topology.REPORTS_KEY, make(hello, f"agent:{AGENT_HOST}")
        )
        known = await eventually(lambda: coordinator.store.known_key(AGENT_HOST), "enrollment")
        assert known.state == "approved"
        assert await wire.dead_letters() == []
        yield CoordinatorRig(coordinator, client, wire, key)
    finally:
        await client.close()
        await coordinator.stop()


def _coordinator_would_take(exchange: str, raw: bytes) -> bool:
    """Whether `raw` passes the transport's decode and kind checks for `exchange` and is
    not a report (every report must be signed by an approved key: none here is)."""
    try:
        envelope = decode_alert(raw) if exchange == topology.ALERTS else decode(raw)
    except DecodeError:
        return False
    return envelope.kind in topology.ACCEPTS[exchange] and exchange != topology.REPORTS


@FUZZ
@given(target=targets, raw=raw_bytes)
@example(target=(topology.REPORTS, topology.REPORTS_KEY), raw=b"{" * (CAP + 1))
async def test_coordinator_dead_letters_arbitrary_bytes_and_keeps_serving(
    coordinator_rig: CoordinatorRig, target: tuple[str, str], raw: bytes
) -> None:
    assert not _coordinator_would_take(target[0], raw)
    await coordinator_rig.throw(*target, raw)


@FUZZ
@given(target=targets, raw=arbitrary_json)
async def test_coordinator_dead_letters_arbitrary_json_and_keeps_serving(
    coordinator_rig: CoordinatorRig, target: tuple[str, str], raw: bytes
) -> None:
    assume(not _coordinator_would_take(target[0], raw))
    await coordinator_rig.throw(*target, raw)


def _admitted(raw: bytes, original: Envelope, rig: CoordinatorRig) -> bool:
    """Whether `raw` is `original` itself (then the coordinator rightly acts on it)."""
    try:
        envelope = decode(raw)
        signing.check(envelope, rig.key.public_key())
    except (DecodeError, Refused):
        return False
    return signing.canonical(envelope) == signing.canonical(original)


@FUZZ
@given(data=st.data(), body=report_bodies)
async def test_coordinator_refuses_every_mutation_of_a_signed_report(
    coordinator_rig: CoordinatorRig, data: st.DataObject, body: Body
) -> None:
    original = coordinator_rig.sign(body)
    raw = data.draw(mutated(original, report_bodies, coordinator_rig.sign), label="mutated")
    assume(not _admitted(raw, original, coordinator_rig))
    await coordinator_rig.throw(topology.REPORTS, topology.REPORTS_KEY, raw)
