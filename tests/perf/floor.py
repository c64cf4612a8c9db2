"""The broker's floor for a fleet of N: a raw aio-pika scatter/gather, two rounds.

`tests.perf.fleet` measures it in the same run as the deploys, on queues no agent
consumes (before the agents start, and before each run). Each worker process
(`tests.perf.fleetworker`) runs `Responders` for its hosts: one floor queue per host,
of the agent queues' type (durable; classic or quorum), bound to a topic exchange with
the agent's routing key `host.<id>`, consumed on a channel of its own over as many
connections as the agents use. The harness's
`Gatherer` publishes one persistent, confirmed, mandatory message to every queue from
one channel (as the coordinator publishes commands), and each responder answers with
one persistent, confirmed reply to one quorum queue (as agents report to
lockstep.coordinator), acking the command once its reply is confirmed. One measurement
is two such rounds back to back: the least any two-phase protocol over this broker and
these queues needs. `fanout` publishes once to a fanout exchange bound to every floor
queue instead: cheaper, but unavailable to lockstep, whose commands are signed for one
host each (SPEC 7), so it is reported for comparison only.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage, AbstractQueue

from shared import topology

EXCHANGE = "perf.floor"
FANOUT = "perf.floor.fanout"
REPLIES = "perf.floor.replies"
COMMAND_BYTES = 1024
"""About a prepare (it carries the service version); a reply is about a vote."""
REPLY_BYTES = 300


def queue_name(host_id: str) -> str:
    return f"perf.floor.{host_id}"


def _padded(doc: dict[str, Any], size: int) -> bytes:
    raw = json.dumps(doc)
    return json.dumps({**doc, "pad": "x" * max(0, size - len(raw) - 10)}).encode()


class Responders:
    """The worker's side: one floor queue and consumer per host."""

    def __init__(self, connections: list[AbstractConnection], queue_type: str) -> None:
        self.connections = connections
        self.queue_type = queue_type
        self._queues: list[tuple[AbstractQueue, str]] = []
        self._channels: list[AbstractChannel] = []

    async def start(self, host_ids: list[str]) -> None:
        per = -(-len(host_ids) // len(self.connections))
        for index, host_id in enumerate(host_ids):
            channel = await self.connections[index // per].channel(publisher_confirms=True)
            await channel.set_qos(prefetch_count=100)
            queue = await channel.declare_queue(
                queue_name(host_id), durable=True, arguments={"x-queue-type": self.queue_type}
            )
            await queue.bind(EXCHANGE, topology.host_key(host_id))
            await queue.bind(FANOUT, "")
            tag = await queue.consume(self._answer(channel, host_id))
            self._queues.append((queue, tag))
            self._channels.append(channel)

    @staticmethod
    def _answer(channel: AbstractChannel, host_id: str) -> Any:
        async def answer(message: AbstractIncomingMessage) -> None:
            doc = json.loads(message.body)
            reply = _padded({"round": doc["round"], "host": host_id}, REPLY_BYTES)
            await channel.default_exchange.publish(
                aio_pika.Message(reply, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                REPLIES,
            )
            await message.ack()

        return answer

    async def stop(self) -> None:
        """Delete the floor queues (so only the agents' queues remain) and their channels."""
        for queue, tag in self._queues:
            await queue.cancel(tag)
            await queue.delete(if_unused=False, if_empty=False)
        for channel in self._channels:
            await channel.close()
        self._queues.clear()
        self._channels.clear()


class Gatherer:
    """The harness's side: scatter to every floor queue, gather every reply."""

    def __init__(self, connection: AbstractConnection) -> None:
        self.connection = connection
        self._round = 0
        self._replies = 0
        self._expected = 0
        self._done = asyncio.Event()

    async def setup(self) -> None:
        """Declare the exchanges and the reply queue (before the responders bind)."""
        self.channel = await self.connection.channel(publisher_confirms=True)
        await self.channel.set_qos(prefetch_count=100)
        self.exchange = await self.channel.declare_exchange(EXCHANGE, "topic", durable=True)
        self.fanout = await self.channel.declare_exchange(FANOUT, "fanout", durable=True)
        self.replies = await self.channel.declare_queue(
            REPLIES, durable=True, arguments={"x-queue-type": "quorum"}
        )
        self._tag = await self.replies.consume(self._on_reply)

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        if json.loads(message.body)["round"] == self._round:
            self._replies += 1
            if self._replies >= self._expected:
                self._done.set()
        await message.ack()

    async def _one_round(self, host_ids: list[str], fanout: bool, timeout: float) -> None:
        self._round += 1
        self._replies, self._expected = 0, len(host_ids)
        self._done.clear()
        body = _padded({"round": self._round}, COMMAND_BYTES)

        def message() -> aio_pika.Message:
            return aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)

        if fanout:
            await self.fanout.publish(message(), "")
        else:
            await asyncio.gather(*(
                self.exchange.publish(message(), topology.host_key(h), mandatory=True)
                for h in host_ids
            ))  # fmt: skip
        await asyncio.wait_for(self._done.wait(), timeout)

    async def scatter_gather(self, host_ids: list[str], fanout: bool, timeout: float) -> float:
        """Seconds for two rounds (a command to each queue, a reply from each, twice)."""
        started = time.monotonic()
        for _ in range(2):
            await self._one_round(host_ids, fanout, timeout)
        return time.monotonic() - started

    async def measure(
        self, host_ids: list[str], reps: int, fanout: bool, timeout: float
    ) -> list[float]:
        """`reps` two-round measurements (seconds each)."""
        return [await self.scatter_gather(host_ids, fanout, timeout) for _ in range(reps)]

    async def teardown(self) -> None:
        await self.replies.cancel(self._tag)
        await self.replies.delete(if_unused=False, if_empty=False)
        await self.exchange.delete()
        await self.fanout.delete()
        await self.channel.close()
