"""Issue 9: `deploy --wait` and `rollback --wait` follow events, not polls.

The coordinator counts the requests it handled (`lockstep_messages_handled_total`, on
`--metrics-port`); the CLI subscribes to `lockstep.events` and asks for the deployment
once at the end, so a wait of several seconds costs at most two queries, where polling
every 0.2 s cost dozens. The reconnect test closes the CLI's own connection at the
broker and keeps it out while the deployment ends, so the end's event is lost and only
the query made when the subscription comes back can find it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest

from coordinator.cli import render
from coordinator.cli.follow import DEPLOYMENT_EVENTS, SILENCE
from shared import topology
from shared.messages import Event, make
from shared.transport import Broker, Delivery
from tests.e2e.fleet import LOCKSTEP, Fleet, Result
from tests.e2e.test_core import PAY, PLACES, WEB, assert_fleet_at
from tests.support.artifacts import free_port
from tests.support.procs import Procs, wait_until
from tests.support.rabbit import rabbitmqctl

pytestmark = pytest.mark.e2e

COUNTS = r"\d+/\d+ [a-z_]+"
MANAGEMENT = "http://127.0.0.1:15672"
PROGRESS = re.compile(rf"^[0-9a-f]{{12}} [a-z_]+: (no participants|{COUNTS}(, {COUNTS})*)$")


class MeteredFleet(Fleet):
    """A fleet whose coordinator serves its metrics, to count the queries it answered."""

    def __init__(self, root: Path, env: dict[str, str], procs: Procs) -> None:
        super().__init__(root, env, procs)
        self.metrics_port = free_port()
        self.coordinator_args = ("--metrics-port", str(self.metrics_port))

    def metric(self, sample: str) -> int:
        """The value of one sample of the coordinator's metrics (0 before its first)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics") as page:
            text = page.read().decode()
        found = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
        return int(float(found.group(1))) if found else 0

    def queries(self) -> int:
        """How many `query` requests the coordinator has handled so far."""
        return self.metric('lockstep_messages_handled_total{kind="query"}')

    def finished(self, state: str) -> int:
        """How many deployments the coordinator has seen end in `state` (no query)."""
        return self.metric(f'lockstep_deployments_finished_total{{state="{state}"}}')

    def counted(self, *args: str) -> tuple[Result, int]:
        """Run a CLI command; its result and the queries the coordinator handled meanwhile."""
        before = self.queries()
        result = self.cli(*args)
        return result, self.queries() - before


@pytest.fixture
def fleet(tmp_path: Path, procs: Procs, lockstep_env: dict[str, str]) -> MeteredFleet:
    """The three hosts of test_core behind a metered coordinator, at orders and payments
    1.0.0, with 2.0.0 of both registered."""
    f = MeteredFleet(tmp_path, lockstep_env, procs)
    f.start_coordinator()
    f.add_host("host-a", pay="yes")
    f.add_host("host-b", web="yes")
    f.add_host("host-c", pay="yes", web="yes")
    f.wait_alive("host-a", "host-b", "host-c")
    f.register("payments", "1.0.0", hosts=PAY)
    f.register("payments", "2.0.0", hosts=PAY)
    f.register("orders", "1.0.0", hosts=WEB, requires={"payments": ">=1.0.0"})
    f.register("orders", "2.0.0", hosts=WEB, requires={"payments": ">=2.0.0"})
    first = f.deploy("orders=1.0.0", "payments=1.0.0")
    assert first.code == 0, first.stdout + first.stderr
    return f


def test_deploy_wait_of_seconds_asks_at_most_twice_and_prints_one_line_per_phase(
    fleet: MeteredFleet,
) -> None:
    started = time.monotonic()
    result, queries = fleet.counted("deploy", "orders=2.0.0", "payments=2.0.0", "--wait",
                                    "--bake", "3s")  # fmt: skip
    took = time.monotonic() - started

    assert result.code == 0, result.stdout + result.stderr
    assert took > 3, "the deployment must take a few seconds for the count to mean anything"
    assert queries <= 2, f"{queries} queries in {took:.1f}s: --wait polled"
    progress = [line for line in result.stdout.splitlines() if PROGRESS.match(line)]
    phases = [line.split()[1].rstrip(":") for line in progress]
    assert {"committing", "baking"} <= set(phases), result.stdout
    assert len(phases) == len(set(phases)), f"one line per phase change:\n{result.stdout}"
    assert any("4/4 committed" in line for line in progress), result.stdout
    summary = result.stdout.splitlines()[len(progress)]
    assert re.match(r"^deployment [0-9a-f]{12}: completed$", summary), result.stdout
    assert_fleet_at(fleet, {"orders": "2.0.0", "payments": "2.0.0"})


