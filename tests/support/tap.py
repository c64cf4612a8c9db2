"""Tap an exchange: copies of the real messages a test's processes exchange, as raw bytes.

    async with tap(amqp_url, topology.COMMANDS, topology.host_key("host-a")) as captured:
        await asyncio.to_thread(fleet.deploy, "payments=2.0.0")  # keep the loop running
        commits = await wait_for(captured, lambda key, body: doc(body)["kind"] == "commit")

`captured` is a list of `(routing_key, body)` that grows, in arrival order, while the
block runs (an exclusive queue of the tap's own, bound with `keys`, consumed by plain
aio-pika on its own connection named after the running test). The exchange must exist:
start the coordinator (which declares the topology) first. Nothing is consumed from
anyone else's queue, but mind one side effect: a tap bound with `#` to
`lockstep.commands` makes every host key routable, so a mandatory publish to a host
that has no queue no longer comes back as unroutable.

`dead_letters` takes what was refused from lockstep.dead with its reason and its bytes,
so a test can tell which message was refused for what.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from shared import topology

Captured = list[tuple[str, bytes]]


@asynccontextmanager
async def tap(amqp_url: str, exchange: str, *keys: str) -> AsyncIterator[Captured]:
    """Capture every message `exchange` routes with one of `keys` (default `#`)."""
    connection = await _connect(amqp_url, "tap")
    captured: Captured = []

    async def keep(message: AbstractIncomingMessage) -> None:
        captured.append((message.routing_key or "", message.body))

    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        for key in keys or ("#",):
            await queue.bind(exchange, key)
        await queue.consume(keep, no_ack=True)
        yield captured


async def wait_for(
    captured: Captured,
    match: Callable[[str, bytes], bool],
    *,
    count: int = 1,
    timeout: float = 15.0,
    what: str = "a matching message",
) -> Captured:
    """The captured messages `match` accepts, once there are at least `count` of them;
    AssertionError naming `what` if the deadline passes first."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        found = [(key, body) for key, body in captured if match(key, body)]
        if len(found) >= count:
            return found
        if loop.time() > deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {count} of {what}: "
                f"{len(found)} of the {len(captured)} messages captured match"
            )
        await asyncio.sleep(0.05)  # poll interval within the deadline


async def dead_letters(amqp_url: str, count: int, timeout: float = 15.0) -> list[tuple[str, bytes]]:
    """Take the next `count` messages from lockstep.dead (fewer if the deadline passes)
    as `(reason, body)`: the `x-lockstep-reason` header and the refused bytes as sent."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    found: list[tuple[str, bytes]] = []
    async with await _connect(amqp_url, "dead") as connection:
        channel = await connection.channel()
        queue = await channel.get_queue(topology.DEAD_QUEUE)
        while len(found) < count and loop.time() < deadline:
            message = await queue.get(fail=False)
            if message is None:
                await asyncio.sleep(0.05)  # poll interval within the deadline
                continue
            await message.ack()
            found.append((str(message.headers.get(topology.REASON_HEADER)), message.body))
    return found


def doc(body: bytes) -> dict[str, Any]:
    """A captured body as JSON (envelopes: `doc(body)["kind"]`, `doc(body)["body"]`)."""
    value = json.loads(body)
    return value if isinstance(value, dict) else {}


async def _connect(amqp_url: str, role: str) -> AbstractConnection:
    """A connection named after the running test, so the broker shows who owns it."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "lockstep-test").split(" ")[0]
    return await aio_pika.connect(amqp_url, client_properties={"connection_name": f"{role}:{test}"})
