"""`lockstep broker setup` and `lockstep broker add-agent HOST`: the broker side of SPEC 7.

`setup` declares the topology of `shared.topology` (exchanges, the coordinator and
dead-letter queues, their bindings) on the vhost of LOCKSTEP_AMQP_URL and creates the
role users `lockstep-coordinator`, `lockstep-operator` and `lockstep-alerts` with
generated passwords and the permissions of `topology.permissions`; a user that exists
keeps its password. `add-agent HOST` creates `lockstep-agent-HOST`, which may read only
its own queue and write only to lockstep.reports, and declares that queue and its
binding. Both print the AMQP URL of every user they created. `coordinator/cli/main.py`
registers `broker_app`; nothing else calls this module.

They talk to RabbitMQ's management HTTP API (`management.Management`), not to rabbitmqctl:
the API works from an operator's machine with nothing but an admin URL, where
rabbitmqctl must run on a broker node holding its Erlang cookie; and each object is
one quick HTTP call, where every rabbitmqctl call starts an Erlang VM (about a second),
too slow for a fleet of a thousand agents. The endpoint is `--management-url` (or
LOCKSTEP_MANAGEMENT_URL), by default LOCKSTEP_AMQP_URL's host and credentials on port
15672 (https and 15671 for amqps://); the plugin must be enabled on the broker
(`rabbitmq-plugins enable rabbitmq_management`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import typer

from coordinator.cli.client import EXIT_BAD_INPUT, EXIT_UNREACHABLE, emit, fail
from coordinator.cli.management import Management, rights
from coordinator.cli.options import Json
from shared import topology
from shared.config import BrokerSettings
from shared.errors import BrokerUnavailable, UserError
from shared.specs import HOST

ROLE_USERS = (topology.COORDINATOR_USER, topology.OPERATOR_USER, topology.ALERTS_USER)


# --- what the commands do ---------------------------------------------------------------


def vhost_of(amqp_url: str) -> str:
    """The vhost of an AMQP URL (of its first node), as aio-pika reads it."""
    path = urlsplit(amqp_url.split(",")[0].strip()).path
    return "/" if path in ("", "/") else unquote(path[1:])


def default_management_url(amqp_url: str) -> str:
    """The default admin endpoint: the AMQP URL's host and credentials, port 15672."""
    parts = urlsplit(amqp_url.split(",")[0].strip())
    scheme, port = ("https", 15671) if parts.scheme == "amqps" else ("http", 15672)
    user = parts.username if parts.username is not None else "guest"
    password = parts.password if parts.password is not None else "guest"
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname
    return f"{scheme}://{user}:{password}@{host or 'localhost'}:{port}"


def url_for(amqp_url: str, user: str, password: str) -> str:
    """`amqp_url` (each node of a comma-separated list) with `user`'s credentials."""
    urls = []
    for node in amqp_url.split(","):
        parts = urlsplit(node.strip())
        netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@"
        netloc += parts.netloc.rpartition("@")[2]
        urls.append(urlunsplit((parts.scheme, netloc, parts.path, parts.query, "")))
    return ",".join(urls)


def _user_doc(api: Management, amqp_url: str, user: str) -> dict[str, Any]:
    password = api.ensure_user(user)
    return {
        "user": user,
        "created": password is not None,
        "amqp_url": url_for(amqp_url, user, password) if password is not None else None,
        "permissions": rights(user),
    }


def setup(
    api: Management, amqp_url: str, queue_type: topology.QueueType = "classic"
) -> dict[str, Any]:
    """Declare the topology, create the role users; the document `setup --json` prints.
    `queue_type`: the agents' (the dead-letter queue is made of the same type)."""
    for exchange in topology.EXCHANGES:
        api.declare_exchange(exchange)
    queues = (topology.dead_queue(queue_type), topology.coordinator_queue(),
              topology.heartbeats_queue())  # fmt: skip
    for queue in queues:
        api.declare_queue(queue)
    return {
        "vhost": api.vhost,
        "management_url": api.base,
        "exchanges": [e.name for e in topology.EXCHANGES],
        "queues": [q.name for q in queues],
        "users": [_user_doc(api, amqp_url, user) for user in ROLE_USERS],
    }


