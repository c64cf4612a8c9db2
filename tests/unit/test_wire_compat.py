"""Issue 9, heartbeat pacing, against mixed versions and replays: the fields pacing added to the
wire (`Heartbeat.interval`, `Ping.heartbeat_interval`) are left out while unset, so a
coordinator upgraded before its agents verifies what they sign, and an agent beating
at its own setting sends a heartbeat an older coordinator still reads. Pure: real
keys, real signatures, the models as they were before the fields came."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel, ConfigDict

from agent.reporter import Reporter
from shared import signing
from shared.config import AgentSettings
from shared.errors import Refused
from shared.messages import Envelope, Heartbeat, Ping, ServiceState, decode, encode, make

KEY = signing.generate()


def _signed_by_an_older_peer(kind: str, body: dict[str, Any], **fields: Any) -> bytes:
    """The wire form an older peer sends: its body as it knew it, signed over the
    canonical encoding of exactly what it sent."""
    doc = {"kind": kind, "id": "0" * 32, "sent_at": "2026-12-03T10:00:00Z",
           "expires_at": None, "sender": "agent:old", "to": None, "body": body, **fields}  # fmt: skip
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    doc["sig"] = base64.b64encode(KEY.sign(canonical.encode())).decode()
    return json.dumps(doc).encode()


def test_a_heartbeat_from_an_agent_that_predates_interval_verifies_and_says_no_period() -> None:
    raw = _signed_by_an_older_peer("heartbeat", {
        "host_id": "old", "services": [{"service": "web", "version": "1.0.0",
                                        "health": "healthy", "pid": None}],
        "labels": {"role": "web"}, "public_key": signing.public_text(KEY.public_key())})  # fmt: skip
    envelope = decode(raw)
    signing.check(envelope, KEY.public_key())  # raises Refused("bad_signature") if not
    assert isinstance(envelope.body, Heartbeat)
    assert envelope.body.interval is None


def test_a_heartbeat_altered_to_say_a_period_its_agent_did_not_sign_is_refused() -> None:
    raw = _signed_by_an_older_peer("heartbeat", {"host_id": "old", "services": []})
    doc = json.loads(raw)
    doc["body"]["interval"] = 3600.0
    with pytest.raises(Refused, match="signature"):
        signing.check(decode(json.dumps(doc).encode()), KEY.public_key())


class _HeartbeatBeforePacing(BaseModel):
    """Heartbeat as a coordinator before pacing declared it (extra fields refused)."""

    model_config = ConfigDict(extra="forbid")
    KIND: ClassVar[str] = "heartbeat"
    host_id: str
    services: list[ServiceState]
    labels: dict[str, str] | None = None
    public_key: str | None = None


class _PingBeforePacing(BaseModel):
    model_config = ConfigDict(extra="forbid")


async def _nothing_runs() -> list[ServiceState]:
    return []


def _reporter() -> Reporter:
    """A new agent's reporter at heartbeat_interval 2 s (no broker: nothing is sent)."""
    settings = AgentSettings(host_id="new", heartbeat_interval=2.0)
    public = signing.public_text(KEY.public_key())
    return Reporter(None, "new", {"role": "web"}, public, settings, _nothing_runs)  # type: ignore[arg-type]


def _reporter_beat(interval: float) -> Heartbeat:
    reporter = _reporter()
    reporter.pace(interval, datetime.now(UTC))
    return reporter.beat([])


def test_an_agent_beating_at_its_own_setting_sends_what_an_older_coordinator_reads() -> None:
    wire = json.loads(encode(make(_reporter_beat(2.0), "agent:new")))
    assert "interval" not in wire["body"]
    _HeartbeatBeforePacing.model_validate(wire["body"])  # raises on an unknown field


def test_an_agent_told_a_longer_period_says_it_in_its_heartbeats() -> None:
    wire = json.loads(encode(make(_reporter_beat(8.0), "agent:new")))
    assert wire["body"]["interval"] == 8.0


def test_a_ping_without_a_period_is_the_ping_older_agents_know_and_signs_the_same() -> None:
    signer = signing.Signer(KEY)
    envelope = signer.sign(make(Ping(), "coordinator", to="old"))
    wire = json.loads(encode(envelope))
    assert wire["body"] == {}
    _PingBeforePacing.model_validate(wire["body"])
    again: Envelope = decode(encode(envelope))
    signing.check(again, KEY.public_key())


def test_an_agent_heeds_only_a_ping_newer_than_the_last_it_heeded() -> None:
    """A replayed or overtaken Ping (signed, still fresh) cannot set an older period."""
    reporter = _reporter()
    now = datetime.now(UTC)
    reporter.pace(16.0, now)
    reporter.pace(4.0, now - timedelta(seconds=30))  # told before the 16 s
    assert reporter.interval == 16.0
    reporter.pace(8.0, now + timedelta(seconds=30))
    assert reporter.interval == 8.0