def test_deploy_wait_of_an_empty_deployment_asks_once_at_most(fleet: MeteredFleet) -> None:
    """Nothing to change: the deployment ends at once, answered terminal or not."""
    result, queries = fleet.counted("deploy", "orders=1.0.0", "payments=1.0.0", "--wait", "--json")

    assert result.code == 0, result.stdout + result.stderr
    assert result.doc["state"] == "completed"
    assert result.doc["participants"] == []
    assert queries <= 1


def test_rollback_wait_ends_with_the_rollback_document_and_exit_0_in_at_most_two_queries(
    fleet: MeteredFleet,
) -> None:
    v2 = fleet.deploy("orders=2.0.0", "payments=2.0.0")
    assert v2.code == 0, v2.stdout + v2.stderr

    result, queries = fleet.counted("rollback", "--wait", "--json")

    assert result.code == 0, result.stdout + result.stderr
    doc = result.doc
    assert doc["state"] == "completed"
    assert doc["from_release_id"] == v2.doc["release_id"]
    assert doc["services"] == {"orders": "1.0.0", "payments": "1.0.0"}
    assert {(p["host"], p["service"]) for p in doc["participants"]} == PLACES
    assert all(p["state"] == "committed" for p in doc["participants"])
    newest = fleet.history()["deployments"][0]
    assert (newest["deployment_id"], newest["state"]) == (doc["deployment_id"], "completed")
    assert queries <= 2
    assert_fleet_at(fleet, {"orders": "1.0.0", "payments": "1.0.0"})


def test_two_waits_on_overlapping_deployments_each_end_with_their_own_document(
    fleet: MeteredFleet,
) -> None:
    first = fleet.cli_background("deploy", "payments=2.0.0", "--wait", "--json", "--bake", "2s")
    wait_until(lambda: _newest(fleet)["services"].get("payments") == "2.0.0", 20,
               "the first deployment accepted")  # fmt: skip
    second = fleet.cli_background("deploy", "orders=2.0.0", "payments=2.0.0", "--wait", "--json",
                                  "--bake", "1s")  # fmt: skip

    one, two = fleet.finish(first), fleet.finish(second)

    assert one.code == 0, one.stdout + one.stderr
    assert two.code == 0, two.stdout + two.stderr
    assert one.doc["deployment_id"] != two.doc["deployment_id"]
    assert (one.doc["state"], two.doc["state"]) == ("completed", "completed")
    assert {p["service"] for p in one.doc["participants"]} == {"payments"}
    assert {p["service"] for p in two.doc["participants"]} == {"orders"}
    assert two.doc["from_release_id"] == one.doc["release_id"], "queued behind the first"
    assert_fleet_at(fleet, {"orders": "2.0.0", "payments": "2.0.0"})


@pytest.fixture
def follower(fleet: MeteredFleet) -> Iterator[dict[str, str]]:
    """The environment of a CLI with a broker user of its own on the test's vhost, whose
    connection limit can hold its reconnect off."""
    user, password = f"follow-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    _management("PUT", f"/api/users/{user}", body={"password": password, "tags": ""})
    _grant(user, _vhost(fleet))
    url = urlsplit(fleet.env["LOCKSTEP_AMQP_URL"])
    env = dict(fleet.env, LOCKSTEP_AMQP_URL=url._replace(
        netloc=f"{user}:{password}@{url.hostname}:{url.port}").geturl())  # fmt: skip
    yield env
    _management("DELETE", f"/api/users/{user}")


