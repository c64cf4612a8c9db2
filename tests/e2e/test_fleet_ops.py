"""Issue 4 acceptance: batches, canaries, unavailable hosts, convergence, locks, pause,
resume and abort, on a fleet of six real agents.

Each test is named after the acceptance bullet it proves. Timing facts come from the
agents' own switch timestamps (their SQLite stores), not from the coordinator.
"""

from __future__ import annotations

import signal

import pytest

from tests.e2e.fleet import Fleet
from tests.support.procs import wait_until

pytestmark = pytest.mark.e2e

HOSTS = [f"host-{i}" for i in range(1, 7)]
WEB = {"web": "yes"}


@pytest.fixture
def six(fleet: Fleet) -> Fleet:
    """Six web hosts; host-3 carries fail=1, so orders 2.0.0 fails its health there only."""
    for host in HOSTS:
        fleet.add_host(host, web="yes", fail="1" if host == "host-3" else "0")
    fleet.wait_alive(*HOSTS)
    fleet.register("orders", "1.0.0", hosts=WEB)
    fleet.register("orders", "2.0.0", hosts=WEB, env={"FAIL_HEALTH": "${meta.fail}"})
    fleet.register("orders", "2.1.0", hosts=WEB)
    return fleet


def ok(result_code: int, result: object) -> None:
    assert result_code == 0, result


def on_every_host(fleet: Fleet, version: str, hosts: list[str] = HOSTS) -> bool:
    return all(fleet.http_version(h, "orders") == version for h in hosts)


def max_switching_at_once(fleet: Fleet, deployment_id: str) -> int:
    """Most hosts between switching and settling (healthy or failed) at any instant,
    from the agents' own switch records."""
    spans = [(s["ts"], s["settled_at"]) for h in fleet.hosts for s in fleet.switches(h)
             if s["deployment_id"] == deployment_id and s["kind"] == "commit"]  # fmt: skip
    assert spans
    assert all(end is not None for _, end in spans)
    return max(sum(1 for a, b in spans if a <= t < b) for t, _ in spans)


def switch_times(fleet: Fleet, version: str, kind: str = "commit") -> dict[str, float]:
    return {h: s["ts"] for h in fleet.hosts for s in fleet.switches(h)
            if s["to_version"] == version and s["kind"] == kind and s["service"] == "orders"}  # fmt: skip


def test_max_parallel_2_switches_at_most_two_hosts_at_once_and_a_failed_second_batch_stops_the_rollout(
    six: Fleet,
) -> None:
    fleet = six
    first = fleet.deploy("orders=1.0.0", flags=("--max-parallel", "2"))
    ok(first.code, first.stderr)
    assert max_switching_at_once(fleet, first.doc["deployment_id"]) == 2

    result = fleet.deploy("orders=2.0.0", flags=("--max-parallel", "2"))

    assert result.code == 1, result.stdout + result.stderr
    assert result.doc["state"] == "rolled_back"
    assert "host-3" in result.doc["reason"]
    assert max_switching_at_once(fleet, result.doc["deployment_id"]) <= 2
    assert set(switch_times(fleet, "2.0.0")) == {"host-1", "host-2", "host-3", "host-4"}
    assert set(switch_times(fleet, "1.0.0", "revert")) == {"host-1", "host-2", "host-3", "host-4"}
    assert on_every_host(fleet, "1.0.0")


def test_canary_runs_the_new_version_alone_for_the_canary_bake_before_any_other_switches(
    six: Fleet,
) -> None:
    fleet = six
    ok(fleet.deploy("orders=1.0.0").code, "baseline")

    result = fleet.deploy("orders=2.1.0", flags=("--canary", "1", "--canary-bake", "2s"))

    assert result.code == 0, result.stdout + result.stderr
    times = switch_times(fleet, "2.1.0")
    assert len(times) == 6
    canary = min(times, key=times.__getitem__)
    assert all(t >= times[canary] + 2.0 for h, t in times.items() if h != canary)
    assert on_every_host(fleet, "2.1.0")


def test_agent_stopped_in_prepare_aborts_without_allowance_and_with_allowance_completes_then_converges(
    six: Fleet,
) -> None:
    fleet = six
    ok(fleet.deploy("orders=1.0.0").code, "baseline")
    # A stopped agent must still count as alive when the deploy is planned, however long
    # the CLI takes to start on a busy machine: lost only after 20 missed heartbeats.
    fleet.kill_coordinator()
    fleet.env = {**fleet.env, "LOCKSTEP_LOST_AFTER_MISSED": "20"}
    fleet.start_coordinator()

    fleet.signal_agent("host-6", signal.SIGSTOP)
    refused = fleet.deploy("orders=2.1.0", flags=("--prepare-timeout", "2s"))
    fleet.signal_agent("host-6", signal.SIGCONT)
    assert refused.code == 1, refused.stdout + refused.stderr
    assert refused.doc["state"] == "aborted"
    assert "host-6" in refused.doc["reason"]
    assert on_every_host(fleet, "1.0.0")

    fleet.wait_alive("host-6")
    fleet.signal_agent("host-6", signal.SIGSTOP)
    allowed = fleet.deploy(
        "orders=2.1.0", flags=("--prepare-timeout", "2s", "--allow-unavailable", "1")
    )
    assert allowed.code == 0, allowed.stdout + allowed.stderr
    assert on_every_host(fleet, "2.1.0", HOSTS[:5])
    assert fleet.http_version("host-6", "orders") == "1.0.0"
    fleet.signal_agent("host-6", signal.SIGCONT)
    wait_until(lambda: fleet.http_version("host-6", "orders") == "2.1.0", 45,
               "host-6 to converge to the current release")  # fmt: skip


