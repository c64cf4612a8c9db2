"""The HA tier: coordinators sharing a PostgreSQL store, real processes throughout."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.fleet import Fleet
from tests.support import postgres
from tests.support.cluster import Cluster, cluster
from tests.support.procs import Procs, wait_until


@pytest.fixture
def ha_fleet(
    tmp_path: Path, procs: Procs, lockstep_env: dict[str, str], postgres_database: str,
    request: pytest.FixtureRequest,
) -> Iterator[Fleet]:  # fmt: skip
    """A fleet whose coordinators share a schema of this test's own in PostgreSQL; one
    coordinator ("coordinator-a.log") is running and active."""
    label = re.sub(r"[^a-zA-Z0-9]", "_", request.node.name)
    with postgres.schema_now(postgres_database, label) as url:
        fleet = Fleet(tmp_path, lockstep_env, procs)
        fleet.db = url
        try:
            fleet.start_coordinator(log="coordinator-a.log")
            yield fleet
        finally:
            procs.stop_all()  # nothing may hold the schema when it is dropped


@pytest.fixture(scope="session")
def rabbit_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three RabbitMQ nodes joined in a cluster (deploy/rabbitmq-cluster.sh), stopped and
    removed after the session."""
    with cluster(tmp_path_factory.mktemp("rabbit-cluster") / "nodes") as nodes:
        yield nodes


@pytest.fixture
def cluster_fleet(
    tmp_path: Path, procs: Procs, lockstep_env: dict[str, str], rabbit_cluster: Cluster,
    request: pytest.FixtureRequest,
) -> Iterator[tuple[Fleet, str]]:  # fmt: skip
    """A fleet on a vhost of its own on the cluster, given every node's URL, with quorum
    agent queues; one coordinator running. Yields it and the vhost."""
    label = re.sub(r"[^a-zA-Z0-9-]", "-", request.node.name)
    with rabbit_cluster.vhost(label) as vhost:
        env = dict(lockstep_env, LOCKSTEP_AMQP_URL=rabbit_cluster.urls(vhost),
                   LOCKSTEP_AGENT_QUEUE_TYPE="quorum")  # fmt: skip
        fleet = Fleet(tmp_path, env, procs)
        try:
            fleet.start_coordinator()
            yield fleet, vhost
        finally:
            procs.stop_all()


def logged(fleet: Fleet, log: str, event: str, timeout: float = 20) -> None:
    """Wait until the coordinator log `log` has a line with `event`."""
    path = fleet.root / log
    wait_until(lambda: path.exists() and event in path.read_text(), timeout,
               f"{event} in {log}")  # fmt: skip
