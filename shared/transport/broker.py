"""`Broker`: one process's handle on RabbitMQ, as the coordinator, agents and CLI use it.

It puts together the parts of this package: the connection and topology
(`connection.Link`), publishing with confirms (`publish.Publisher`), consuming with
its one ack decision point (`consume.Consumer`), and request/reply
(`request.Requester`). Everything outside the package goes through this class.
"""

from __future__ import annotations

from collections.abc import Callable

from aio_pika.abc import AbstractChannel

from shared import topology
from shared.config import BrokerSettings
from shared.messages import Body, Envelope, Reply
from shared.signing import Signer
from shared.tasks import TaskGroup
from shared.transport.connection import Link
from shared.transport.consume import Consumer, Handler
from shared.transport.publish import Gate, Publisher
from shared.transport.request import Requester


class Broker:
    """One process's connection to RabbitMQ."""

    def __init__(
        self,
        settings: BrokerSettings,
        name: str,
        *,
        signer: Signer | None = None,
        dead_letter_via: tuple[str, str] = (topology.DEAD, ""),
        share: Broker | None = None,
        gate: Gate | None = None,
    ) -> None:
        """`share`: a Broker whose connection this one uses instead of opening its own
        (connect `share` first). Many agents in one process, as in the fleet benchmark,
        then take one socket with a few channels each; `close` closes only this Broker's
        channels, and the connection stays `share`'s to close. `gate`: awaited before
        every publish and reply, raising to forbid them (`Publisher`)."""
        self.settings = settings
        self.name = name
        self._link: Link = Link(settings, name, share._link if share is not None else None)
        self._tasks = TaskGroup("transport")
        self._publisher = Publisher(self._link, signer, dead_letter_via, gate)
        self._consumer = Consumer(self._link, self._publisher, self._tasks)
        self._requester = Requester(self._link, self._publisher)
        self.user = self._publisher.user
        """The broker user this process connects as, stamped on what it publishes (None
        with EXTERNAL auth: the broker alone knows the certificate's user)."""

    @property
    def signer(self) -> Signer | None:
        """What signs every envelope and reply this Broker sends (None: unsigned)."""
        return self._publisher.signer

    @signer.setter
    def signer(self, signer: Signer | None) -> None:
        self._publisher.signer = signer

    async def connect(self) -> None:
        """Connect (robustly: aio-pika reconnects and restores consumers).

        An `amqps://` URL connects over TLS, verifying the broker's certificate and
        host name; bad TLS settings raise `UserError` before any connection is tried.
        """
        await self._link.connect()

    @property
    def channel(self) -> AbstractChannel:
        """The publish channel (`BrokerUnavailable` before `connect`)."""
        return self._link.channel

    async def close(self) -> None:
        """Stop consuming and close the connection (a shared one: only this Broker's
        channels, i.e. its publish channel and each consumed queue's channel)."""
        await self._tasks.close()
        await self._link.close()

    async def declare(self, *queues: topology.Queue) -> None:
        """Declare every exchange, the dead-letter queue and `queues` (idempotent)."""
        await self._link.declare(*queues)

    async def declare_queue(self, spec: topology.Queue) -> None:
        """Declare one more queue (an agent's, once the coordinator heard of it)."""
        await self._link.declare_queue(spec)

    async def delete_queue(self, name: str) -> None:
        """Delete a queue that is no longer part of the topology (no error if gone)."""
        await self._link.delete_queue(name)

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        envelope: Envelope,
        *,
        mandatory: bool = False,
        reply_to: str | None = None,
        correlation_id: str | None = None,
        ttl: float | None = None,
    ) -> None:
        """Publish and wait for the broker's confirm (see `Publisher.publish`)."""
        await self._publisher.publish(
            exchange, routing_key, envelope, mandatory=mandatory, reply_to=reply_to,
            correlation_id=correlation_id, ttl=ttl,
        )  # fmt: skip

    async def dead_letter(self, raw: bytes, reason: str, exchange: str, routing_key: str) -> None:
        """Send `raw` to `lockstep.dead` with the reason in a header."""
        await self._publisher.dead_letter(raw, reason, exchange, routing_key)

    async def reply(self, reply_to: str, correlation_id: str | None, body: Body) -> None:
        """Answer a request on its `reply_to` queue."""
        await self._publisher.reply(reply_to, correlation_id, body)

    async def consume(
        self, queue_name: str, handler: Handler, *, concurrency: int = 1, auto_ack: bool = False
    ) -> None:
        """Feed a queue to `handler`, settling each delivery in one place (see
        `Consumer.consume`): in order, or `concurrency` deliveries at once."""
        await self._consumer.consume(
            queue_name, handler, concurrency=concurrency, auto_ack=auto_ack
        )

    async def subscribe(
        self,
        exchange: str,
        keys: list[str],
        handler: Handler,
        on_restored: Callable[[], object] | None = None,
    ) -> None:
        """Consume a temporary exclusive queue bound to `exchange` with `keys` (bound
        when this returns; see `Consumer.subscribe`)."""
        await self._consumer.subscribe(exchange, keys, handler, on_restored)

    async def request(self, routing_key: str, body: Body, wait: float | None = None) -> Reply:
        """Send a request to the coordinator and wait for its `Reply`."""
        return await self._requester.request(routing_key, body, wait)