def test_new_agent_with_matching_labels_gets_the_current_release_without_any_command(
    six: Fleet,
) -> None:
    fleet = six
    ok(fleet.deploy("orders=2.1.0").code, "deploy")

    fleet.add_host("host-7", web="yes", fail="0")

    wait_until(lambda: fleet.http_version("host-7", "orders") == "2.1.0", 45,
               "the new host to converge")  # fmt: skip
    kinds = {d["trigger"] for d in fleet.history()["deployments"]}
    assert "converge" in kinds


def test_disjoint_deploys_run_together_overlapping_ones_in_turn_and_a_killed_coordinator_leaves_no_lock(
    six: Fleet,
) -> None:
    fleet = six
    fleet.register("mail", "1.0.0", hosts=WEB)
    fleet.register("mail", "2.0.0", hosts=WEB)
    ok(fleet.deploy("orders=1.0.0", "mail=1.0.0").code, "baseline")

    a = fleet.cli_background("deploy", "orders=2.1.0", "--bake", "2s", "--wait", "--json")
    b = fleet.cli_background("deploy", "mail=2.0.0", "--bake", "2s", "--wait", "--json")
    ra, rb = fleet.finish(a), fleet.finish(b)
    ok(ra.code, ra.stderr)
    ok(rb.code, rb.stderr)
    da, db = fleet.deployment(ra.doc["deployment_id"]), fleet.deployment(rb.doc["deployment_id"])
    assert da["started_at"] < db["ended_at"]
    assert db["started_at"] < da["ended_at"], "disjoint deployments ran concurrently"
    assert fleet.status()["services"] == {"orders": "2.1.0", "mail": "2.0.0"}

    first = fleet.cli_background("deploy", "mail=1.0.0", "--bake", "2s", "--wait", "--json")
    wait_until(lambda: any(d["state"] != "queued" and d["ended_at"] is None
                           for d in fleet.history()["deployments"]), 20, "the first in flight")  # fmt: skip
    second = fleet.cli_background("deploy", "mail=2.0.0", "--wait", "--json")
    r1, r2 = fleet.finish(first), fleet.finish(second)
    ok(r1.code, r1.stderr)
    ok(r2.code, r2.stderr)
    first_end = fleet.deployment(r1.doc["deployment_id"])["ended_at"]
    second_switches = [s["ts"] for h in fleet.hosts for s in fleet.switches(h)
                       if s["service"] == "mail" and s["ts"] > first_end]  # fmt: skip
    assert len(second_switches) == 6, "the overlapping deployment waited for the first"
    assert fleet.status()["services"]["mail"] == "2.0.0"

    running = fleet.cli_background("deploy", "orders=1.0.0", "--bake", "3s", "--wait", "--json")
    wait_until(lambda: fleet.history()["deployments"][0]["state"] == "baking", 30, "baking")
    fleet.kill_coordinator()
    fleet.finish(running)
    fleet.start_coordinator()
    nxt = fleet.deploy("orders=2.1.0")
    assert nxt.code == 0, nxt.stdout + nxt.stderr
    assert on_every_host(fleet, "2.1.0")


def test_pause_stops_further_batches_resume_continues_and_abort_returns_to_the_starting_release(
    six: Fleet,
) -> None:
    fleet = six
    ok(fleet.deploy("orders=1.0.0").code, "baseline")
    flags = ("--canary", "1", "--canary-bake", "2s", "--max-parallel", "2", "--wait", "--json")

    def state() -> str:
        return str(fleet.history()["deployments"][0]["state"])

    run = fleet.cli_background("deploy", "orders=2.1.0", *flags)
    wait_until(lambda: state() == "holding", 30, "the canary hold")
    ok(fleet.cli("pause", "--json").code, "pause")
    wait_until(lambda: state() == "paused", 30, "the pause after the hold")
    assert len(switch_times(fleet, "2.1.0")) == 1, "no batch after the canary while paused"
    ok(fleet.cli("resume", "--json").code, "resume")
    done = fleet.finish(run)
    assert done.code == 0, done.stdout + done.stderr
    assert on_every_host(fleet, "2.1.0")

    run = fleet.cli_background("deploy", "orders=1.0.0", *flags)
    wait_until(lambda: state() == "holding", 30, "the canary hold")
    aborted = fleet.cli("abort", "--json")
    ok(aborted.code, aborted.stderr)
    done = fleet.finish(run)
    assert done.code == 1
    assert done.doc["state"] == "rolled_back"
    assert "operator" in done.doc["reason"]
    assert on_every_host(fleet, "2.1.0")
