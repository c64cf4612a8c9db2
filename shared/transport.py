"""The broker boundary: the only module that imports aio-pika.

`Broker` connects (robustly), declares the topology of `shared.topology`, publishes
envelopes with publisher confirms and persistent delivery (signed, when it was given a
`Signer`, and stamped with the connection's user as `user_id`, which the broker
checks), consumes with manual acks, and makes request/reply calls for the CLI.

Inside `consume`, one place decides what happens to a delivery: too large, not
decodable, or a kind its exchange does not carry -> dead-lettered; decoded and handled
-> ack (after the handler's effect is durable, since the handler returns only then); a
`ProtocolError` (a failed signature check among them) -> dead-lettered with the reason
and acked; a `TransientError` -> requeued; anything else -> dead-lettered with the
error, and the consumer keeps running. Library errors become `BrokerUnavailable` here.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aio_pika.exceptions import (
    CONNECTION_EXCEPTIONS,
    ChannelInvalidStateError,
    ChannelNotFoundEntity,
    ChannelPreconditionFailed,
)
from aiormq.exceptions import ChannelAccessRefused

from shared import log, metrics, topology
from shared.config import BrokerSettings
from shared.errors import (
    BrokerUnavailable,
    CoordinatorTimeout,
    ProtocolError,
    TransientError,
    UserError,
)
from shared.messages import Body, Envelope, Reply, decode, decode_alert, encode, make
from shared.signing import Signer
from shared.tasks import TaskGroup

_BROKER_ERRORS = (*CONNECTION_EXCEPTIONS, ChannelInvalidStateError, asyncio.TimeoutError)


def _user_of(url: str) -> str | None:
    """The user a connection to `url` logs in as (aio-pika's default login is guest)."""
    parts = urlsplit(url)
    if "auth=external" in parts.query.lower():
        return None
    return unquote(parts.username or "") or "guest"


class Unroutable(TransientError):
    """A mandatory message had no queue to go to (e.g. an agent that never registered)."""


@dataclass(frozen=True)
class Delivery:
    """A decoded, verified message as a handler sees it."""

    envelope: Envelope
    exchange: str
    routing_key: str
    reply_to: str | None
    correlation_id: str | None
    redelivered: bool
    user_id: str | None = None
    """The publisher's broker user, validated by the broker when it was set."""
    raw: bytes = b""
    """The body as delivered (what an agent's durable command log keeps)."""


Handler = Callable[[Delivery], Awaitable[Body | None]]
"""Handles one delivery; a returned body is sent to `reply_to` before the ack."""


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
    ) -> None:
        """`share`: a Broker whose connection this one uses instead of opening its own
        (connect `share` first). Many agents in one process, as in the fleet benchmark,
        then take one socket with a few channels each; `close` closes only this Broker's
        channels, and the connection stays `share`'s to close."""
        self.settings = settings
        self.name = name
        self.signer = signer
        self.user = _user_of(settings.amqp_url)
        """The broker user this process connects as, stamped on what it publishes (None
        with EXTERNAL auth: the broker alone knows the certificate's user)."""
        self._dead_letter_via = dead_letter_via
        self._log = log.get("transport", connection=name)
        self._share = share
        self._connection: AbstractRobustConnection | None = None
        self._publish_channel: AbstractChannel | None = None
        self._exchanges: dict[str, AbstractExchange] = {}
        self._queues: list[AbstractQueue] = []  # strong refs: robust objects are weak-held
        self._tasks = TaskGroup("transport")
        self._replies: dict[str, asyncio.Future[Envelope]] = {}
        self._specs: dict[str, topology.Queue] = {}
        self._reply_queue: AbstractQueue | None = None

    async def connect(self) -> None:
        """Connect (robustly: aio-pika reconnects and restores consumers).

        An `amqps://` URL connects over TLS, verifying the broker's certificate and
        host name; bad TLS settings raise `UserError` before any connection is tried.
        """
        try:
            if self._share is not None:
                self._connection = self._share._connection_or_fail()
            else:
                self._connection = await aio_pika.connect_robust(
                    self.settings.amqp_url,
                    ssl_context=self._ssl_context(),
                    timeout=self.settings.connect_timeout,
                    reconnect_interval=self.settings.reconnect_interval,
                    client_properties={"connection_name": self.name},
                )
            self._publish_channel = await self._connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
        except _BROKER_ERRORS as e:
            raise BrokerUnavailable(f"cannot reach RabbitMQ at {self._safe_url()}: {e!r}") from e

    def _ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for an `amqps://` URL (None for `amqp://`).

        Verification is never off: the peer is checked against `tls_ca` (else the
        system store), host name included; `tls_cert`/`tls_key` add a client certificate.
        """
        s = self.settings
        if urlsplit(s.amqp_url).scheme.lower() != "amqps":
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

    def _safe_url(self) -> str:
        url = self.settings.amqp_url
        return url.split("@", 1)[-1] if "@" in url else url

    @property
    def channel(self) -> AbstractChannel:
        if self._publish_channel is None:
            raise BrokerUnavailable("not connected")
        return self._publish_channel

    async def close(self) -> None:
        """Stop consuming and close the connection (a shared one: only this Broker's
        channels, i.e. its publish channel and each consumed queue's channel)."""
        await self._tasks.close()
        if self._connection is not None and self._share is None:
            with contextlib.suppress(*_BROKER_ERRORS):
                await self._connection.close()
        elif self._connection is not None:
            channels = [self._publish_channel, *(queue.channel for queue in self._queues)]
            for channel in {id(c): c for c in channels if c is not None}.values():
                with contextlib.suppress(*_BROKER_ERRORS):
                    await channel.close()
            self._publish_channel = None
        self._connection = None

    # --- topology ---------------------------------------------------------------

    async def declare(self, *queues: topology.Queue) -> None:
        """Declare every exchange, the dead-letter queue and `queues` (idempotent)."""
        try:
            for spec in topology.EXCHANGES:
                self._exchanges[spec.name] = await self.channel.declare_exchange(
                    spec.name, aio_pika.ExchangeType(spec.type), durable=True
                )
            for queue in (topology.dead_queue(), *queues):
                await self._declare_queue(queue)
        except _BROKER_ERRORS as e:
            raise BrokerUnavailable(f"declaring the topology failed: {e!r}") from e

    async def declare_queue(self, spec: topology.Queue) -> None:
        """Declare one more queue (an agent's, once the coordinator heard of it)."""
        try:
            await self._declare_queue(spec)
        except _BROKER_ERRORS as e:
            raise BrokerUnavailable(f"declaring {spec.name} failed: {e!r}") from e

    async def _declare_queue(
        self, spec: topology.Queue, channel: AbstractChannel | None = None
    ) -> AbstractQueue:
        self._specs[spec.name] = spec
        queue = await (channel or self.channel).declare_queue(
            spec.name, durable=True, arguments=cast(Any, spec.declare_arguments())
        )
        for exchange, key in spec.bindings:
            await queue.bind(exchange, key)
        return queue

    async def _exchange(self, name: str) -> AbstractExchange:
        if name not in self._exchanges:
            self._exchanges[name] = await self.channel.get_exchange(name, ensure=False)
        return self._exchanges[name]

    # --- publishing -------------------------------------------------------------

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
        """Publish and wait for the broker's confirm: persistently, or, with `ttl`, as a
        transient message the broker drops unconsumed after `ttl` seconds (heartbeats).

        Through a broker outage the same envelope is re-sent until it is confirmed or
        `publish_retry` runs out: receivers deduplicate by envelope id.
        """
        message = aio_pika.Message(
            encode(self._signed(envelope)),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT
            if ttl is None
            else aio_pika.DeliveryMode.NOT_PERSISTENT,
            expiration=ttl,
            message_id=envelope.id,
            reply_to=reply_to,
            correlation_id=correlation_id,
            type=envelope.kind,
            user_id=self.user,
        )
        deadline = asyncio.get_running_loop().time() + self.settings.publish_retry
        pause = 0.1
        while True:
            try:
                await self._publish(exchange, routing_key, message, mandatory)
                return
            except BrokerUnavailable:
                if asyncio.get_running_loop().time() + pause > deadline:
                    raise
                self._log.warning("publish.retry", exchange=exchange, routing_key=routing_key)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)

    async def _publish(
        self, exchange: str, routing_key: str, message: aio_pika.Message, mandatory: bool
    ) -> None:
        try:
            target = await self._exchange(exchange) if exchange else self.channel.default_exchange
            await target.publish(
                message,
                routing_key,
                mandatory=mandatory,
                timeout=self.settings.connect_timeout,
            )
        except aiormq.exceptions.PublishError as e:
            raise Unroutable(f"no queue for {exchange}/{routing_key}") from e
        except ChannelNotFoundEntity as e:
            raise Unroutable(f"no exchange {exchange}") from e
        except (ChannelAccessRefused, ChannelPreconditionFailed) as e:
            raise ProtocolError(f"the broker refused {exchange}/{routing_key}: {e!r}") from e
        except _BROKER_ERRORS as e:
            raise BrokerUnavailable(f"publish to {exchange}/{routing_key} failed: {e!r}") from e

    def _signed(self, envelope: Envelope) -> Envelope:
        return self.signer.sign(envelope) if self.signer is not None else envelope

    async def dead_letter(self, raw: bytes, reason: str, exchange: str, routing_key: str) -> None:
        """Send `raw` to `lockstep.dead` with the reason in a header (an agent, which may
        write only reports, goes through lockstep.reports with the key `dead`)."""
        headers: dict[str, Any] = {
            topology.REASON_HEADER: reason[:1000],
            "x-lockstep-exchange": exchange,
            "x-lockstep-routing-key": routing_key,
        }
        message = aio_pika.Message(
            raw[: self.settings.max_message_bytes],
            headers=headers,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            user_id=self.user,
        )
        target, key = self._dead_letter_via
        await self._publish(target, key, message, mandatory=False)

    # --- consuming --------------------------------------------------------------

    async def consume(self, queue_name: str, handler: Handler, *, concurrency: int = 1) -> None:
        """Feed a queue to `handler`, one delivery at a time, in order; with `concurrency`,
        that many deliveries at once (their handlers run together, each still acked by
        the one decision point once its own effect is durable: a handler that needs an
        order keeps it itself).

        The queue is declared again on the consuming channel: aio-pika restores only the
        queues a robust channel declared, so this is what brings the consumer back after
        a broker restart. A queue this broker did not declare itself (an agent's, which
        the coordinator declares) is declared passively, which needs no permission;
        `Unroutable` if it does not exist yet.
        """
        inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        spec = self._specs.get(queue_name)
        try:
            channel = await self._connection_or_fail().channel()
            await channel.set_qos(prefetch_count=self.settings.prefetch)
            queue: AbstractQueue
            if spec is None:  # someone else's declaration: look, never configure
                queue = await channel.declare_queue(queue_name, passive=True)
            else:
                queue = await self._declare_queue(spec, channel)
            self._queues.append(queue)
            await queue.consume(inbox.put)
        except ChannelNotFoundEntity as e:
            raise Unroutable(f"there is no queue {queue_name}") from e
        except _BROKER_ERRORS as e:
            raise BrokerUnavailable(f"consuming {queue_name} failed: {e!r}") from e
        work = self._work(inbox, handler, concurrency)
        self._tasks.spawn(work, f"consume:{queue_name}", forever=True)

    def _connection_or_fail(self) -> AbstractRobustConnection:
        if self._connection is None:
            raise BrokerUnavailable("not connected")
        return self._connection

    async def _work(
        self, inbox: asyncio.Queue[AbstractIncomingMessage], handler: Handler,
        concurrency: int = 1,
    ) -> None:  # fmt: skip
        slots = asyncio.Semaphore(concurrency)
        while True:
            message = await inbox.get()
            await slots.acquire()
            if concurrency == 1:
                await self._one(message, handler, slots)
            else:
                self._tasks.spawn(self._one(message, handler, slots), "delivery")

    async def _one(
        self, message: AbstractIncomingMessage, handler: Handler, slots: asyncio.Semaphore
    ) -> None:
        try:
            await self._handle(message, handler)
        except (*_BROKER_ERRORS, BrokerUnavailable, Unroutable) as e:
            # The reply or ack was lost with the channel: the broker redelivers the
            # message and handlers are idempotent, so the consumer simply goes on.
            self._log.warning("consume.ack_lost", error=repr(e))
        except Exception:  # never let one delivery end the consumer
            self._log.exception("consume.failed", message_id=message.message_id)
        finally:
            slots.release()

    async def _handle(self, message: AbstractIncomingMessage, handler: Handler) -> None:
        try:
            delivery = self._admit(message)
            envelope = delivery.envelope
            reply = await handler(delivery)
        except ProtocolError as e:
            await self._reject(message, e.reason, e.code)
            return
        except TransientError as e:
            self._log.warning("consume.retry", error=str(e), message_id=message.message_id)
            await asyncio.sleep(1.0)
            await message.nack(requeue=True)
            return
        except Exception as e:
            self._log.exception("consume.handler_failed", message_id=message.message_id)
            await self._reject(message, f"handler failed: {e!r}")
            return
        if reply is not None and message.reply_to:
            await self.reply(message.reply_to, message.correlation_id, reply)
        await message.ack()
        metrics.HANDLED.labels(envelope.kind).inc()

    def _admit(self, message: AbstractIncomingMessage) -> Delivery:
        """The delivery `message` makes, or `ProtocolError`: bounded, decoded, and of a
        kind its exchange carries (an alert exchange carries alerts only)."""
        exchange = message.exchange or ""
        size = len(message.body)
        if size > self.settings.max_message_bytes:
            raise ProtocolError(
                f"too_large: {size} bytes; the limit is {self.settings.max_message_bytes}",
                "too_large",
            )
        if exchange == topology.ALERTS:
            envelope = decode_alert(message.body, message.app_id or "monitoring")
        else:
            envelope = decode(message.body)
        if envelope.kind not in topology.ACCEPTS.get(exchange, frozenset()):
            raise ProtocolError(
                f"wrong_exchange: {exchange or 'the default exchange'} does not carry "
                f"{envelope.kind!r} messages",
                "wrong_exchange",
            )
        return Delivery(
            envelope, exchange, message.routing_key or "", message.reply_to,
            message.correlation_id, bool(message.redelivered), message.user_id, message.body,
        )  # fmt: skip

    async def _reject(
        self, message: AbstractIncomingMessage, reason: str, code: str = "handler_failed"
    ) -> None:
        self._log.warning("message.dead_lettered", reason=reason, routing_key=message.routing_key)
        metrics.DEAD_LETTERED.labels(message.routing_key or "").inc()
        metrics.REFUSED.labels(code).inc()
        try:
            await self.dead_letter(
                message.body, reason, message.exchange or "", message.routing_key or ""
            )
        except (BrokerUnavailable, Unroutable, ProtocolError):
            await message.reject(requeue=False)  # the queue's dead-letter exchange takes it
            return
        await message.ack()

    async def reply(self, reply_to: str, correlation_id: str | None, body: Body) -> None:
        """Answer a request on its `reply_to` queue."""
        message = aio_pika.Message(
            encode(self._signed(make(body, self.name))),
            content_type="application/json",
            correlation_id=correlation_id,
            user_id=self.user,
        )
        await self._publish("", reply_to, message, mandatory=False)

    # --- request/reply (the CLI and other systems) ------------------------------

    async def request(self, routing_key: str, body: Body, wait: float | None = None) -> Reply:
        """Send a request to the coordinator and wait for its `Reply`."""
        queue = await self._reply_queue_or_declare()
        envelope = make(body, self.name)
        future: asyncio.Future[Envelope] = asyncio.get_running_loop().create_future()
        self._replies[envelope.id] = future
        try:
            await self.publish(
                topology.REQUESTS,
                routing_key,
                envelope,
                mandatory=True,
                reply_to=queue.name,
                correlation_id=envelope.id,
            )
            answer = await asyncio.wait_for(future, wait or self.settings.request_timeout)
        except Unroutable as e:
            raise BrokerUnavailable(f"{e}: is a coordinator running?") from e
        except TimeoutError as e:
            raise CoordinatorTimeout(f"the coordinator did not answer {routing_key}") from e
        finally:
            self._replies.pop(envelope.id, None)
        if not isinstance(answer.body, Reply):
            raise ProtocolError(f"expected a reply, got {answer.kind}")
        return answer.body

    async def _reply_queue_or_declare(self) -> AbstractQueue:
        if self._reply_queue is None:
            try:
                queue = await self.channel.declare_queue(exclusive=True, auto_delete=True)
                await queue.consume(self._on_reply, no_ack=True)
            except _BROKER_ERRORS as e:
                raise BrokerUnavailable(f"cannot open a reply queue: {e!r}") from e
            self._reply_queue = queue
        return self._reply_queue

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self._replies.get(message.correlation_id or "")
        if future is None or future.done():
            return
        try:
            future.set_result(decode(message.body))
        except ProtocolError as e:
            future.set_exception(e)

    async def subscribe(
        self,
        exchange: str,
        keys: list[str],
        handler: Handler,
        on_restored: Callable[[], object] | None = None,
    ) -> None:
        """Consume a temporary exclusive queue bound to `exchange` with `keys`.

        The queue is bound when this returns: whatever is published from then on reaches
        `handler` (`deploy --wait` subscribes before it sends its request). After a
        reconnect the queue is declared, bound and consumed again, then `on_restored` is
        called: what was published while it was away is lost.
        """
        inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        try:
            channel = await self._connection_or_fail().channel()
            queue = await channel.declare_queue(exclusive=True, auto_delete=True)
            for key in keys:
                await queue.bind(exchange, key)
            await queue.consume(inbox.put)
        except _BROKER_ERRORS as e:
            raise BrokerUnavailable(f"cannot subscribe to {exchange}: {e!r}") from e
        if on_restored is not None:
            channel.reopen_callbacks.add(lambda _channel: on_restored())
        self._queues.append(queue)
        self._tasks.spawn(self._work(inbox, handler), f"subscribe:{exchange}", forever=True)
