"""Issue 8 acceptance, the boundaries around the signed protocol: hostile artifacts end
in a NO vote named in the deployment's outcome, requests are authorized by broker user
and recorded with it, reports about pairs a host does not hold change nothing, and
oversized or unknown-host messages are dead-lettered while both consumers keep serving.

Real coordinator and agent processes, real services, the real broker.
"""

from __future__ import annotations

import asyncio
import os
import tarfile
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from shared import signing, topology
from shared.messages import HealthChange, Inquiry, StepResult, encode, make
from tests.e2e.fleet import Fleet
from tests.support.artifacts import escaping_symlink_chain, member, pack, service_toml
from tests.support.procs import Procs
from tests.support.rabbit import dead_letter_reasons, publish_raw

pytestmark = pytest.mark.e2e

PAY = {"pay": "yes"}
CAP = 64 * 1024
"""The agents' LOCKSTEP_ARTIFACT_MAX_BYTES in this file: small, so a cap is reachable."""


@pytest.fixture
def capped_env(lockstep_env: dict[str, str]) -> dict[str, str]:
    return {**lockstep_env, "LOCKSTEP_ARTIFACT_MAX_BYTES": str(CAP)}


def _hostile(marker: str) -> dict[str, list[tuple[tarfile.TarInfo, bytes]]]:
    """Archives that try to write `marker`-named files outside the release dir."""
    return {
        "1.0.1": [member(f"../{marker}-dotdot", data=b"x")],
        "1.0.2": [member(f"/tmp/{marker}-absolute", data=b"x")],
        "1.0.3": [
            member("out", tarfile.SYMTYPE, "../../../.."),
            member(f"out/{marker}-symlink", data=b"x"),
        ],
        "1.0.4": escaping_symlink_chain(payload=f"{marker}/chain"),
        "1.0.5": [member("big.bin", data=os.urandom(CAP * 2))],
        "1.0.6": [member("bomb.bin", data=bytes(CAP * 16))],
    }


def _register_archive(
    fleet: Fleet, version: str, members: list[tuple[tarfile.TarInfo, bytes]]
) -> None:
    path = fleet.artifacts / f"payments-{version}.tar.gz"
    digest = pack(path, members)
    spec = fleet.specs / f"payments-{version}.toml"
    fleet.specs.mkdir(exist_ok=True)
    spec.write_text(service_toml("payments", version, path, digest, hosts=PAY))
    result = fleet.cli("register", str(spec), "--json")
    assert result.code == 0, result.stderr


def _outside_staging(host_root: Path) -> set[str]:
    """Every path under the host's services dir that is not staging or a kept release."""
    found = set()
    for path in (host_root / "services").rglob("*"):
        parts = path.relative_to(host_root / "services").parts
        if len(parts) >= 2 and parts[1] in ("staging", "releases", "logs", "current"):
            continue
        found.add("/".join(parts))
    return found


def test_hostile_tarballs_and_an_oversized_one_are_no_votes_named_in_the_outcome_and_write_nothing_outside(
    tmp_path: Path, procs: Procs, capped_env: dict[str, str]
) -> None:
    fleet = Fleet(tmp_path, capped_env, procs)
    fleet.start_coordinator()
    fleet.add_host("host-a", **PAY)
    fleet.wait_alive("host-a")
    fleet.register("payments", "1.0.0", hosts=PAY)
    assert fleet.deploy("payments=1.0.0").code == 0
    before = _outside_staging(fleet.hosts["host-a"].state_dir)
    pid = fleet.pid("host-a", "payments")
    marker = f"PWNED-{uuid.uuid4().hex[:8]}"
    expected = {
        "1.0.1": "escapes",
        "1.0.2": "escapes",
        "1.0.3": "escapes",
        "1.0.4": "escapes",
        "1.0.5": f"larger than {CAP} bytes",
        "1.0.6": f"unpacks to more than {CAP} bytes",
    }
    for version, members in _hostile(marker).items():
        _register_archive(fleet, version, members)
        result = fleet.deploy(f"payments={version}")
        assert result.code == 1, result.stdout + result.stderr
        assert result.doc["state"] == "aborted"
        assert "voted NO" in result.doc["reason"], result.doc["reason"]
        assert expected[version] in result.doc["reason"], result.doc["reason"]
        assert fleet.staging("host-a", "payments") == []
    leaked = [str(p) for p in tmp_path.rglob(f"*{marker}*")]
    leaked += [str(p) for p in Path("/tmp").glob(f"{marker}*")]
    assert leaked == []
    assert _outside_staging(fleet.hosts["host-a"].state_dir) == before
    assert fleet.pid("host-a", "payments") == pid
    assert fleet.http_version("host-a", "payments") == "1.0.0"


