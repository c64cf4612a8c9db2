"""Transport against the real broker: confirms, dead-lettering with a reason, request/reply."""

from __future__ import annotations

import aio_pika
import pytest

from shared import topology
from shared.errors import BrokerUnavailable
from shared.messages import QueryRequest, Reply, make
from shared.transport import Broker, Delivery
from tests.support.rabbit import dead_letter_reasons


async def test_malformed_message_is_dead_lettered_with_reason_and_consumer_keeps_serving(
    broker: Broker, amqp_url: str
) -> None:
    await broker.declare(topology.coordinator_queue())

    async def handler(delivery: Delivery) -> Reply:
        return Reply(ok=True, data={"echo": delivery.envelope.kind})

    await broker.consume(topology.COORDINATOR_QUEUE, handler)
    exchange = await broker.channel.get_exchange(topology.REQUESTS)
    await exchange.publish(aio_pika.Message(b"not json"), "query")
    await exchange.publish(aio_pika.Message(b'{"kind": "query", "id": "x"}'), "query")
    reasons = await dead_letter_reasons(amqp_url, 2)
    assert "Invalid JSON" in str(reasons[0])
    assert "sender" in str(reasons[1]) or "body" in str(reasons[1])
    reply = await broker.request("query", QueryRequest(what="status"), wait=5)
    assert reply.ok
    assert reply.data == {"echo": "query"}


async def test_request_without_coordinator_queue_is_unreachable(broker: Broker) -> None:
    with pytest.raises(BrokerUnavailable, match="coordinator"):
        await broker.request("query", QueryRequest(what="status"), wait=2)


async def test_publish_waits_for_confirm_and_persists(broker: Broker, amqp_url: str) -> None:
    await broker.declare(topology.agent_queue("h1"))
    envelope = make(QueryRequest(what="status"), "test")
    await broker.publish(topology.COMMANDS, topology.host_key("h1"), envelope, mandatory=True)
    queue = await broker.channel.get_queue(topology.agent_queue_name("h1"))
    message = await queue.get(timeout=5)
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.message_id == envelope.id
    await message.ack()
