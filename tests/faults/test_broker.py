"""Issue 5: the transport survives a broker restart and dropped connections.

aio-pika's robust connection has had bugs resuming consumers (FIELD-NOTES), so this is
checked against the real broker: `rabbitmqctl stop_app` / `start_app` and
`close_all_connections`, with a consumer that must keep consuming afterwards and a
publish made during the outage that must arrive once the broker is back.
"""

from __future__ import annotations

import asyncio

import pytest

from shared import topology
from shared.config import BrokerSettings
from shared.messages import Ping, make
from shared.transport import Broker, Delivery
from tests.support.rabbit import rabbitmqctl

pytestmark = pytest.mark.fault


async def _consuming(amqp_url: str, name: str) -> tuple[Broker, asyncio.Queue[str]]:
    broker = Broker(BrokerSettings(amqp_url=amqp_url, publish_retry=60), name)
    await broker.connect()
    await broker.declare(topology.agent_queue("h1"))
    got: asyncio.Queue[str] = asyncio.Queue()

    async def handler(delivery: Delivery) -> None:
        await got.put(delivery.envelope.id)

    await broker.consume(topology.agent_queue_name("h1"), handler)
    return broker, got


async def _roundtrip(publisher: Broker, got: asyncio.Queue[str]) -> None:
    envelope = make(Ping(), "test")
    await publisher.publish(topology.COMMANDS, topology.host_key("h1"), envelope, mandatory=True)
    while (await asyncio.wait_for(got.get(), 30)) != envelope.id:
        pass


async def test_consumer_resumes_and_unconfirmed_publish_is_resent_after_broker_restart(
    amqp_url: str,
) -> None:
    consumer, got = await _consuming(amqp_url, "fault:consumer")
    publisher = Broker(BrokerSettings(amqp_url=amqp_url, publish_retry=60), "fault:publisher")
    await publisher.connect()
    try:
        await _roundtrip(publisher, got)
        await asyncio.to_thread(rabbitmqctl, "stop_app")
        try:
            during = asyncio.create_task(_roundtrip(publisher, got), name="publish-during-outage")
            await asyncio.sleep(0)
        finally:
            await asyncio.to_thread(rabbitmqctl, "start_app")
            await asyncio.to_thread(rabbitmqctl, "await_startup")
        await asyncio.wait_for(during, 60)
        await _roundtrip(publisher, got)
    finally:
        await publisher.close()
        await consumer.close()


async def test_consumer_resumes_after_all_connections_are_closed(amqp_url: str) -> None:
    consumer, got = await _consuming(amqp_url, "fault:consumer")
    publisher = Broker(BrokerSettings(amqp_url=amqp_url, publish_retry=60), "fault:publisher")
    await publisher.connect()
    try:
        await _roundtrip(publisher, got)
        await asyncio.to_thread(rabbitmqctl, "close_all_connections", "fault test")
        await asyncio.wait_for(_roundtrip(publisher, got), 60)
    finally:
        await publisher.close()
        await consumer.close()