def test_requests_from_a_user_outside_the_operators_allow_list_are_refused_and_the_asker_is_recorded(
    fleet: Fleet,
) -> None:
    fleet.add_host("host-a", **PAY)
    fleet.wait_alive("host-a")
    fleet.register("payments", "1.0.0", hosts=PAY)
    fleet.kill_coordinator()
    fleet.coordinator_args = ("--operators", "alice", "--operators", "bob")
    fleet.start_coordinator()
    refused = fleet.cli("deploy", "payments=1.0.0", "--json")
    assert refused.code == 2, refused.stdout + refused.stderr
    assert "not in the operators allow-list" in refused.doc["error"]["reason"]
    assert "'guest'" in refused.doc["error"]["reason"]
    assert fleet.cli("history", "--json").code == 2  # queries are requests too

    fleet.kill_coordinator()
    fleet.coordinator_args = ("--operators", "guest")
    fleet.start_coordinator()
    done = fleet.deploy("payments=1.0.0")
    assert done.code == 0, done.stdout + done.stderr
    assert done.doc["requested_by"] == "guest"
    rows = fleet.history()["deployments"]
    assert [r["requested_by"] for r in rows] == ["guest"], "the refused request started nothing"


def test_reports_about_a_deployment_or_service_the_host_does_not_hold_change_nothing(
    three_hosts: Fleet, amqp_url: str
) -> None:
    fleet = three_hosts
    fleet.register("payments", "1.0.0", hosts=PAY)
    fleet.register("orders", "1.0.0", hosts={"web": "yes"})
    only_orders = fleet.deploy("orders=1.0.0")
    assert only_orders.code == 0
    fleet.deploy("payments=1.0.0")
    before = _services(fleet)
    events_before = len(fleet.cli("events", "--json").doc["events"])
    key = signing.load_private(fleet.hosts["host-a"].state_dir / "agent.key")
    signer = signing.Signer(key)
    forged = [  # signed by host-a's own, approved key: only the content is wrong
        StepResult(
            deployment_id=only_orders.doc["deployment_id"],
            host_id="host-a",
            service="payments",
            step="commit",
            ok=True,
            running="6.6.6",
        ),
        StepResult(
            deployment_id="nosuchdeployment",
            host_id="host-a",
            service="payments",
            step="revert",
            ok=True,
            running=None,
        ),
        HealthChange(
            host_id="host-a",
            service="orders",
            version="1.0.0",
            health="unhealthy",
            reason="host-a runs no orders",
        ),
    ]
    # Stamped 20 s ahead (within the skew): no heartbeat would hide a wrongly applied one.
    ahead = datetime.now(UTC) + timedelta(seconds=20)
    bodies = [encode(signer.sign(make(b, "agent:host-a", sent_at=ahead))) for b in forged]
    asyncio.run(publish_raw(amqp_url, topology.REPORTS, topology.REPORTS_KEY, bodies))
    marker = fleet.cli("agents", "--json")  # the coordinator handles its queue in order
    assert marker.code == 0
    assert _services(fleet) == before
    assert asyncio.run(dead_letter_reasons(amqp_url, 1, timeout=2)) == [], "admitted, not refused"
    events = fleet.cli("events", "--json").doc["events"]
    assert not [e for e in events[events_before:] if e["type"] == "health.change"]
    assert fleet.history()["deployments"][0]["state"] == "completed"  # no rollback began


def test_oversized_bodies_and_reports_from_unknown_hosts_are_dead_lettered_and_both_consumers_keep_serving(
    three_hosts: Fleet, amqp_url: str
) -> None:
    fleet = three_hosts
    huge = b'{"kind": "query", "padding": "' + b"x" * (2 << 20) + b'"}'
    ghost = signing.Signer(signing.generate())
    inquiry = encode(
        ghost.sign(
            make(Inquiry(deployment_id="d1", host_id="ghost", service="payments"), "agent:ghost")
        )
    )
    asyncio.run(publish_raw(amqp_url, topology.REQUESTS, "query", [huge]))
    asyncio.run(publish_raw(amqp_url, topology.COMMANDS, topology.host_key("host-a"), [huge]))
    asyncio.run(publish_raw(amqp_url, topology.REPORTS, topology.REPORTS_KEY, [inquiry]))
    reasons = asyncio.run(dead_letter_reasons(amqp_url, 3))
    codes = sorted(r.split(":")[0] for r in reasons)
    assert codes == ["too_large", "too_large", "unknown_host"], reasons
    fleet.register("payments", "1.0.0", hosts=PAY)
    result = fleet.deploy("payments=1.0.0")
    assert result.code == 0, result.stdout + result.stderr
    assert fleet.http_version("host-a", "payments") == "1.0.0"


def _services(fleet: Fleet) -> dict[str, list[dict[str, object]]]:
    """What the coordinator records each host runs (its status, less liveness)."""
    return {h["host_id"]: h["services"] for h in fleet.status()["hosts"]}
