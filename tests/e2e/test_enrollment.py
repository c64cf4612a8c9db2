"""Issue 8 acceptance (SPEC 7, invariant I6): which agent keys the coordinator believes,
and the keys themselves, with a real coordinator, real agents and real services.

Reports are tapped on `lockstep.reports` to know that the coordinator has handled
them: its queue is consumed in order, so a query sent after a report was seen is
answered after that report took (or did not take) effect. Each test is named after
the acceptance bullet it proves.
"""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from shared import signing, topology
from shared.messages import Heartbeat, ServiceState, encode, make
from tests.e2e.fleet import LOCKSTEP, Fleet, Host
from tests.support.procs import Procs, wait_until
from tests.support.rabbit import publish_raw
from tests.support.tap import Captured, dead_letters, doc, tap, wait_for

pytestmark = pytest.mark.e2e

PAY = {"pay": "yes"}


async def test_reports_from_pending_rejected_or_revoked_keys_change_nothing_and_only_approved_hosts_are_deployed_to(
    tmp_path: Path, procs: Procs, lockstep_env: dict[str, str], amqp_url: str
) -> None:
    fleet = Fleet(tmp_path, lockstep_env, procs, auto_approve=False)
    fleet.start_coordinator()
    for version in ("1.0.0", "2.0.0"):
        fleet.register("payments", version, hosts=PAY)
    async with tap(
        amqp_url, topology.REPORTS, topology.REPORTS_KEY, topology.HEARTBEAT_KEY
    ) as reports:
        host_a = fleet.add_host("host-a", **PAY)
        pending = await _until(lambda: _enrolled(fleet, "host-a"), 20, "host-a to enroll")
        assert pending["key_state"] == "pending"
        assert pending["fingerprint"] == _fingerprint(host_a)
        assert "host-a" not in _status_hosts(fleet)
        await _reports_change_nothing(fleet, reports, "host-a")
        refused = fleet.cli("deploy", "payments=1.0.0", "--json")
        assert refused.code == 2, refused.stdout + refused.stderr
        assert "matches no live agent" in refused.doc["error"]["reason"]
        assert fleet.history()["deployments"] == []

        assert _act(fleet, "approve", "host-a") == "approved"
        alive = lambda: _status_hosts(fleet).get("host-a", {}).get("alive")  # noqa: E731
        await _until(alive, 20, "host-a alive in status")
        first = await asyncio.to_thread(fleet.deploy, "payments=1.0.0")
        assert first.code == 0, first.stdout + first.stderr
        assert fleet.http_version("host-a", "payments") == "1.0.0"

        fleet.add_host("host-b", **PAY)
        await _until(lambda: _enrolled(fleet, "host-b"), 20, "host-b to enroll")
        assert _act(fleet, "reject", "host-b") == "rejected"
        await _reports_change_nothing(fleet, reports, "host-b")
        second = await asyncio.to_thread(fleet.deploy, "payments=2.0.0")
        assert second.code == 0, second.stdout + second.stderr
        assert {p["host"] for p in second.doc["participants"]} == {"host-a"}
        assert fleet.http_version("host-b", "payments") is None
        assert fleet.switches("host-b") == []

        assert _act(fleet, "revoke", "host-a") == "revoked"
        before, seq = _agent(fleet, "host-a"), _last_event(fleet)
        pid = fleet.pid("host-a", "payments")
        assert pid is not None
        since = time.time()
        os.kill(pid, signal.SIGKILL)
        await wait_for(reports, _killed(pid, since, "health.change"), what="a health change")
        await wait_for(reports, _killed(pid, since, "heartbeat"), what="a heartbeat without it")
        after = _agent(fleet, "host-a")
    assert after["services"] == before["services"], "a revoked key's heartbeat was believed"
    assert after["last_seen"] == before["last_seen"]
    assert after["key_state"] == "revoked"
    assert _last_event(fleet) == seq, "a revoked key's health change was recorded"
    assert _status_hosts(fleet) == {}
    refused = fleet.cli("deploy", "payments=1.0.0", "--json")
    assert refused.code == 2, refused.stdout + refused.stderr


