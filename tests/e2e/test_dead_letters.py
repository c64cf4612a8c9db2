"""Issue 2 acceptance: a malformed request or report is dead-lettered with its reason,
and the coordinator process keeps serving."""

from __future__ import annotations

import asyncio

import pytest

from shared import topology
from tests.e2e.fleet import Fleet
from tests.support.rabbit import dead_letter_reasons, publish_raw

pytestmark = pytest.mark.e2e


async def _publish_and_collect(amqp_url: str, messages: list[tuple[str, str, bytes]]) -> list[str]:
    for exchange, key, body in messages:
        await publish_raw(amqp_url, exchange, key, [body])
    return await dead_letter_reasons(amqp_url, len(messages))


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
