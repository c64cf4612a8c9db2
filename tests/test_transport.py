"""Transport against the real broker: confirms, dead-lettering with a reason, request/reply."""

from __future__ import annotations

import aio_pika
import pytest

from shared import topology
from shared.config import BrokerSettings
from shared.errors import BrokerUnavailable
from shared.messages import Ping, QueryRequest, Reply, make
from shared.transport import Broker, Delivery, Handler
from tests.agent.helpers import eventually
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


async def test_brokers_sharing_one_connection_each_consume_and_publish_and_close_alone(
    broker: Broker, amqp_url: str
) -> None:
    await broker.declare(topology.agent_queue("h1"), topology.agent_queue("h2"))
    settings = BrokerSettings(amqp_url=amqp_url)
    hub = Broker(settings, "test:hub")
    await hub.connect()
    a, b = Broker(settings, "test:a", share=hub), Broker(settings, "test:b", share=hub)
    got: dict[str, list[str]] = {"h1": [], "h2": []}

    def keep(host: str) -> Handler:
        async def handler(delivery: Delivery) -> None:
            got[host].append(delivery.envelope.id)

        return handler

    try:
        await a.connect()
        await b.connect()
        await a.consume(topology.agent_queue_name("h1"), keep("h1"))
        await b.consume(topology.agent_queue_name("h2"), keep("h2"))
        to_b, to_a = make(Ping(), "test"), make(Ping(), "test")
        await a.publish(topology.COMMANDS, topology.host_key("h2"), to_b, mandatory=True)
        await b.publish(topology.COMMANDS, topology.host_key("h1"), to_a, mandatory=True)
        await eventually(lambda: got == {"h1": [to_a.id], "h2": [to_b.id]}, "both delivered")

        await a.close()  # its channels only: b and the shared connection go on
        again = make(Ping(), "test")
        await b.publish(topology.COMMANDS, topology.host_key("h2"), again, mandatory=True)
        await eventually(lambda: got["h2"] == [to_b.id, again.id], "b still consuming")
        left = make(Ping(), "test")
        await b.publish(topology.COMMANDS, topology.host_key("h1"), left, mandatory=True)
        queue = await broker.channel.get_queue(topology.agent_queue_name("h1"))
        message = await queue.get(timeout=5)  # a consumes no more: it waits in the queue
        assert message.message_id == left.id
        await message.ack()
        assert got["h1"] == [to_a.id]
    finally:
        await b.close()
        await a.close()
        await hub.close()