async def test_an_approved_host_that_presents_a_new_key_is_refused_with_the_agent_key_mismatch_event(
    fleet: Fleet, amqp_url: str
) -> None:
    host = fleet.add_host("host-a", **PAY)
    fleet.wait_alive("host-a")
    enrolled = _agent(fleet, "host-a")
    assert enrolled["key_state"] == "approved"
    assert enrolled["fingerprint"] == _fingerprint(host)
    assert stat.S_IMODE((host.state_dir / "agent.key").stat().st_mode) == 0o600

    async with tap(amqp_url, topology.EVENTS, "agent.*") as events:
        fleet.kill_agent("host-a")
        for name in ("agent.key", "agent.pub"):
            (host.state_dir / name).unlink()
        fleet.start_agent("host-a")
        await _until(lambda: (host.state_dir / "agent.pub").exists(), 20, "a new key pair")
        presented = _fingerprint(host)
        assert presented != enrolled["fingerprint"]
        mismatch = lambda key, _: key == "agent.key_mismatch"  # noqa: E731
        published = await wait_for(events, mismatch, what="agent.key_mismatch")
    event = doc(published[0][1])["body"]["data"]
    assert (event["host_id"], event["presented"]) == ("host-a", presented)

    dead = await dead_letters(amqp_url, 2)
    assert len(dead) == 2, dead
    for reason, _ in dead:
        assert reason.startswith("key_mismatch"), reason
        assert "host-a" in reason, reason
    await _until(lambda: _agent(fleet, "host-a")["state"] == "lost", 20, "host-a counted lost")
    kept = _agent(fleet, "host-a")
    assert (kept["key_state"], kept["fingerprint"]) == ("approved", enrolled["fingerprint"])
    assert host.proc is not None
    assert host.proc.poll() is None, "the agent runs; only its reports are refused"
    mismatches = [e for e in fleet.cli("events", "--json").doc["events"]
                  if e["type"] == "agent.key_mismatch"]  # fmt: skip
    assert len(mismatches) == 1, "one event per presented key, not one per heartbeat"

    # The operator's way out: remove the host; its next report enrolls the new key.
    assert fleet.cli("agents", "remove", "host-a", "--json").code == 0
    await _until(lambda: (_enrolled(fleet, "host-a") or {}).get("fingerprint") == presented, 20,
                 "host-a to enroll its new key")  # fmt: skip
    fleet.wait_alive("host-a")


async def test_a_report_stamped_beyond_the_clock_skew_is_refused_as_future_and_later_heartbeats_still_update_the_host(
    fleet: Fleet, amqp_url: str
) -> None:
    host = fleet.add_host("host-a", **PAY)
    fleet.wait_alive("host-a")
    for version in ("1.0.0", "2.0.0"):
        fleet.register("payments", version, hosts=PAY)
    assert fleet.deploy("payments=1.0.0").code == 0
    signer = signing.Signer(signing.load_private(host.state_dir / "agent.key"))
    heartbeat = Heartbeat(host_id="host-a", labels=host.labels, public_key=signer.public,
                          services=[ServiceState(service="payments", version="9.9.9",
                                                 health="healthy")])  # fmt: skip
    year_3000 = datetime(3000, 1, 1, tzinfo=UTC)
    forged = encode(signer.sign(make(heartbeat, "agent:host-a", sent_at=year_3000)))

    await publish_raw(amqp_url, topology.REPORTS, topology.REPORTS_KEY, [forged])
    dead = await dead_letters(amqp_url, 1)
    assert [body for _, body in dead] == [forged]
    assert dead[0][0].startswith("future"), dead[0][0]
    assert fleet.reported()[("host-a", "payments")] == "1.0.0"

    since = time.time()
    await _until(lambda: _status_hosts(fleet)["host-a"]["last_seen"] > since, 10, "a heartbeat")
    second = fleet.deploy("payments=2.0.0")
    assert second.code == 0, second.stdout + second.stderr
    assert fleet.reported()[("host-a", "payments")] == "2.0.0"


