"""Consuming, and the one place that decides ack, reject or requeue (used by `Broker`).

`Consumer._handle` settles every delivery: too large, not decodable, or a kind its
exchange does not carry -> dead-lettered; decoded and handled -> ack (after the
handler's effect is durable, since the handler returns only then); a `ProtocolError`
(a failed signature check among them) -> dead-lettered with the reason and acked; a
`TransientError` -> requeued; anything else -> dead-lettered with the error, and the
consumer keeps running. Handlers never ack by hand.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
from aio_pika.exceptions import ChannelNotFoundEntity

from shared import log, metrics, topology
from shared.errors import BrokerUnavailable, ProtocolError, TransientError
from shared.messages import Body, Envelope, decode, decode_alert
from shared.tasks import TaskGroup
from shared.transport.connection import BROKER_ERRORS, Link, Unroutable
from shared.transport.publish import Publisher


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


def admit(message: AbstractIncomingMessage, max_message_bytes: int) -> Delivery:
    """The delivery `message` makes, or `ProtocolError`: bounded, decoded, and of a
    kind its exchange carries (an alert exchange carries alerts only)."""
    exchange = message.exchange or ""
    size = len(message.body)
    if size > max_message_bytes:
        raise ProtocolError(
            f"too_large: {size} bytes; the limit is {max_message_bytes}",
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


class Consumer:
    """Feeds queues to handlers and settles each delivery in `_handle`."""

    def __init__(self, link: Link, publisher: Publisher, tasks: TaskGroup) -> None:
        self._link = link
        self._publisher = publisher
        self._tasks = tasks
        self._settings = link.settings
        self._log = log.get("transport", connection=link.name)

    async def consume(
        self, queue_name: str, handler: Handler, *, concurrency: int = 1, auto_ack: bool = False
    ) -> None:
        """Feed a queue to `handler`, one delivery at a time, in order; with `concurrency`,
        that many deliveries at once (their handlers run together, each still acked by
        the one decision point once its own effect is durable: a handler that needs an
        order keeps it itself). `auto_ack`: the broker forgets each message as it sends
        it (for transient messages whose loss costs nothing, like heartbeats): nothing
        is acked or requeued, a refused one is still dead-lettered with its reason.

        The queue is declared again on the consuming channel: aio-pika restores only the
        queues a robust channel declared, so this is what brings the consumer back after
        a broker restart. A queue this broker did not declare itself (an agent's, which
        the coordinator declares) is declared passively, which needs no permission;
        `Unroutable` if it does not exist yet.
        """
        inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        spec = self._link.specs.get(queue_name)
        try:
            channel = await self._link.connection_or_fail().channel()
            await channel.set_qos(prefetch_count=self._settings.prefetch)
            queue: AbstractQueue
            if spec is None:  # someone else's declaration: look, never configure
                queue = await channel.declare_queue(queue_name, passive=True)
            else:
                queue = await self._link.declare_on(spec, channel)
            self._link.queues.append(queue)
            await queue.consume(_bounded(inbox, self._settings.prefetch) if auto_ack
                                else inbox.put, no_ack=auto_ack)  # fmt: skip
        except ChannelNotFoundEntity as e:
            raise Unroutable(f"there is no queue {queue_name}") from e
        except BROKER_ERRORS as e:
            raise BrokerUnavailable(f"consuming {queue_name} failed: {e!r}") from e
        work = self._work(inbox, handler, concurrency, auto_ack)
        self._tasks.spawn(work, f"consume:{queue_name}", forever=True)

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
            channel = await self._link.connection_or_fail().channel()
            queue = await channel.declare_queue(exclusive=True, auto_delete=True)
            for key in keys:
                await queue.bind(exchange, key)
            await queue.consume(inbox.put)
        except BROKER_ERRORS as e:
            raise BrokerUnavailable(f"cannot subscribe to {exchange}: {e!r}") from e
        if on_restored is not None:
            channel.reopen_callbacks.add(lambda _channel: on_restored())
        self._link.queues.append(queue)
        self._tasks.spawn(self._work(inbox, handler), f"subscribe:{exchange}", forever=True)

    async def _work(
        self, inbox: asyncio.Queue[AbstractIncomingMessage], handler: Handler,
        concurrency: int = 1, auto_ack: bool = False,
    ) -> None:  # fmt: skip
        slots = asyncio.Semaphore(concurrency)
        while True:
            message = await inbox.get()
            await slots.acquire()
            if concurrency == 1:
                await self._one(message, handler, slots, auto_ack)
            else:
                self._tasks.spawn(self._one(message, handler, slots, auto_ack), "delivery")

    async def _one(
        self, message: AbstractIncomingMessage, handler: Handler, slots: asyncio.Semaphore,
        auto_ack: bool = False,
    ) -> None:  # fmt: skip
        try:
            await self._handle(message, handler, auto_ack)
        except (*BROKER_ERRORS, BrokerUnavailable, Unroutable) as e:
            # The reply or ack was lost with the channel: the broker redelivers the
            # message and handlers are idempotent, so the consumer simply goes on.
            self._log.warning("consume.ack_lost", error=repr(e))
        except Exception:  # never let one delivery end the consumer
            self._log.exception("consume.failed", message_id=message.message_id)
        finally:
            slots.release()

    async def _handle(
        self, message: AbstractIncomingMessage, handler: Handler, auto_ack: bool = False
    ) -> None:
        """The one decision point: run `handler`, then ack, dead-letter or requeue
        (with `auto_ack` the broker settled it already: only dead-lettering is left)."""
        try:
            delivery = admit(message, self._settings.max_message_bytes)
            envelope = delivery.envelope
            reply = await handler(delivery)
        except ProtocolError as e:
            await self._reject(message, e.reason, e.code, auto_ack)
            return
        except TransientError as e:
            self._log.warning("consume.retry", error=str(e), message_id=message.message_id)
            if not auto_ack:
                await asyncio.sleep(1.0)
                await message.nack(requeue=True)
            return
        except Exception as e:
            self._log.exception("consume.handler_failed", message_id=message.message_id)
            await self._reject(message, f"handler failed: {e!r}", auto_ack=auto_ack)
            return
        if reply is not None and message.reply_to:
            try:
                await self._publisher.reply(message.reply_to, message.correlation_id, reply)
            except TransientError as e:  # not answered (fenced, no broker): handled again
                self._log.warning("consume.reply_failed", error=str(e),
                                  message_id=message.message_id)  # fmt: skip
                if not auto_ack:
                    await asyncio.sleep(1.0)  # as for a handler's transient failure
                    await message.nack(requeue=True)
                return
        if not auto_ack:
            await message.ack()
        metrics.HANDLED.labels(envelope.kind).inc()

    async def _reject(
        self, message: AbstractIncomingMessage, reason: str, code: str = "handler_failed",
        auto_ack: bool = False,
    ) -> None:  # fmt: skip
        self._log.warning("message.dead_lettered", reason=reason, routing_key=message.routing_key)
        metrics.DEAD_LETTERED.labels(message.routing_key or "").inc()
        metrics.REFUSED.labels(code).inc()
        try:
            await self._publisher.dead_letter(
                message.body, reason, message.exchange or "", message.routing_key or ""
            )
        except (BrokerUnavailable, Unroutable, ProtocolError):
            if not auto_ack:
                await message.reject(requeue=False)  # the queue's dead-letter exchange takes it
            return
        if not auto_ack:
            await message.ack()


def _bounded(
    inbox: asyncio.Queue[AbstractIncomingMessage], limit: int
) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
    """An auto-ack consumer's put: the broker applies no prefetch to it, so the inbox
    keeps at most `limit` messages, the oldest dropped first (as the queue itself does)."""

    async def put(message: AbstractIncomingMessage) -> None:
        while inbox.qsize() >= limit:
            inbox.get_nowait()
        inbox.put_nowait(message)

    return put
