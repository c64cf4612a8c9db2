"""A RabbitMQ vhost per test, made and removed with rabbitmqctl."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

BASE_URL = "amqp://guest:guest@127.0.0.1:5672/"


def rabbitmqctl(*args: str, timeout: float = 60) -> str:
    done = subprocess.run(
        ["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=timeout, check=True
    )
    return done.stdout


@contextmanager
def vhost(label: str) -> Iterator[str]:
    """A fresh vhost for `label`; yields its AMQP URL and deletes it afterwards."""
    name = f"lockstep-test-{label[:40]}-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield f"{BASE_URL}{name}"
    finally:
        _delete(name)


def _delete(name: str, attempts: int = 3) -> None:
    """Delete a vhost; rabbitmqctl can fail transiently under load, so try again."""
    for attempt in range(attempts):
        try:
            rabbitmqctl("delete_vhost", name)
            return
        except subprocess.CalledProcessError:
            if attempt + 1 == attempts:
                raise
            time.sleep(1)  # rabbitmqctl's own retry pacing, not a test synchronisation


async def dead_letter_reasons(amqp_url: str, count: int, timeout: float = 15) -> list[str]:
    """The reasons of the next `count` messages in lockstep.dead (fewer if the deadline passes)."""
    import asyncio

    import aio_pika

    from shared import topology

    connection = await aio_pika.connect(amqp_url)
    reasons: list[str] = []
    async with connection:
        channel = await connection.channel()
        dead = await channel.get_queue(topology.DEAD_QUEUE)
        deadline = asyncio.get_running_loop().time() + timeout
        while len(reasons) < count and asyncio.get_running_loop().time() < deadline:
            message = await dead.get(fail=False)
            if message is None:
                await asyncio.sleep(0.05)  # poll interval within the deadline
                continue
            await message.ack()
            reasons.append(str(message.headers.get(topology.REASON_HEADER)))
    return reasons


async def publish_raw(amqp_url: str, exchange: str, key: str, bodies: list[bytes]) -> None:
    """Publish raw bodies with plain aio-pika, as another system (or a duplicate) would."""
    import aio_pika

    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        target = await channel.get_exchange(exchange)
        for body in bodies:
            await target.publish(aio_pika.Message(body, delivery_mode=2), key)
