"""Request/reply over RabbitMQ: how the CLI (and other systems) ask the coordinator.

A request goes to `lockstep.requests` with a private, exclusive reply queue as its
`reply_to` and its envelope id as correlation id; `Broker.request` waits for the
matching `Reply`, or raises `CoordinatorTimeout`.
"""

from __future__ import annotations

import asyncio

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from shared import topology
from shared.errors import BrokerUnavailable, CoordinatorTimeout, ProtocolError
from shared.messages import Body, Envelope, Reply, decode, make
from shared.transport.connection import BROKER_ERRORS, Link, Unroutable
from shared.transport.publish import Publisher


class Requester:
    """One Broker's outstanding requests and the reply queue that answers them."""

    def __init__(self, link: Link, publisher: Publisher) -> None:
        self._link = link
        self._publisher = publisher
        self._replies: dict[str, asyncio.Future[Envelope]] = {}
        self._reply_queue: AbstractQueue | None = None

    async def request(self, routing_key: str, body: Body, wait: float | None = None) -> Reply:
        """Send a request to the coordinator and wait for its `Reply`."""
        queue = await self._reply_queue_or_declare()
        envelope = make(body, self._link.name)
        future: asyncio.Future[Envelope] = asyncio.get_running_loop().create_future()
        self._replies[envelope.id] = future
        try:
            await self._publisher.publish(
                topology.REQUESTS,
                routing_key,
                envelope,
                mandatory=True,
                reply_to=queue.name,
                correlation_id=envelope.id,
            )
            answer = await asyncio.wait_for(future, wait or self._link.settings.request_timeout)
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
                queue = await self._link.channel.declare_queue(exclusive=True, auto_delete=True)
                await queue.consume(self._on_reply, no_ack=True)
            except BROKER_ERRORS as e:
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