def test_deploy_wait_that_missed_the_end_while_disconnected_reports_it_once_back(
    fleet: MeteredFleet, follower: dict[str, str]
) -> None:
    user = urlsplit(follower["LOCKSTEP_AMQP_URL"]).username or ""
    cli = _background(follower, "deploy", "orders=2.0.0", "payments=2.0.0", "--wait", "--json",
                      "--max-parallel", "1", "--canary", "1", "--canary-bake", "5s")  # fmt: skip
    wait_until(lambda: _newest(fleet)["state"] == "holding", 30, "the canary to hold")
    assert fleet.cli("pause", "--json").code == 0
    wait_until(lambda: _newest(fleet)["state"] == "paused", 30, "the deployment to pause")
    _management("PUT", f"/api/user-limits/{user}/max-connections", body={"value": 0})
    connection = wait_until(lambda: _connection_of(user), 20, "the CLI's connection")
    rabbitmqctl("close_connection", connection, "test: the CLI's connection drops")
    wait_until(lambda: _connection_of(user) is None, 20, "the CLI to stay out")
    completed = fleet.finished("completed")
    assert fleet.cli("resume", "--json").code == 0
    wait_until(lambda: fleet.finished("completed") > completed, 30, "the deployment to end")
    before, back = fleet.queries(), time.monotonic()
    _management("DELETE", f"/api/user-limits/{user}/max-connections")

    result = fleet.finish(cli, timeout=60)

    took, queries = time.monotonic() - back, fleet.queries() - before
    assert result.code == 0, result.stdout + result.stderr
    assert result.doc["state"] == "completed"
    assert result.doc["deployment_id"] == _newest(fleet)["deployment_id"]
    assert 1 <= queries <= 2, "asked once back (and maybe once the silence ran out meanwhile)"
    assert took < SILENCE / 2, f"{took:.1f}s after the CLI could reconnect"
    assert_fleet_at(fleet, {"orders": "2.0.0", "payments": "2.0.0"})


async def test_a_subscription_is_bound_again_after_a_reconnect_and_says_so(
    broker: Broker,
) -> None:
    """`Broker.subscribe`'s `on_restored`, which makes `--wait` ask after a reconnect."""
    restored, got = asyncio.Event(), asyncio.Queue[Event]()

    async def handler(delivery: Delivery) -> None:
        assert isinstance(delivery.envelope.body, Event)
        got.put_nowait(delivery.envelope.body)

    await broker.subscribe(topology.EVENTS, [DEPLOYMENT_EVENTS], handler, restored.set)
    connection = await asyncio.to_thread(
        wait_until, lambda: _connection_named(broker.name), 20, "the test's connection"
    )
    await asyncio.to_thread(rabbitmqctl, "close_connection", connection, "test: drop")
    await asyncio.wait_for(restored.wait(), 30)
    event = Event(type="deployment.completed", data={"deployment_id": "0123456789ab"})
    await broker.publish(topology.EVENTS, topology.event_key(event.type), make(event, "test"))
    assert (await asyncio.wait_for(got.get(), 10)) == event


def _background(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [LOCKSTEP, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _newest(fleet: Fleet) -> dict[str, Any]:
    deployments = fleet.history()["deployments"]
    return dict(deployments[0]) if deployments else {"services": {}, "state": ""}


def _vhost(fleet: Fleet) -> str:
    return urlsplit(fleet.env["LOCKSTEP_AMQP_URL"]).path.lstrip("/")


def _management(method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """A call to the broker's management API (what `lockstep broker` uses)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{MANAGEMENT}{path}", data, method=method)
    request.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=10) as answer:
        text = answer.read()
    return json.loads(text) if text else None


def _grant(user: str, vhost: str) -> None:
    """Give `user` every permission on `vhost`."""
    path = f"/api/permissions/{quote(vhost, safe='')}/{user}"
    _management("PUT", path, body={"configure": ".*", "write": ".*", "read": ".*"})


def _connection_named(name: str) -> str | None:
    """The pid of the connection whose client calls itself `name`."""
    table = rabbitmqctl("list_connections", "pid", "client_properties", "--no-table-headers")
    for line in table.splitlines():
        if f'{{"connection_name","{name}"}}' in line:
            return line.split("\t")[0]
    return None


def _connection_of(user: str) -> str | None:
    """The pid of the connection `user` opened (rabbitmqctl: the management API's list
    lags by its statistics interval)."""
    table = rabbitmqctl("list_connections", "user", "pid", "--no-table-headers")
    names = [line.split("\t")[1] for line in table.splitlines() if line.startswith(f"{user}\t")]
    return names[0] if names else None


def test_progress_is_one_line_of_counts_per_participant_state_in_protocol_order() -> None:
    states = ["committed"] * 12 + ["prepared"] * 27 + ["refused"]
    doc = {"deployment_id": "3f2a9c0d1b2e", "state": "committing",
           "participants": [{"host": f"h{i}", "state": s} for i, s in enumerate(states)]}  # fmt: skip

    line = render.progress(doc)

    assert line == "3f2a9c0d1b2e committing: 27/40 prepared, 1/40 refused, 12/40 committed"
    assert PROGRESS.match(line)
    assert render.progress({**doc, "participants": []}).endswith("committing: no participants")