def add_agent(
    api: Management, amqp_url: str, host: str, queue_type: topology.QueueType
) -> dict[str, Any]:
    """One agent's user and queue; the document `add-agent --json` prints."""
    if not re.match(HOST, host):
        raise UserError(
            "HOST",
            f"{host!r} is not a host id (letters, digits, '.', '_' and "
            "'-', starting with a letter or digit)",
        )
    queue = topology.agent_queue(host, queue_type)
    api.require_exchange(topology.COMMANDS)
    api.declare_queue(queue)
    doc = _user_doc(api, amqp_url, topology.agent_user(host))
    return {
        "host_id": host,
        "vhost": api.vhost,
        "queue": queue.name,
        "queue_type": queue_type,
        "binding": {"exchange": topology.COMMANDS, "routing_key": topology.host_key(host)},
        **doc,
    }


# --- the typer sub-app ----------------------------------------------------------------

broker_app = typer.Typer(
    no_args_is_help=True, help="Broker users per role and the topology (management API)."
)
ManagementUrl = Annotated[
    str | None,
    typer.Option(
        envvar="LOCKSTEP_MANAGEMENT_URL",
        help="RabbitMQ management API with an "
        "admin's credentials (default: LOCKSTEP_AMQP_URL's host and user, :15672).",
    ),
]


def _run(
    work: Callable[[Management, BrokerSettings], dict[str, Any]],
    url: str | None,
    as_json: bool,
    render: Callable[[dict[str, Any]], str],
) -> None:
    settings = BrokerSettings()
    api = Management(
        url or default_management_url(settings.amqp_url),
        vhost_of(settings.amqp_url),
        settings.connect_timeout,
    )
    try:
        doc = work(api, settings)
    except UserError as e:
        fail(EXIT_BAD_INPUT, "user", e.reason, e.field, as_json=as_json)
    except BrokerUnavailable as e:
        fail(EXIT_UNREACHABLE, "unreachable", str(e), as_json=as_json)
    emit(doc, as_json, render)


def _render_user(user: dict[str, Any]) -> str:
    if user["created"]:
        return f"{user['user']}: created\n  LOCKSTEP_AMQP_URL={user['amqp_url']}"
    return f"{user['user']}: exists, password unchanged"


def _render_setup(doc: dict[str, Any]) -> str:
    lines = [f"vhost {doc['vhost']!r}: exchanges and queues of lockstep declared"]
    lines += [_render_user(user) for user in doc["users"]]
    lines.append(
        "coordinator: lockstep-coordinator; CLI: lockstep-operator (then run the "
        "coordinator with --operators lockstep-operator); alerts: lockstep-alerts"
    )
    return "\n".join(lines)


def _render_agent(doc: dict[str, Any]) -> str:
    binding = doc["binding"]
    return (
        f"queue {doc['queue']} ({doc['queue_type']}) bound to {binding['exchange']} "
        f"{binding['routing_key']}\n{_render_user(doc)}"
    )


@broker_app.command("setup")
def setup_command(management_url: ManagementUrl = None, as_json: Json = False) -> None:
    """Declare the topology and create the coordinator, operator and alerts users."""
    _run(lambda api, s: setup(api, s.amqp_url, s.agent_queue_type), management_url, as_json,
         _render_setup)  # fmt: skip


@broker_app.command("add-agent")
def add_agent_command(
    host: Annotated[str, typer.Argument(help="The agent's host id.")],
    management_url: ManagementUrl = None,
    as_json: Json = False,
) -> None:
    """Create HOST's broker user (its own queue, reports only) and declare its queue."""
    _run(
        lambda api, s: add_agent(api, s.amqp_url, host, s.agent_queue_type),
        management_url,
        as_json,
        _render_agent,
    )
