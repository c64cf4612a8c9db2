"""Issue 10: PostgreSQL restarted mid-deployment; the coordinator loses no decision.

The coordinator's store is a PostgreSQL server of the test's own (`private_server`,
started with pg_ctl in a temp dir), so the test can stop it without touching the
machine's shared one. It is stopped at once (`-m immediate`: connections cut, as in
a crash) mid-commit, kept down until the coordinator has stepped down for want of its
store, and started again: the deployment must end as the protocol says, with SPEC
6.4's invariants I1-I5 holding.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.fleet import Fleet
from tests.faults.invariants import check, settled
from tests.faults.test_protocol import V1, V2, baseline
from tests.ha.conftest import logged
from tests.support import postgres
from tests.support.procs import Procs, wait_until

pytestmark = [pytest.mark.ha, pytest.mark.e2e]


@pytest.fixture
def pg_fleet(
    tmp_path: Path, procs: Procs, lockstep_env: dict[str, str]
) -> Iterator[tuple[Fleet, postgres.Server]]:
    with postgres.private_server() as server:
        fleet = Fleet(tmp_path, lockstep_env, procs)
        fleet.db = server.url
        try:
            fleet.start_coordinator()
            fleet.add_three_hosts()
            yield fleet, server
        finally:
            procs.stop_all()


def test_postgresql_restarted_mid_commit_the_coordinator_loses_no_decision(
    pg_fleet: tuple[Fleet, postgres.Server],
) -> None:
    fleet, server = pg_fleet
    baseline(fleet)
    deployment_id = fleet.deploy_mid_commit("orders=2.0.0", "payments=2.0.0")
    server.ctl("-m", "immediate", "stop")
    try:
        logged(fleet, "coordinator.log", "lease.store_lost")  # it stepped down
    finally:
        server.start()
    log = fleet.root / "coordinator.log"
    wait_until(lambda: log.read_text().count('"coordinator.started"') == 2, 30,
               "the coordinator to start again, from the store")  # fmt: skip
    row = settled(fleet, deployment_id)
    assert row["state"] == "completed", row
    check(fleet, row, V1, V2)


def test_a_brief_postgresql_restart_is_ridden_out(pg_fleet: tuple[Fleet, postgres.Server]) -> None:
    """Cut and back within a lease: the writes that failed are retried (their
    deliveries requeued), and the deployment completes."""
    fleet, server = pg_fleet
    baseline(fleet)
    deployment_id = fleet.deploy_mid_commit("orders=2.0.0", "payments=2.0.0")
    server.restart()
    row = settled(fleet, deployment_id)
    assert row["state"] == "completed", row
    check(fleet, row, V1, V2)
    log = (fleet.root / "coordinator.log").read_text()
    assert "lease.store_lost" not in log  # ridden out: it never stepped down
    assert log.count('"coordinator.started"') == 1
