"""Issue 10 "soak across all of it", the short version CI runs: the soak of
`tests.perf.soak --ha` (two coordinators on a PostgreSQL server of its own, a
three-node RabbitMQ cluster) for a few deployments, one fault each, drawn from the HA
faults (failover, node kill, PostgreSQL restart) and the fleet's own. The long run is
by hand (`.venv/bin/python -m tests.perf.soak --ha --deployments 1000`).
"""

from __future__ import annotations

import pytest

from tests.perf import soak

pytestmark = [pytest.mark.ha, pytest.mark.e2e, pytest.mark.timeout(900)]


def test_a_short_ha_soak_keeps_every_invariant_and_loses_nothing() -> None:
    run = soak.run(deployments=8, fault_rate=1.0, seed=4, ha=True)  # all three HA faults
    print(run.summary())
    assert run.deployments == 8
    assert run.faults == 8
    assert {"ha.failover", "ha.node_kill", "ha.postgres_restart"} <= set(run.kinds)
    assert run.passed, run.summary()
