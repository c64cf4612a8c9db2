"""Issue 2 acceptance: the core deploy path with real processes and the real broker.

Each test is named after the acceptance bullet it proves.
"""

from __future__ import annotations

import pytest

from tests.e2e.fleet import Fleet

pytestmark = pytest.mark.e2e

PAY = {"pay": "yes"}
WEB = {"web": "yes"}
PLACES = {
    ("host-a", "payments"),
    ("host-c", "payments"),
    ("host-b", "orders"),
    ("host-c", "orders"),
}


def register_v1_v2(fleet: Fleet) -> None:
    fleet.register("payments", "1.0.0", hosts=PAY)
    fleet.register("payments", "2.0.0", hosts=PAY)
    fleet.register("orders", "1.0.0", hosts=WEB, requires={"payments": ">=1.0.0"})
    fleet.register("orders", "2.0.0", hosts=WEB, requires={"payments": ">=2.0.0"})


def assert_fleet_at(fleet: Fleet, versions: dict[str, str]) -> None:
    """Every place runs `versions`: by /version, by `current`, and by the coordinator."""
    expected = {place: versions[place[1]] for place in PLACES}
    assert fleet.running() == expected
    for host, service in PLACES:
        assert fleet.current(host, service) == versions[service]
    reported = fleet.reported()
    assert {place: reported.get(place) for place in PLACES} == expected


def test_deploy_v1_then_v2_hosts_current_processes_and_status_match_and_payments_before_orders(
    three_hosts: Fleet,
) -> None:
    fleet = three_hosts
    register_v1_v2(fleet)

    first = fleet.deploy("orders=1.0.0", "payments=1.0.0")
    assert first.code == 0, first.stdout + first.stderr
    assert first.doc["state"] == "completed"
    assert_fleet_at(fleet, {"orders": "1.0.0", "payments": "1.0.0"})

    second = fleet.deploy("orders=2.0.0", "payments=2.0.0")
    assert second.code == 0, second.stdout + second.stderr
    doc = second.doc
    assert doc["state"] == "completed"
    assert doc["from_release_id"] == first.doc["release_id"]
    assert doc["services"] == {"orders": "2.0.0", "payments": "2.0.0"}
    assert {(p["host"], p["service"]) for p in doc["participants"]} == PLACES
    assert all(p["state"] == "committed" for p in doc["participants"])
    assert_fleet_at(fleet, {"orders": "2.0.0", "payments": "2.0.0"})
    assert fleet.status()["release_id"] == doc["release_id"]

    switched = [s for h in fleet.hosts for s in fleet.switches(h) if s["to_version"] == "2.0.0"]
    last_payments = max(s["ts"] for s in switched if s["service"] == "payments")
    first_orders = min(s["ts"] for s in switched if s["service"] == "orders")
    assert last_payments < first_orders, "payments must switch on every host before orders"


def test_no_vote_on_wrong_sha256_aborts_with_host_and_reason_and_touches_nothing(
    three_hosts: Fleet,
) -> None:
    fleet = three_hosts
    register_v1_v2(fleet)
    assert fleet.deploy("orders=1.0.0", "payments=1.0.0").code == 0
    pids = {place: fleet.pid(*place) for place in PLACES}
    fleet.register("payments", "2.1.0", hosts=PAY, sha256="0" * 64)

    result = fleet.deploy("payments=2.1.0")

    assert result.code == 1, result.stdout + result.stderr
    assert result.doc["state"] == "aborted"
    assert "sha256" in result.doc["reason"]
    assert "host-a" in result.doc["reason"] or "host-c" in result.doc["reason"]
    assert_fleet_at(fleet, {"orders": "1.0.0", "payments": "1.0.0"})
    assert {place: fleet.pid(*place) for place in PLACES} == pids, "no process restarted"
    for host in ("host-a", "host-c"):
        assert fleet.staging(host, "payments") == []
        assert not [s for s in fleet.switches(host) if s["to_version"] == "2.1.0"]


