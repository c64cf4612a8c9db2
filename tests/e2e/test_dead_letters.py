"""Issue 2 acceptance: a malformed request or report is dead-lettered with its reason,
and the coordinator process keeps serving."""

from __future__ import annotations

import asyncio

import aio_pika
import pytest

from shared import topology
from tests.e2e.fleet import Fleet

pytestmark = pytest.mark.e2e


async def _publish_and_collect(amqp_url: str, messages: list[tuple[str, str, bytes]]) -> list[str]:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        for exchange_name, key, body in messages:
            exchange = await channel.get_exchange(exchange_name)
            await exchange.publish(aio_pika.Message(body), key)
        dead = await channel.get_queue(topology.DEAD_QUEUE)
        reasons: list[str] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while len(reasons) < len(messages) and loop.time() < deadline:
            message = await dead.get(fail=False)
            if message is None:
                await asyncio.sleep(0.05)
                continue
            await message.ack()
            reasons.append(str(message.headers.get(topology.REASON_HEADER)))
        return reasons


def test_malformed_request_and_report_are_dead_lettered_with_reason_and_coordinator_keeps_serving(
    fleet: Fleet, amqp_url: str
) -> None:
    bad_report = b'{"kind": "vote", "id": "r1", "sender": "agent:x", "body": {"yes": "maybe"}}'
    reasons = asyncio.run(
        _publish_and_collect(
            amqp_url,
            [
                (topology.REQUESTS, "deploy", b"{not json"),
                (topology.REPORTS, topology.REPORTS_KEY, bad_report),
            ],
        )
    )
    assert len(reasons) == 2, reasons
    assert "Invalid JSON" in reasons[0]
    assert "body.deployment_id" in reasons[1] or "body.yes" in reasons[1]
    status = fleet.cli("status", "--json")
    assert status.code == 0, status.stderr
    assert fleet.coordinator is not None
    assert fleet.coordinator.poll() is None, "the coordinator process is still running"


def test_cli_exits_3_when_no_coordinator_answers(fleet: Fleet) -> None:
    fleet.kill_coordinator()
    env = dict(fleet.env, LOCKSTEP_REQUEST_TIMEOUT="2")
    fleet.env = env
    result = fleet.cli("status", "--json")
    assert result.code == 3
    assert result.doc["error"]["kind"] == "unreachable"
