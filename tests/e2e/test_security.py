"""Issue 8 acceptance (SPEC 7, invariant I6): what an agent executes, and what each
exchange carries, with a real coordinator, real agents and real services.

Commands are tapped from real deploys and played back, altered, re-signed or forged
on the test's vhost; every refusal is matched to the very bytes that were refused.
Each test is named after the acceptance bullet it proves.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared import signing, topology
from shared.messages import (
    Abort,
    Body,
    DeployRequest,
    Revert,
    Vote,
    encode,
    make,
)
from shared.specs import load_service_version
from tests.e2e.fleet import SERVICES, Fleet
from tests.support.procs import Procs, wait_until
from tests.support.rabbit import publish_raw
from tests.support.tap import dead_letters, doc, tap, wait_for

pytestmark = pytest.mark.e2e

PAY = {"pay": "yes"}
TTL = 15.0
"""Command lifetime of the replay test's coordinator: long enough for a replay of the
last commit to be fresh, short enough to wait out for the expired case."""


async def test_tapped_commands_replayed_altered_junk_signed_unsigned_expired_or_misaddressed_are_each_refused_with_their_reason_and_change_nothing(
    tmp_path: Path, procs: Procs, lockstep_env: dict[str, str], amqp_url: str
) -> None:
    env = dict(lockstep_env, LOCKSTEP_COMMAND_TTL=f"{TTL:g}s", LOCKSTEP_CLOCK_SKEW="0")
    fleet = Fleet(tmp_path, env, procs)
    fleet.start_coordinator()
    fleet.add_host("host-a", **PAY)
    fleet.add_host("host-b", **PAY)
    fleet.wait_alive("host-a", "host-b")
    for version in ("1.0.0", "2.0.0", "3.0.0"):
        fleet.register("payments", version, hosts=PAY)
    assert fleet.deploy("payments=1.0.0").code == 0

    async with tap(amqp_url, topology.COMMANDS, topology.host_key("host-a")) as captured:
        second = await asyncio.to_thread(fleet.deploy, "payments=2.0.0")
        assert second.code == 0, second.stdout + second.stderr
        prepare_raw, prepare = await _one(captured, "prepare")
        commit_raw, commit = await _one(captured, "commit")
    for command in (prepare, commit):
        assert command["to"] == "host-a", command
        assert command["sig"], command
        assert command["expires_at"], command
    assert _expires(commit) > time.time() + 3, "the deploy outlived most of the command TTL"
    before = {host: _facts(fleet, host) for host in ("host-a", "host-b")}

    junk = base64.b64encode(os.urandom(64)).decode()
    later = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    refusals: list[tuple[str, bytes, str]] = [
        ("host-a", commit_raw, "replayed"),
        ("host-a", _altered(commit, id=uuid.uuid4().hex), "bad_signature"),
        ("host-a", _altered(commit, expires_at=later), "bad_signature"),
        ("host-a", _altered(commit, to="host-b"), "bad_signature"),
        ("host-a", _altered(commit, body={**commit["body"], "version": "1.0.0"}), "bad_signature"),
        ("host-a", _altered(commit, sig=junk), "bad_signature"),
        ("host-a", _altered(commit, sig=None), "unsigned"),
        ("host-b", prepare_raw, "wrong_host"),
    ]
    for host, raw, _ in refusals:
        await publish_raw(amqp_url, topology.COMMANDS, topology.host_key(host), [raw])
    # Expiry is checked before the replay check: an expired command is refused as such.
    await _until(lambda: time.time() > _expires(prepare) + 0.5, TTL + 10, "the prepare to expire")
    refusals.append(("host-a", prepare_raw, "expired"))
    await publish_raw(amqp_url, topology.COMMANDS, topology.host_key("host-a"), [prepare_raw])

    dead = await dead_letters(amqp_url, len(refusals))
    refused = Counter((body, reason.split(":", 1)[0]) for reason, body in dead)
    assert refused == Counter((raw, code) for _, raw, code in refusals), [r for r, _ in dead]
    assert {host: _facts(fleet, host) for host in ("host-a", "host-b")} == before
    third = await asyncio.to_thread(fleet.deploy, "payments=3.0.0")
    assert third.code == 0, third.stdout + third.stderr
    assert {fleet.http_version(h, "payments") for h in ("host-a", "host-b")} == {"3.0.0"}


async def test_forged_abort_with_a_path_for_deployment_id_deletes_nothing_and_forged_revert_carrying_its_own_spec_runs_nothing(
    fleet: Fleet, amqp_url: str, tmp_path: Path, coordinator_key: Ed25519PrivateKey
) -> None:
    host = fleet.add_host("host-a", **PAY)
    fleet.wait_alive("host-a")
    fleet.register("payments", "1.0.0", hosts=PAY)
    fleet.register("payments", "2.0.0", hosts=PAY)
    assert fleet.deploy("payments=1.0.0").code == 0
    assert fleet.deploy("payments=2.0.0").code == 0
    absolute, relative = tmp_path / "precious", host.state_dir / "precious"
    for victim in (absolute, relative):
        victim.mkdir()
        (victim / "data").write_text("keep me\n")
    escape = "../../../precious"  # from services/payments/staging/<id> up to the state dir
    marker = tmp_path / "forged-revert-ran"
    spec = load_service_version(fleet.specs / "payments-1.0.0.toml")
    evil = spec.model_copy(update={"run": f"touch {marker} && {spec.run}"})
    stranger = signing.Signer(signing.generate())
    pid = fleet.pid("host-a", "payments")

    forged: list[tuple[bytes, str]] = []
    for deployment_id in (str(absolute), escape):  # model_construct: no validation here
        abort = Abort.model_construct(deployment_id=deployment_id, service="payments")
        revert = Revert.model_construct(deployment_id=deployment_id, service="payments", to=evil)
        for body, signer in itertools.product((abort, revert), (None, stranger)):
            forged.append((_command(body, signer), "body.deployment_id"))
    well_formed = Revert(deployment_id="forged-revert", service="payments", to=evil)
    forged.append((_command(well_formed, stranger), "bad_signature"))
    forged.append((_command(well_formed, None), "unsigned"))
    await publish_raw(amqp_url, topology.COMMANDS, "host.host-a", [raw for raw, _ in forged])

    dead = await dead_letters(amqp_url, len(forged))
    assert len(dead) == len(forged), dead
    reasons = {body: reason for reason, body in dead}
    for raw, expected in forged:
        assert reasons[raw].startswith(expected), (expected, reasons[raw])
    for victim in (absolute, relative):
        assert (victim / "data").read_text() == "keep me\n", f"{victim} was touched"
    assert not marker.exists(), "a forged revert ran its command"
    assert fleet.pid("host-a", "payments") == pid
    assert fleet.current("host-a", "payments") == "2.0.0"

    # The same revert signed by the coordinator's key does run: the refusals above were
    # the signature's doing, not a revert the agent could not have carried out anyway.
    signed = _command(well_formed, signing.Signer(coordinator_key))
    await publish_raw(amqp_url, topology.COMMANDS, "host.host-a", [signed])
    await _until(marker.exists, 20, "the coordinator-signed revert to run")
    await _until(lambda: fleet.current("host-a", "payments") == "1.0.0", 20, "the revert")


async def test_a_deploy_request_published_to_lockstep_alerts_starts_nothing_and_is_dead_lettered_and_so_is_a_vote_sent_as_a_request(
    fleet: Fleet, amqp_url: str
) -> None:
    fleet.add_host("host-a", **PAY)
    fleet.wait_alive("host-a")
    fleet.register("payments", "1.0.0", hosts=PAY)
    deploy = encode(make(DeployRequest(services={"payments": "1.0.0"}), "x"))
    bare = json.dumps({"services": {"payments": "1.0.0"}}).encode()
    vote = encode(make(Vote(deployment_id="d1", host_id="host-a", service="payments",
                            version="1.0.0", yes=True), "agent:host-a"))  # fmt: skip
    sent = [
        (topology.ALERTS, "orders.critical", deploy, "wrong_exchange"),
        (topology.ALERTS, "orders.critical", bare, "service: Field required"),
        (topology.REPORTS, topology.REPORTS_KEY, deploy, "wrong_exchange"),
        (topology.REQUESTS, "deploy", vote, "wrong_exchange"),
    ]
    for exchange, key, raw, _ in sent:
        await publish_raw(amqp_url, exchange, key, [raw])

    dead = await dead_letters(amqp_url, len(sent))
    assert len(dead) == len(sent), dead
    for (reason, body), (exchange, _, raw, code) in zip(dead, sent, strict=True):
        assert body == raw, f"dead-lettered out of order: {reason}"
        assert reason != "None", f"{exchange}: dead-lettered without a reason"
        assert reason.startswith(code), (exchange, reason)
    assert fleet.history()["deployments"] == []
    assert fleet.http_version("host-a", "payments") is None
    assert fleet.coordinator is not None
    assert fleet.coordinator.poll() is None, "the coordinator keeps running"

    # The very same envelope on lockstep.requests does start a deployment: it was the
    # exchange, nothing else, that stopped it above.
    await publish_raw(amqp_url, topology.REQUESTS, "deploy", [deploy])
    await _until(lambda: fleet.history()["deployments"], 20, "the deployment to start")


# --- helpers ---------------------------------------------------------------------------


def _facts(fleet: Fleet, host_id: str) -> dict[str, Any]:
    """What a refused command must not change on a host: pids, `current`, release and
    staging dirs, and the switches the agent recorded."""
    root = fleet.hosts[host_id].state_dir / "services"
    return {
        "pids": {s: fleet.pid(host_id, s) for s in SERVICES},
        "current": {s: fleet.current(host_id, s) for s in SERVICES},
        "dirs": sorted(str(p.relative_to(root)) for p in root.glob("*/*/*")),
        "switches": len(fleet.switches(host_id)),
    }


async def _one(captured: list[tuple[str, bytes]], kind: str) -> tuple[bytes, dict[str, Any]]:
    """The one captured command of `kind`: its bytes as delivered, and as JSON."""
    found = await wait_for(captured, lambda _, body: doc(body).get("kind") == kind, what=kind)
    assert len(found) == 1, f"{len(found)} {kind} commands captured"
    return found[0][1], doc(found[0][1])


def _altered(envelope: dict[str, Any], **changes: Any) -> bytes:
    """`envelope` with `changes` (a None value drops the field), as bytes on the wire."""
    changed = {**envelope, **changes}
    return json.dumps({k: v for k, v in changed.items() if v is not None}).encode()


def _expires(envelope: dict[str, Any]) -> float:
    return datetime.fromisoformat(envelope["expires_at"]).timestamp()


def _command(body: Body, signer: signing.Signer | None) -> bytes:
    """A fresh command for host-a, signed by `signer` (None: unsigned)."""
    expires = datetime.now(UTC) + timedelta(minutes=5)
    envelope = make(body, "coordinator", to="host-a", expires_at=expires)
    return encode(signer.sign(envelope) if signer is not None else envelope)


async def _until(predicate: Any, timeout: float, what: str) -> Any:
    """`wait_until` for async tests: the polling leaves the event loop running."""
    return await asyncio.to_thread(wait_until, predicate, timeout, what)
