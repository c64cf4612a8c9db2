"""TLS to the broker: a real RabbitMQ node with a TLS listener and a CA made here.

The `tls` tests start a node of their own (tests/support/tlsbroker.py) whose only
listener is TLS, so every message below crossed TLS. The others check, without a
broker, that bad TLS settings are a `UserError` naming the setting.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shared import topology
from shared.config import BrokerSettings
from shared.errors import BrokerUnavailable, UserError
from shared.messages import QueryRequest, Reply
from shared.transport import Broker, Delivery
from shared.transport.connection import ssl_context
from tests.support.tlsbroker import CertAuthority, Issued, Node, rabbit_node, tls_listener

_REFUSED = "(?i)reset|alert|certificate"
"""How a TLS peer's refusal shows: an alert, or (TLS 1.3) the connection reset after it."""


@dataclass(frozen=True)
class TlsBroker:
    node: Node
    ca: CertAuthority
    """The CA that signed the broker's certificate (and trusted client certificates)."""
    rogue: CertAuthority
    """A CA that signed nothing the broker trusts."""

    def url(self, host: str = "localhost") -> str:
        return f"amqps://guest:guest@{host}:{self.node.port}/"


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    """One TLS-only RabbitMQ node for this module's `tls` tests (~10 s to start)."""
    pki = tmp_path_factory.mktemp("pki")
    ca, rogue = CertAuthority(pki, "lockstep"), CertAuthority(pki, "rogue")
    server = ca.issue("localhost", server=True)
    root = tmp_path_factory.mktemp("tls") / "node"
    with rabbit_node(root, "tls", tls_listener(ca.cert, server)) as node:
        yield TlsBroker(node, ca, rogue)


def _broker(request: pytest.FixtureRequest, url: str, **tls: str) -> Broker:
    settings = BrokerSettings.model_validate({"amqp_url": url, "connect_timeout": 10, **tls})
    return Broker(settings, f"test:{request.node.nodeid}")


async def _round_trip(broker: Broker) -> None:
    """A request published over TLS, consumed, answered and the reply consumed."""

    async def echo(delivery: Delivery) -> Reply:
        return Reply(ok=True, data={"echo": delivery.envelope.kind})

    await broker.declare(topology.coordinator_queue())
    await broker.consume(topology.COORDINATOR_QUEUE, echo)
    reply = await broker.request("query", QueryRequest(what="status"), wait=10)
    assert reply.ok
    assert reply.data == {"echo": "query"}


@pytest.mark.tls
@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
async def test_amqps_round_trip_verified_by_the_test_ca(
    tls_broker: TlsBroker, request: pytest.FixtureRequest, host: str
) -> None:
    broker = _broker(request, tls_broker.url(host), tls_ca=str(tls_broker.ca.cert))
    await broker.connect()
    try:
        await _round_trip(broker)
    finally:
        await broker.close()


@pytest.mark.tls
async def test_amqps_with_a_client_certificate(
    tls_broker: TlsBroker, request: pytest.FixtureRequest
) -> None:
    client = tls_broker.ca.issue("guest", server=False)
    broker = _broker(
        request,
        tls_broker.url(),
        tls_ca=str(tls_broker.ca.cert),
        tls_cert=str(client.cert),
        tls_key=str(client.key),
    )
    await broker.connect()
    try:
        await _round_trip(broker)
    finally:
        await broker.close()


@pytest.mark.tls
@pytest.mark.parametrize("trust", ["rogue CA", "system store"])
async def test_a_broker_certificate_not_signed_by_the_trusted_ca_is_refused(
    tls_broker: TlsBroker, request: pytest.FixtureRequest, trust: str
) -> None:
    tls = {"tls_ca": str(tls_broker.rogue.cert)} if trust == "rogue CA" else {}
    broker = _broker(request, tls_broker.url(), **tls)
    try:
        with pytest.raises(BrokerUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            await broker.connect()
    finally:
        await broker.close()


@pytest.mark.tls
async def test_the_broker_refuses_a_client_certificate_it_does_not_trust(
    tls_broker: TlsBroker, request: pytest.FixtureRequest
) -> None:
    client = tls_broker.rogue.issue("guest", server=False)
    broker = _broker(
        request,
        tls_broker.url(),
        tls_ca=str(tls_broker.ca.cert),
        tls_cert=str(client.cert),
        tls_key=str(client.key),
    )
    try:
        with pytest.raises(BrokerUnavailable, match=_REFUSED):
            await broker.connect()
    finally:
        await broker.close()


# --- settings, no broker ------------------------------------------------------------


@pytest.fixture
def issued(tmp_path: Path) -> tuple[CertAuthority, Issued]:
    ca = CertAuthority(tmp_path, "unit")
    return ca, ca.issue("guest", server=False)


def _context(url: str, **tls: str) -> ssl.SSLContext | None:
    settings = BrokerSettings.model_validate({"amqp_url": url, **tls})
    return ssl_context(settings)


def test_amqps_verifies_the_peer_and_its_host_name(issued: tuple[CertAuthority, Issued]) -> None:
    ca, client = issued
    full = {"tls_ca": str(ca.cert), "tls_cert": str(client.cert), "tls_key": str(client.key)}
    for tls in ({}, full):
        context = _context("amqps://broker.example/", **tls)
        assert context is not None
        assert context.verify_mode == ssl.CERT_REQUIRED
        assert context.check_hostname
    assert _context("amqp://broker.example/") is None


@pytest.mark.parametrize(
    ("url", "tls", "field"),
    [
        ("amqps://b/", {"tls_ca": "{tmp}/missing.pem"}, "LOCKSTEP_TLS_CA"),
        ("amqps://b/", {"tls_ca": "{tmp}/garbage.pem"}, "LOCKSTEP_TLS_CA"),
        ("amqps://b/", {"tls_cert": "{tmp}/missing.pem"}, "LOCKSTEP_TLS_CERT"),
        ("amqps://b/", {"tls_cert": "{tmp}/garbage.pem"}, "LOCKSTEP_TLS_CERT"),
        (
            "amqps://b/",
            {"tls_cert": "{cert}", "tls_key": "{ca}"},
            "LOCKSTEP_TLS_CERT, LOCKSTEP_TLS_KEY",
        ),
        ("amqps://b/", {"tls_key": "{key}"}, "LOCKSTEP_TLS_KEY"),
        ("amqp://b/", {"tls_ca": "{ca}"}, "LOCKSTEP_AMQP_URL"),
    ],
)
async def test_bad_tls_settings_name_the_setting(
    issued: tuple[CertAuthority, Issued], tmp_path: Path, url: str, tls: dict[str, str], field: str
) -> None:
    ca, client = issued
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    paths = {"tmp": tmp_path, "ca": ca.cert, "cert": client.cert, "key": client.key}
    settings = {k: v.format(**paths) for k, v in tls.items()}
    broker = Broker(BrokerSettings.model_validate({"amqp_url": url, **settings}), "test")
    with pytest.raises(UserError) as raised:
        await broker.connect()
    assert raised.value.field == field
