"""Issue 10 "brokers as a cluster": a three-node RabbitMQ cluster, a node SIGKILLed.

Real processes on a real cluster (`rabbit_cluster`, started by the script a user runs,
deploy/rabbitmq-cluster.sh): every process is given all three nodes' URLs, the
coordinator queue and the agents' queues are quorum queues, and the node holding a
queue's leader is SIGKILLed mid-commit; the deployment must still end as the protocol
says, with SPEC 6.4's invariants I1-I5 holding, and the node is started again after.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import pytest

from shared import topology
from shared.config import BrokerSettings
from shared.messages import QueryRequest, make
from shared.transport import Broker, Delivery
from tests.e2e.fleet import Fleet
from tests.faults.invariants import check, settled
from tests.faults.test_protocol import V1, V2, baseline
from tests.support.cluster import Cluster

pytestmark = [pytest.mark.ha, pytest.mark.e2e]


@contextlib.contextmanager
def _down(cluster: Cluster, node: int) -> Iterator[None]:
    """Node `node` SIGKILLed for the block, started again after it."""
    cluster.kill(node)
    try:
        yield
    finally:
        cluster.revive(node)


def _kill_mid_commit(fleet: Fleet, cluster: Cluster, node: int) -> None:
    """Deploy v2 one host at a time; SIGKILL `node` once a first host switched and
    before the last did; the deployment ends and I1-I5 hold."""
    baseline(fleet)
    deployment_id = fleet.deploy_mid_commit("orders=2.0.0", "payments=2.0.0")
    with _down(cluster, node):
        row = settled(fleet, deployment_id, timeout=90)
        assert row["state"] == "completed", row
        check(fleet, row, V1, V2)


def test_a_connection_given_every_node_starts_at_one_that_is_up_and_moves_on_when_it_dies(
    rabbit_cluster: Cluster,
) -> None:
    """LOCKSTEP_AMQP_URL as a list: the first node is down, so the connection goes to the
    second; node 1 comes back, node 2 is killed, and the connection moves to the third
    (two of three nodes up: the quorum queues keep a majority), where its consumer is
    restored and gets what is published."""
    with rabbit_cluster.vhost("urls") as vhost:
        asyncio.run(_moves_on(rabbit_cluster, rabbit_cluster.urls(vhost)))


async def _moves_on(cluster: Cluster, urls: str) -> None:
    broker = Broker(BrokerSettings(amqp_url=urls, connect_timeout=5), "test:cluster-urls")
    with _down(cluster, 1):
        await broker.connect()
    try:
        connection = broker._link.connection_or_fail()
        assert connection.url.port == cluster.port(2)  # type: ignore[attr-defined]
        await broker.declare(topology.coordinator_queue())  # quorum: on all three nodes
        got: asyncio.Queue[str] = asyncio.Queue()

        async def handler(delivery: Delivery) -> None:
            got.put_nowait(delivery.envelope.kind)

        await broker.consume(topology.COORDINATOR_QUEUE, handler)
        with _down(cluster, 2):
            await asyncio.wait_for(_reconnected(connection, cluster.port(3)), 30)
            await broker.publish(
                topology.REQUESTS, "query", make(QueryRequest(what="status"), "test")
            )
            assert await asyncio.wait_for(got.get(), 30) == "query"  # consumer restored
    finally:
        await broker.close()


async def _reconnected(connection: object, port: int) -> None:
    while not (connection.connected.is_set() and connection.url.port == port):  # type: ignore[attr-defined]
        await asyncio.sleep(0.05)


def test_the_node_leading_the_coordinator_queue_killed_mid_commit(
    cluster_fleet: tuple[Fleet, str], rabbit_cluster: Cluster
) -> None:
    fleet, vhost = cluster_fleet
    fleet.add_three_hosts()
    node = rabbit_cluster.leader(vhost, topology.COORDINATOR_QUEUE)
    _kill_mid_commit(fleet, rabbit_cluster, node)


def test_a_node_leading_an_agent_queue_killed_mid_commit(
    cluster_fleet: tuple[Fleet, str], rabbit_cluster: Cluster
) -> None:
    fleet, vhost = cluster_fleet
    fleet.add_three_hosts()
    coordinator = rabbit_cluster.leader(vhost, topology.COORDINATOR_QUEUE)
    leaders = {h: rabbit_cluster.leader(vhost, topology.agent_queue_name(h)) for h in fleet.hosts}
    # a node that leads an agent's queue, and not the coordinator's if there is one
    node = next((n for n in leaders.values() if n != coordinator), leaders["host-c"])
    _kill_mid_commit(fleet, rabbit_cluster, node)
