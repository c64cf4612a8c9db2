"""Issue 8 acceptance: broker least privilege that actually runs (SPEC 7).

`lockstep broker setup` and `lockstep broker add-agent` (the real CLI, through the
management API) provision this test's fresh vhost, where guest is administrator; a
real coordinator, agent and CLI then run as lockstep-coordinator, lockstep-agent-<host>
and lockstep-operator. Each test is named after the acceptance bullet it proves.

Broker users are broker-wide, not per vhost, and their names are fixed by
`shared.topology`: the `role_users` fixture deletes them before and after each test
(even a failed one), and these tests must not run concurrently with one another.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict
from pathlib import Path
from urllib.parse import quote

import aio_pika
import pytest
from aiormq.exceptions import ChannelAccessRefused, ChannelPreconditionFailed

from coordinator.cli.broker import default_management_url, url_for, vhost_of
from coordinator.cli.management import Management, NotFound
from shared import topology
from shared.errors import BrokerUnavailable
from shared.specs import HOST
from tests.e2e.fleet import LOCKSTEP, Fleet
from tests.support.procs import Procs, wait_until
from tests.support.rabbit import BASE_URL

pytestmark = pytest.mark.e2e

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
HOSTS = ("host-a", "host-b")
USERS = (
    topology.COORDINATOR_USER,
    topology.OPERATOR_USER,
    topology.ALERTS_USER,
    *(topology.agent_user(h) for h in HOSTS),
)


def _admin() -> Management:
    return Management(default_management_url(BASE_URL), "/", 10)


def _delete_users(patience: float = 90) -> None:
    """Delete every user of USERS that exists, through a broker restart another test may
    be causing (the API answers 503 or not at all meanwhile)."""
    admin = _admin()
    deadline = time.monotonic() + patience
    pending = list(USERS)
    while pending:
        try:
            with contextlib.suppress(NotFound):
                admin.call("DELETE", f"users/{quote(pending[0], safe='')}")
            pending.pop(0)
        except BrokerUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)  # retry pacing while the broker comes back, not a synchronisation


@pytest.fixture
def role_users() -> Iterator[None]:
    """No lockstep role or agent user exists when the test starts, none after it ends."""
    _delete_users()
    try:
        yield
    finally:
        _delete_users()


def lockstep(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LOCKSTEP, *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.fixture
def urls(lockstep_env: dict[str, str], role_users: None) -> dict[str, str]:
    """`broker setup --json` and `broker add-agent HOST --json` on the test's vhost, run as
    the operator would; user -> the AMQP URL the CLI printed for it."""
    setup = lockstep(lockstep_env, "broker", "setup", "--json")
    assert setup.returncode == 0, setup.stdout + setup.stderr
    doc = json.loads(setup.stdout)
    assert [u["user"] for u in doc["users"]] == list(USERS[:3])
    assert all(u["created"] for u in doc["users"]), doc
    found = {u["user"]: u["amqp_url"] for u in doc["users"]}
    for host in HOSTS:
        added = lockstep(lockstep_env, "broker", "add-agent", host, "--json")
        assert added.returncode == 0, added.stdout + added.stderr
        agent = json.loads(added.stdout)
        assert agent["queue"] == topology.agent_queue_name(host)
        found[agent["user"]] = agent["amqp_url"]
    return found


# --- a deploy with every process under its own user -------------------------------------


class RoleFleet(Fleet):
    """A fleet whose coordinator and agents connect as their own broker users, and whose
    CLI (`env`) connects as lockstep-operator."""

    def __init__(
        self, root: Path, procs: Procs, envs: dict[str, dict[str, str]]
    ) -> None:  # fmt: skip
        super().__init__(root, envs[topology.OPERATOR_USER], procs, auto_approve=False)
        self.envs = envs

    def start_coordinator(self, fault: str | None = None) -> None:
        args = [LOCKSTEP, "coordinator", "--db", str(self.root / "coordinator.db"),
                "--key-dir", str(self.key_dir), "--operators", topology.OPERATOR_USER]  # fmt: skip
        env = self.envs[topology.COORDINATOR_USER]
        self.coordinator = self.procs.start(args, env=env, log=self.root / "coordinator.log")
        wait_until(lambda: self.cli("status", "--json").code == 0, 20, "the coordinator to answer")

    def start_agent(self, host_id: str, fault: str | None = None) -> None:
        host = self.hosts[host_id]
        args = [LOCKSTEP, "agent", "--host-id", host_id, "--state-dir", str(host.state_dir)]
        for key, value in host.labels.items():
            args += ["--label", f"{key}={value}"]
        env = self.envs[topology.agent_user(host_id)]
        host.proc = self.procs.start(args, env=env, log=self.root / f"{host_id}.log")

    def key_state(self, host_id: str) -> str | None:
        result = self.cli("agents", "--json")
        if result.code != 0:
            return None
        states = {a["host_id"]: a["key_state"] for a in result.doc["agents"]}
        return states.get(host_id)


def test_after_broker_setup_and_add_agent_on_a_fresh_vhost_an_agent_deploys_with_its_own_user(
    urls: dict[str, str], tmp_path: Path, procs: Procs, lockstep_env: dict[str, str]
) -> None:
    envs = {
        user: dict(lockstep_env, LOCKSTEP_AMQP_URL=url, LOCKSTEP_AGENT_USERS="per-host")
        for user, url in urls.items()
    }
    fleet = RoleFleet(tmp_path, procs, envs)
    fleet.start_coordinator()
    fleet.add_host("host-a", pay="yes")
    wait_until(lambda: fleet.key_state("host-a") == "pending", 20, "host-a's key enrolled")
    approved = fleet.cli("agents", "approve", "host-a", "--json")
    assert approved.code == 0, approved.stdout + approved.stderr
    fleet.wait_alive("host-a")
    fleet.register("payments", "1.0.0", hosts={"pay": "yes"})

    result = fleet.deploy("payments=1.0.0")

    assert result.code == 0, result.stdout + result.stderr
    assert result.doc["state"] == "completed"
    assert [(p["host"], p["state"]) for p in result.doc["participants"]] == [
        ("host-a", "committed")
    ]
    assert fleet.http_version("host-a", "payments") == "1.0.0"
    assert fleet.reported()[("host-a", "payments")] == "1.0.0"


# --- what the broker refuses an agent, and what it allows -------------------------------


@pytest.fixture
async def host_a(
    urls: dict[str, str], request: pytest.FixtureRequest
) -> AsyncIterator[aio_pika.abc.AbstractConnection]:
    """A plain aio-pika connection as lockstep-agent-host-a."""
    connection = await aio_pika.connect(
        urls[topology.agent_user("host-a")],
        client_properties={"connection_name": f"test:{request.node.nodeid}"},
    )
    yield connection
    await connection.close()


async def _publish(
    connection: aio_pika.abc.AbstractConnection, exchange: str, key: str, user_id: str
) -> None:
    """Publish on a fresh channel with confirms, so a refusal surfaces here."""
    channel = await connection.channel(publisher_confirms=True)
    target = await channel.get_exchange(exchange, ensure=False)
    await target.publish(aio_pika.Message(b"{}", user_id=user_id, delivery_mode=2), key)
    await channel.close()


async def test_agent_user_is_refused_by_the_broker_commands_requests_other_queue_forged_user_id(
    host_a: aio_pika.abc.AbstractConnection,
) -> None:
    own = topology.agent_user("host-a")
    with pytest.raises(ChannelAccessRefused, match=r"exchange 'lockstep\.commands'"):
        await _publish(host_a, topology.COMMANDS, topology.host_key("host-b"), own)
    with pytest.raises(ChannelAccessRefused, match=r"exchange 'lockstep\.requests'"):
        await _publish(host_a, topology.REQUESTS, "deploy", own)
    channel = await host_a.channel()
    other = await channel.get_queue(topology.agent_queue_name("host-b"), ensure=False)
    with pytest.raises(ChannelAccessRefused, match=r"queue 'lockstep\.agent\.host-b'"):
        await other.consume(_ignore)
    forged = topology.agent_user("host-b")
    with pytest.raises(ChannelPreconditionFailed, match=f"user_id property set to '{forged}'"):
        await _publish(host_a, topology.REPORTS, topology.REPORTS_KEY, forged)


async def test_an_agent_user_can_publish_reports_with_its_own_user_id_and_consume_its_own_queue(
    host_a: aio_pika.abc.AbstractConnection, amqp_url: str
) -> None:
    own = topology.agent_user("host-a")
    await _publish(host_a, topology.REPORTS, topology.REPORTS_KEY, own)
    await _publish(host_a, topology.REPORTS, topology.DEAD_KEY, own)  # its refusals

    admin = await aio_pika.connect(amqp_url)
    async with admin:
        channel = await admin.channel(publisher_confirms=True)
        commands = await channel.get_exchange(topology.COMMANDS)
        await commands.publish(aio_pika.Message(b"command"), topology.host_key("host-a"))
        for queue_name in (topology.COORDINATOR_QUEUE, topology.DEAD_QUEUE):
            report = await _next(await channel.get_queue(queue_name))
            assert report.user_id == own

    agent_channel = await host_a.channel()
    mine = await agent_channel.get_queue(topology.agent_queue_name("host-a"), ensure=False)
    assert (await _next(mine)).body == b"command"


async def _ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
    """A consumer callback for a consume that must be refused."""


async def _next(queue: aio_pika.abc.AbstractQueue) -> aio_pika.abc.AbstractIncomingMessage:
    """The next message of `queue`, consumed (the coordinator's single-active-consumer
    quorum queue refuses basic.get), acked, within a deadline."""
    received: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
    tag = await queue.consume(received.put)
    try:
        message = await asyncio.wait_for(received.get(), 10)
        await message.ack()
    finally:
        await queue.cancel(tag)
    return message


# --- the CLI's own behaviour --------------------------------------------------------------


def test_broker_setup_again_keeps_every_password_and_add_agent_refuses_a_bad_host_id(
    lockstep_env: dict[str, str], urls: dict[str, str]
) -> None:
    again = lockstep(lockstep_env, "broker", "setup")
    assert again.returncode == 0, again.stderr
    for user in USERS[:3]:
        assert f"{user}: exists, password unchanged" in again.stdout
    agent = lockstep(lockstep_env, "broker", "add-agent", "host-a", "--json")
    assert json.loads(agent.stdout)["created"] is False
    assert json.loads(agent.stdout)["amqp_url"] is None

    bad = lockstep(lockstep_env, "broker", "add-agent", "../etc", "--json")
    assert bad.returncode == 2
    assert json.loads(bad.stdout)["error"]["field"] == "HOST"


def test_broker_setup_exits_3_if_the_management_api_is_unreachable_2_if_it_refuses_the_admin(
    lockstep_env: dict[str, str],
) -> None:
    closed = dict(lockstep_env, LOCKSTEP_MANAGEMENT_URL="http://guest:guest@127.0.0.1:9")
    unreachable = lockstep(closed, "broker", "setup")
    assert unreachable.returncode == 3
    assert "rabbitmq-plugins enable rabbitmq_management" in unreachable.stderr

    wrong = "http://lockstep-nobody:wrong@127.0.0.1:15672"
    refused = lockstep(lockstep_env, "broker", "setup", "--management-url", wrong, "--json")
    assert refused.returncode == 2
    assert "'lockstep-nobody'" in json.loads(refused.stdout)["error"]["reason"]


@pytest.mark.parametrize(
    ("amqp_url", "management", "vhost"),
    [
        ("amqp://guest:guest@127.0.0.1:5672/", "http://guest:guest@127.0.0.1:15672", "/"),
        ("amqp://a:b@rabbit/lockstep-x", "http://a:b@rabbit:15672", "lockstep-x"),
        ("amqp://rabbit:5672", "http://guest:guest@rabbit:15672", "/"),
        ("amqps://u:p%40ss@mq.example:5671/%2Fprod", "https://u:p%40ss@mq.example:15671", "/prod"),
        ("amqp://u:p@n1:5672/v,amqp://u:p@n2:5672/v", "http://u:p@n1:15672", "v"),
    ],
)
def test_management_url_and_vhost_derive_from_the_amqp_url(
    amqp_url: str, management: str, vhost: str
) -> None:
    assert default_management_url(amqp_url) == management
    assert vhost_of(amqp_url) == vhost


def test_printed_urls_carry_the_new_users_credentials_on_every_node() -> None:
    assert (
        url_for("amqp://guest:guest@n1:5672/v,amqp://n2:5672/v", "lockstep-agent-h", "p-w_")
        == "amqp://lockstep-agent-h:p-w_@n1:5672/v,amqp://lockstep-agent-h:p-w_@n2:5672/v"
    )


# --- deploy/: the compose broker's users cannot drift from shared.topology --------------


def _items(doc: dict[str, list[dict[str, object]]], key: str) -> list[dict[str, object]]:
    return doc[key]


def test_definitions_json_users_permissions_and_topology_equal_shared_topology() -> None:
    defs = json.loads((DEPLOY / "rabbitmq" / "definitions.json").read_text())
    compose = (DEPLOY / "compose.yaml").read_text()
    hosts = re.findall(r'"--host-id", "([^"]+)"', compose)
    assert hosts
    assert all(re.match(HOST, h) for h in hosts)
    roles = [topology.COORDINATOR_USER, topology.OPERATOR_USER, topology.ALERTS_USER]
    roles += [topology.agent_user(h) for h in hosts]
    for user in roles:  # compose runs every process as its own role's user (no alert
        if user != topology.ALERTS_USER:  # bridge runs there: the user is ready for one)
            assert f"amqp://{user}:" in compose, user

    granted = {p["user"]: p for p in _items(defs, "permissions") if p["user"] != "lockstep-admin"}
    assert set(granted) == set(roles)
    for user in roles:
        rights = {k: granted[user][k] for k in ("configure", "write", "read")}
        assert rights == asdict(topology.permissions(user)), user
    assert {u["name"] for u in _items(defs, "users")} == {*roles, "lockstep-admin"}

    exchanges = {(e["name"], e["type"], e["durable"]) for e in _items(defs, "exchanges")}
    assert exchanges == {(e.name, e.type, True) for e in topology.EXCHANGES}
    queues = [topology.coordinator_queue(), topology.dead_queue()]
    queues += [topology.agent_queue(h) for h in hosts]
    # not the heartbeat queue: not durable, the coordinator declares it wherever it is
    assert not topology.heartbeats_queue().durable
    declared = {q["name"]: q["arguments"] for q in _items(defs, "queues")}
    assert declared == {q.name: q.declare_arguments() for q in queues}
    bindings = {(b["source"], b["destination"], b["routing_key"]) for b in _items(defs, "bindings")}
    assert bindings == {(ex, q.name, key) for q in queues for ex, key in q.bindings}