def test_commit_failing_health_reverts_every_switched_participant_consumers_first(
    three_hosts: Fleet,
) -> None:
    fleet = three_hosts
    register_v1_v2(fleet)
    assert fleet.deploy("orders=1.0.0", "payments=1.0.0").code == 0
    fleet.register("orders", "2.1.0", hosts=WEB, requires={"payments": ">=2.0.0"}, fail_health=True)

    result = fleet.deploy("orders=2.1.0", "payments=2.0.0")

    assert result.code == 1, result.stdout + result.stderr
    assert result.doc["state"] == "rolled_back"
    assert "health" in result.doc["reason"]
    assert_fleet_at(fleet, {"orders": "1.0.0", "payments": "1.0.0"})
    health = {(h["host_id"], s["service"]): s["health"] for h in fleet.status()["hosts"]
              for s in h["services"]}  # fmt: skip
    assert all(health[place] == "healthy" for place in PLACES)
    reverts = [s for h in fleet.hosts for s in fleet.switches(h) if s["kind"] == "revert"]
    assert {s["service"] for s in reverts} == {"orders", "payments"}
    last_orders = max(s["ts"] for s in reverts if s["service"] == "orders")
    first_payments = min(s["ts"] for s in reverts if s["service"] == "payments")
    assert last_orders < first_payments, "consumers (orders) revert before providers"


def test_inconsistent_version_set_is_refused_with_exit_2_before_any_host_is_contacted(
    three_hosts: Fleet,
) -> None:
    fleet = three_hosts
    fleet.register("payments", "1.0.0", hosts=PAY)
    fleet.register("orders", "2.0.0", hosts=WEB, requires={"payments": ">=1.5.0"})

    result = fleet.cli("deploy", "orders=2.0.0", "payments=1.0.0", "--json")

    assert result.code == 2
    reason = result.doc["error"]["reason"]
    for part in ("orders", ">=1.5.0", "payments 1.0.0"):
        assert part in reason
    assert fleet.cli("history", "--json").doc["deployments"] == []
    for host in fleet.hosts:
        assert fleet.switches(host) == []
        assert fleet.staging(host, "orders") == []
        assert fleet.staging(host, "payments") == []


def test_agent_sigkill_and_restart_leaves_services_running_and_adopts_them(
    three_hosts: Fleet,
) -> None:
    fleet = three_hosts
    register_v1_v2(fleet)
    assert fleet.deploy("orders=1.0.0", "payments=1.0.0").code == 0
    before = {svc: fleet.pid("host-c", svc) for svc in ("orders", "payments")}

    fleet.kill_agent("host-c")
    assert fleet.http_version("host-c", "orders") == "1.0.0", "services outlive their agent"
    fleet.start_agent("host-c")
    fleet.wait_alive("host-c")

    assert {svc: fleet.pid("host-c", svc) for svc in ("orders", "payments")} == before
    assert fleet.http_version("host-c", "payments") == "1.0.0"
    second = fleet.deploy("orders=2.0.0", "payments=2.0.0")
    assert second.code == 0, second.stdout + second.stderr
    assert_fleet_at(fleet, {"orders": "2.0.0", "payments": "2.0.0"})


def test_coordinator_restart_keeps_catalog_releases_and_history(three_hosts: Fleet) -> None:
    fleet = three_hosts
    register_v1_v2(fleet)
    first = fleet.deploy("orders=1.0.0", "payments=1.0.0")
    assert first.code == 0
    history = fleet.cli("history", "--json").doc

    fleet.kill_coordinator()
    fleet.start_coordinator()

    assert fleet.cli("history", "--json").doc["deployments"] == history["deployments"]
    assert fleet.status()["release_id"] == first.doc["release_id"]
    second = fleet.deploy("orders=2.0.0", "payments=2.0.0")  # the catalog survived
    assert second.code == 0, second.stdout + second.stderr
    assert second.doc["from_release_id"] == first.doc["release_id"]
