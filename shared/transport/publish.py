"""Publishing: envelopes with publisher confirms, replies, and dead letters (used by `Broker`).

Envelopes go out persistent (or, with a ttl, transient), signed when there is a
`Signer`, and stamped with the connection's user as `user_id`, which the broker
checks. A publish re-sends through a broker outage until `publish_retry` runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import aiormq
from aio_pika.exceptions import ChannelNotFoundEntity, ChannelPreconditionFailed
from aiormq.exceptions import ChannelAccessRefused

from shared import log, topology
from shared.errors import BrokerUnavailable, ProtocolError
from shared.messages import Body, Envelope, encode, make
from shared.signing import Signer
from shared.transport.connection import BROKER_ERRORS, Link, Unroutable, user_of

Gate = Callable[[], Awaitable[None]]


class Publisher:
    """What one Broker sends: envelopes, replies to requests, and dead letters."""

    def __init__(
        self,
        link: Link,
        signer: Signer | None,
        dead_letter_via: tuple[str, str],
        gate: Gate | None = None,
    ) -> None:
        """`gate`: awaited before every publish and reply; it raises to forbid them (a
        coordinator that is not, or no longer, the active one: coordinator.leadership)."""
        self.signer = signer
        self._gate = gate
        self.user = user_of(link.settings.amqp_url)
        """The broker user this process connects as, stamped on what it publishes (None
        with EXTERNAL auth: the broker alone knows the certificate's user)."""
        self._link = link
        self._settings = link.settings
        self._dead_letter_via = dead_letter_via
        self._log = log.get("transport", connection=link.name)

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
        deadline = asyncio.get_running_loop().time() + self._settings.publish_retry
        pause = 0.1
        while True:
            try:
                if self._gate is not None:
                    await self._gate()
                await self.send(exchange, routing_key, message, mandatory)
                return
            except BrokerUnavailable:
                if asyncio.get_running_loop().time() + pause > deadline:
                    raise
                self._log.warning("publish.retry", exchange=exchange, routing_key=routing_key)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)

    async def send(
        self, exchange: str, routing_key: str, message: aio_pika.Message, mandatory: bool
    ) -> None:
        """Publish `message` once and wait for its confirm; library errors translated."""
        link = self._link
        channel = link.channel
        try:
            target = await link.exchange(exchange) if exchange else channel.default_exchange
            await target.publish(
                message,
                routing_key,
                mandatory=mandatory,
                timeout=self._settings.connect_timeout,
            )
        except aiormq.exceptions.PublishError as e:
            raise Unroutable(f"no queue for {exchange}/{routing_key}") from e
        except aiormq.exceptions.DeliveryError as e:  # nacked: retried on a fresh channel
            with contextlib.suppress(*BROKER_ERRORS, BrokerUnavailable):
                await link.renew_channel(channel)
            raise BrokerUnavailable(f"publish to {exchange}/{routing_key} nacked: {e!r}") from e
        except ChannelNotFoundEntity as e:
            raise Unroutable(f"no exchange {exchange}") from e
        except (ChannelAccessRefused, ChannelPreconditionFailed) as e:
            raise ProtocolError(f"the broker refused {exchange}/{routing_key}: {e!r}") from e
        except BROKER_ERRORS as e:
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
            raw[: self._settings.max_message_bytes],
            headers=headers,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            user_id=self.user,
        )
        target, key = self._dead_letter_via
        await self.send(target, key, message, mandatory=False)

    async def reply(self, reply_to: str, correlation_id: str | None, body: Body) -> None:
        """Answer a request on its `reply_to` queue."""
        if self._gate is not None:
            await self._gate()
        message = aio_pika.Message(
            encode(self._signed(make(body, self._link.name))),
            content_type="application/json",
            correlation_id=correlation_id,
            user_id=self.user,
        )
        await self.send("", reply_to, message, mandatory=False)
