"""SPEC 6.4 invariants, checked against the real processes after a fault scenario.

Facts come from where they live: every service process's /version, the coordinator's
`status --json` and `history --json`, and each agent's own switch records.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from tests.e2e.fleet import Fleet
from tests.e2e.test_core import PLACES
from tests.support.procs import wait_until

TERMINAL = {"completed", "aborted", "rolled_back", "failed"}


def settled(fleet: Fleet, deployment_id: str, timeout: float = 90) -> dict[str, Any]:
    """The deployment once it has ended (I4: an acknowledged request is never lost)."""

    def ended() -> dict[str, Any] | None:
        result = fleet.cli("history", "--json")
        if result.code != 0:
            return None
        for row in result.doc["deployments"]:
            if row["deployment_id"] == deployment_id and row["state"] in TERMINAL:
                return dict(row)
        return None

    found: dict[str, Any] = wait_until(ended, timeout, f"deployment {deployment_id} to end")
    return found


def check(fleet: Fleet, row: dict[str, Any], start: dict[str, str], target: dict[str, str]) -> None:
    """I1, I2, I3 and I5 for a deployment that ended as `row`."""
    expected = target if row["state"] == "completed" else start
    wanted = {place: expected[place[1]] for place in PLACES}
    # I1 + I2: every place runs one version of each service, all target or all start.
    wait_until(lambda: fleet.running() == wanted, 30,
               f"every service process to answer {expected} (I1, I2)")  # fmt: skip
    # I3: the coordinator's record equals what the agents run.
    wait_until(lambda: {p: fleet.reported().get(p) for p in PLACES} == wanted, 30,
               "the coordinator's status to match the processes (I3)")  # fmt: skip
    # I5: no participant switched twice for the same step of this deployment. Every
    # switch counts, one onto the version already running (from == to) included: a
    # commit executed twice is exactly such a second switch.
    switches = {
        host: [s for s in fleet.switches(host) if s["deployment_id"] == row["deployment_id"]]
        for host in fleet.hosts
    }
    counts = Counter((host, s["service"], s["kind"]) for host in switches for s in switches[host])
    twice = {key: n for key, n in counts.items() if n > 1}
    assert not twice, f"a step ran twice (I5): {twice}; the switches: {switches}"
