"""The connection to RabbitMQ and the topology declared over it (used by `Broker`).

`Link` owns one process's robust connection (or borrows another Link's), its publish
channel, and the exchanges and queues it declared from `shared.topology`. The TLS
context of an `amqps://` URL is built here too. Library errors become
`BrokerUnavailable` at this boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue, AbstractRobustConnection
from aio_pika.exceptions import (
    CONNECTION_EXCEPTIONS,
    ChannelInvalidStateError,
    ChannelNotFoundEntity,
)

from shared import topology
from shared.config import BrokerSettings
from shared.errors import BrokerUnavailable, TransientError, UserError
from shared.transport import cluster

BROKER_ERRORS = (*CONNECTION_EXCEPTIONS, ChannelInvalidStateError, asyncio.TimeoutError)
"""What aio-pika raises when the broker or the channel went away."""


class Unroutable(TransientError):
    """A mandatory message had no queue to go to (e.g. an agent that never registered)."""


def user_of(url: str) -> str | None:
    """The user a connection to `url` (the first node of a list) logs in as (aio-pika's
    default login is guest)."""
    parts = urlsplit(cluster.split(url)[0])
    if "auth=external" in parts.query.lower():
        return None
    return unquote(parts.username or "") or "guest"


def ssl_context(s: BrokerSettings) -> ssl.SSLContext | None:
    """The TLS context for an `amqps://` URL (None for `amqp://`).

    Verification is never off: the peer is checked against `tls_ca` (else the
    system store), host name included; `tls_cert`/`tls_key` add a client certificate.
    """
    schemes = {urlsplit(u).scheme.lower() for u in cluster.split(s.amqp_url)}
    if len(schemes) > 1:
        raise UserError("LOCKSTEP_AMQP_URL", "mixes amqp:// and amqps:// nodes")
    if schemes != {"amqps"}:
        if s.tls_ca or s.tls_cert or s.tls_key:
            raise UserError("LOCKSTEP_AMQP_URL", "TLS settings are set: use amqps://")
        return None
    if s.tls_key and not s.tls_cert:
        raise UserError("LOCKSTEP_TLS_KEY", "set without LOCKSTEP_TLS_CERT")
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=s.tls_ca)
    except OSError as e:  # ssl.SSLError included
        raise UserError("LOCKSTEP_TLS_CA", f"cannot load {s.tls_ca}: {e}") from e
    if s.tls_cert:
        try:  # an empty password: an encrypted key fails here instead of prompting
            context.load_cert_chain(s.tls_cert, s.tls_key, password=b"")
        except OSError as e:
            where = "LOCKSTEP_TLS_CERT" + (", LOCKSTEP_TLS_KEY" if s.tls_key else "")
            reason = f"cannot load {s.tls_cert} (PEM cert, unencrypted PEM key): {e}"
            raise UserError(where, reason) from e
    return context


def safe_url(url: str) -> str:
    """`url` (each node of a list) without its credentials, fit for an error message."""
    return ",".join(u.split("@", 1)[-1] if "@" in u else u for u in cluster.split(url))


class Link:
    """One process's connection, its publish channel, and what it declared on them."""

    def __init__(self, settings: BrokerSettings, name: str, share: Link | None) -> None:
        self.settings = settings
        self.name = name
        self._share = share
        self._connection: AbstractRobustConnection | None = None
        self._publish_channel: AbstractChannel | None = None
        self._renewing = asyncio.Lock()
        self._exchanges: dict[str, AbstractExchange] = {}
        self.queues: list[AbstractQueue] = []  # strong refs: robust objects are weak-held
        """Every queue consumed, kept alive (and closed with a shared connection)."""
        self.specs: dict[str, topology.Queue] = {}
        """The queues this Link declared itself, by name."""

    async def connect(self) -> None:
        """Connect (robustly: aio-pika reconnects and restores consumers).

        An `amqps://` URL connects over TLS, verifying the broker's certificate and
        host name; bad TLS settings raise `UserError` before any connection is tried.
        """
        try:
            if self._share is not None:
                self._connection = self._share.connection_or_fail()
            else:
                self._connection = await cluster.connect(
                    cluster.split(self.settings.amqp_url),
                    self.settings.connect_timeout,
                    ssl_context=ssl_context(self.settings),
                    reconnect_interval=self.settings.reconnect_interval,
                    client_properties={"connection_name": self.name},
                )
            self._publish_channel = await self._connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
        except BROKER_ERRORS as e:
            url = safe_url(self.settings.amqp_url)
            raise BrokerUnavailable(f"cannot reach RabbitMQ at {url}: {e!r}") from e

    @property
    def channel(self) -> AbstractChannel:
        """The publish channel (with publisher confirms)."""
        if self._publish_channel is None:
            raise BrokerUnavailable("not connected")
        return self._publish_channel

    async def renew_channel(self, nacked: AbstractChannel) -> None:
        """Replace the publish channel with a fresh one (after a nack). Seen on RabbitMQ
        3.10.8 in a three-node cluster: after the node holding an agent queue's leader
        was killed, the coordinator's channel had every publish to that queue nacked for
        90 s, though the queue had a new leader within 20 s and a new connection's
        publishes to it were confirmed."""
        async with self._renewing:
            old = self._publish_channel
            if old is not nacked:
                return  # renewed already, by another publish nacked on the same channel
            self._publish_channel = await self.connection_or_fail().channel(
                publisher_confirms=True, on_return_raises=True
            )
            self._exchanges.clear()  # they were bound to the old channel
        if old is not None:
            with contextlib.suppress(*BROKER_ERRORS, RuntimeError):
                await old.close()

    def connection_or_fail(self) -> AbstractRobustConnection:
        """The connection, or `BrokerUnavailable` before `connect`."""
        if self._connection is None:
            raise BrokerUnavailable("not connected")
        return self._connection

    async def close(self) -> None:
        """Close the connection (a shared one: only this Link's channels, i.e. its
        publish channel and each consumed queue's channel)."""
        if self._connection is not None and self._share is None:
            with contextlib.suppress(*BROKER_ERRORS):
                await self._connection.close()
        elif self._connection is not None:
            channels = [self._publish_channel, *(queue.channel for queue in self.queues)]
            for channel in {id(c): c for c in channels if c is not None}.values():
                with contextlib.suppress(*BROKER_ERRORS):
                    await channel.close()
            self._publish_channel = None
        self._connection = None

    async def declare(self, *queues: topology.Queue) -> None:
        """Declare every exchange, the dead-letter queue (unless it exists: it is not
        re-typed) and `queues` (idempotent).

        On plain, one-shot channels: a robust channel declares again, on every
        reconnect, what was declared on it, and on a cluster a durable classic queue
        whose node is down cannot be declared, so that reconnect would fail for as long
        as the node is down. What is consumed is declared again by its consumer.
        """
        try:
            async with self._one_shot() as channel:
                for exchange in topology.EXCHANGES:
                    await channel.declare_exchange(
                        exchange.name, aio_pika.ExchangeType(exchange.type), durable=True
                    )
                for queue in queues:
                    await self.declare_on(queue, channel)
            try:
                async with self._one_shot() as channel:
                    await channel.declare_queue(topology.DEAD_QUEUE, passive=True)
            except ChannelNotFoundEntity:  # none yet: quorum where agents' queues are
                async with self._one_shot() as channel:
                    dead = topology.dead_queue(self.settings.agent_queue_type)
                    await self.declare_on(dead, channel)
        except BROKER_ERRORS as e:
            raise BrokerUnavailable(f"declaring the topology failed: {e!r}") from e

    def _one_shot(self) -> aio_pika.Channel:
        """A plain channel (not restored on reconnect), for `async with`."""
        return aio_pika.Channel(self.connection_or_fail())

    async def declare_queue(self, spec: topology.Queue) -> None:
        """Declare one more queue (an agent's, once the coordinator heard of it)."""
        try:
            await self.declare_on(spec)
        except BROKER_ERRORS as e:
            raise BrokerUnavailable(f"declaring {spec.name} failed: {e!r}") from e

    async def declare_on(
        self, spec: topology.Queue, channel: AbstractChannel | None = None
    ) -> AbstractQueue:
        """Declare and bind `spec` on `channel` (default: the publish channel)."""
        self.specs[spec.name] = spec
        queue = await (channel or self.channel).declare_queue(
            spec.name, durable=spec.durable, arguments=cast(Any, spec.declare_arguments())
        )
        for exchange, key in spec.bindings:
            await queue.bind(exchange, key)
        return queue

    async def delete_queue(self, name: str) -> None:
        """Delete queue `name` and what it holds (no error if there is none)."""
        try:
            await self.channel.queue_delete(name)
        except BROKER_ERRORS as e:
            raise BrokerUnavailable(f"deleting {name} failed: {e!r}") from e

    async def exchange(self, name: str) -> AbstractExchange:
        """The exchange `name`, looked up once (never declared here)."""
        if name not in self._exchanges:
            self._exchanges[name] = await self.channel.get_exchange(name, ensure=False)
        return self._exchanges[name]