def test_the_coordinator_refuses_to_start_without_its_key_an_agent_without_the_coordinator_key_and_keys_init_writes_0600_and_never_overwrites(
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "LOCKSTEP_COORDINATOR_KEY"}
    env.update(LOCKSTEP_AMQP_URL="amqp://guest:guest@127.0.0.1:1/", LOCKSTEP_CONNECT_TIMEOUT="1s")
    keys, empty = tmp_path / "keys", tmp_path / "empty"
    empty.mkdir()

    no_key = _run(env, "coordinator", "--key-dir", str(empty), "--db", str(tmp_path / "c.db"))
    assert no_key.returncode == 2, no_key.stderr
    assert "keys init" in no_key.stderr
    assert not (tmp_path / "c.db").exists()
    no_trust = _run(env, "agent", "--host-id", "host-a", "--state-dir", str(tmp_path / "a"))
    assert no_trust.returncode == 2, no_trust.stderr
    assert "--coordinator-key" in no_trust.stderr
    assert not (tmp_path / "a" / "agent.key").exists()

    made = _run(env, "keys", "init", "--dir", str(keys), "--json")
    assert made.returncode == 0, made.stderr
    private, public = keys / signing.COORDINATOR_KEY, keys / signing.COORDINATOR_PUB
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key = signing.load_private(private)
    assert signing.public_text(key.public_key()) == public.read_text().strip()
    written = (private.read_bytes(), public.read_bytes())
    again = _run(env, "keys", "init", "--dir", str(keys), "--json")
    assert again.returncode == 2, again.stdout
    assert "overwrite" in again.stderr
    assert (private.read_bytes(), public.read_bytes()) == written

    private.chmod(0o644)
    too_open = _run(env, "coordinator", "--key-dir", str(keys), "--db", str(tmp_path / "c.db"))
    assert too_open.returncode == 2, too_open.stderr
    assert "chmod 600" in too_open.stderr
    not_public = _run(env, "agent", "--host-id", "host-a", "--state-dir", str(tmp_path / "a"),
                      "--coordinator-key", str(private))  # fmt: skip
    assert not_public.returncode == 2, not_public.stderr


# --- helpers ---------------------------------------------------------------------------


def _enrolled(fleet: Fleet, host_id: str) -> dict[str, Any] | None:
    """`host_id`'s row in `lockstep agents --json` (None until it enrolled)."""
    result = fleet.cli("agents", "--json")
    assert result.code == 0, result.stderr
    return next((a for a in result.doc["agents"] if a["host_id"] == host_id), None)


def _agent(fleet: Fleet, host_id: str) -> dict[str, Any]:
    """`host_id`'s row in `lockstep agents --json`; it must have enrolled."""
    row = _enrolled(fleet, host_id)
    assert row is not None, f"{host_id} is not enrolled"
    return row


def _status_hosts(fleet: Fleet) -> dict[str, dict[str, Any]]:
    """The hosts `lockstep status --json` lists, by id."""
    return {h["host_id"]: h for h in fleet.status()["hosts"]}


def _act(fleet: Fleet, action: str, host_id: str) -> str:
    """`lockstep agents ACTION HOST`; the key state it reports."""
    result = fleet.cli("agents", action, host_id, "--json")
    assert result.code == 0, result.stdout + result.stderr
    return str(result.doc["key_state"])


def _fingerprint(host: Host) -> str:
    return signing.fingerprint((host.state_dir / "agent.pub").read_text().strip())


def _sent_after(since: float, body: bytes) -> bool:
    return datetime.fromisoformat(doc(body)["sent_at"]).timestamp() > since


async def _reports_change_nothing(fleet: Fleet, reports: Captured, host_id: str) -> None:
    """Two heartbeats of `host_id` published after a look at its row leave it as it was."""
    before = _agent(fleet, host_id)
    since = time.time()

    def heartbeat(key: str, body: bytes) -> bool:
        envelope = doc(body)
        return (envelope["kind"] == "heartbeat" and envelope["body"]["host_id"] == host_id
                and _sent_after(since, body))  # fmt: skip

    await wait_for(reports, heartbeat, count=2, what=f"two heartbeats of {host_id}")
    after = _agent(fleet, host_id)
    assert (after["last_seen"], after["services"]) == (before["last_seen"], before["services"])
    assert host_id not in _status_hosts(fleet)


def _killed(pid: int, since: float, kind: str) -> Any:
    """Matches a report of `kind` from host-a, sent after `since`, saying its payments
    process `pid` is gone (a heartbeat: another pid or none; a health change: unhealthy)."""

    def match(key: str, body: bytes) -> bool:
        envelope = doc(body)
        report = envelope["body"]
        if envelope["kind"] != kind or report.get("host_id") != "host-a":
            return False
        if not _sent_after(since, body):
            return False
        if kind == "health.change":
            return bool(report["health"] != "healthy")
        return any(s["service"] == "payments" and s["pid"] != pid for s in report["services"])

    return match


def _last_event(fleet: Fleet) -> int:
    """The sequence number of the coordinator's newest recorded event."""
    return max((e["seq"] for e in fleet.cli("events", "--json").doc["events"]), default=0)


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LOCKSTEP, *args], env=env, capture_output=True, text=True, timeout=60)


async def _until(predicate: Any, timeout: float, what: str) -> Any:
    """`wait_until` for async tests: the polling leaves the event loop (and taps) running."""
    return await asyncio.to_thread(wait_until, predicate, timeout, what)
