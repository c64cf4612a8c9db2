"""Transport against the real broker: confirms, dead-lettering with a reason, request/reply."""

from __future__ import annotations

import asyncio

import aio_pika
import pytest

from shared import topology
from shared.config import BrokerSettings
from shared.errors import BrokerUnavailable
from shared.messages import Heartbeat, Ping, QueryRequest, Reply, make
from shared.transport import Broker, Delivery, Handler
from tests.agent.helpers import eventually
from tests.support.rabbit import dead_letter_reasons, rabbitmqctl


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


async def test_auto_ack_queue_heartbeats_leave_nothing_unacked_and_refused_ones_are_dead_lettered(
    broker: Broker, amqp_url: str
) -> None:
    """Heartbeats are consumed with auto-ack (issue 9): the broker forgets each as it
    delivers it (none is unacked even while its handler runs), a malformed one is still
    dead-lettered with its reason, and the consumer keeps serving."""
    await broker.declare(topology.heartbeats_queue())
    seen: list[str] = []
    release = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        seen.append(delivery.envelope.id)
        await release.wait()

    await broker.consume(topology.HEARTBEATS_QUEUE, handler, auto_ack=True)
    exchange = await broker.channel.get_exchange(topology.REPORTS)
    await exchange.publish(aio_pika.Message(b"not json"), topology.HEARTBEAT_KEY)
    reasons = await dead_letter_reasons(amqp_url, 1)
    assert "Invalid JSON" in str(reasons[0])
    beat = make(Heartbeat(host_id="h1", services=[]), "agent:h1")
    await broker.publish(topology.REPORTS, topology.HEARTBEAT_KEY, beat, ttl=5)
    await eventually(lambda: seen == [beat.id], "the good message handled")
    vhost_name = amqp_url.rsplit("/", 1)[1]
    listing = rabbitmqctl("list_queues", "-q", "-p", vhost_name, "name",
                          "messages_unacknowledged", "messages")  # fmt: skip
    row = next(line.split() for line in listing.splitlines()
               if line.startswith(topology.HEARTBEATS_QUEUE + "\t"))  # fmt: skip
    assert row[1:] == ["0", "0"], listing
    release.set()
