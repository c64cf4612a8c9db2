"""`lockstep status`, `history`, `agents` and `events`: the read-only views, and the
operator's actions on an agent's key (`agents approve|reject|revoke|remove|converge
HOST`) (SPEC 4). `coordinator/cli/main.py` registers them on the `lockstep` app."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any, NoReturn

import typer

from coordinator.cli import render
from coordinator.cli.client import EXIT_BAD_INPUT, EXIT_OK, ask, call, emit, fail
from coordinator.cli.options import Json
from shared.errors import UserError
from shared.messages import ControlRequest, QueryRequest
from shared.specs import validate
from shared.transport import Broker


def _query(what: str, as_json: Json, renderer: Any) -> NoReturn:
    async def go(broker: Broker) -> int:
        emit(
            await ask(broker, "query", QueryRequest.model_validate({"what": what})),
            as_json,
            renderer,
        )
        return EXIT_OK

    call(go, as_json=as_json)


def status(as_json: Json = False) -> None:
    """Current and desired release; per host, per service: version, health, last seen."""
    _query("status", as_json, render.status)


def history(
    limit: Annotated[int, typer.Option(help="At most this many deployments.", min=1)] = 100,
    before: Annotated[
        str | None, typer.Option(help="Only those started before this deployment id.")
    ] = None,
    as_json: Json = False,
) -> None:
    """Releases and deployments, newest first, with outcome and reason (a page at a time:
    the JSON's `next_before` is the `--before` of the next page)."""
    try:
        body = validate(QueryRequest, {"what": "history", "limit": limit, "before": before}, "")
    except UserError as e:
        fail(EXIT_BAD_INPUT, "user", e.reason, f"--{e.field}", as_json=as_json)

    async def go(broker: Broker) -> int:
        emit(await ask(broker, "query", body), as_json, render.history)
        return EXIT_OK

    call(go, as_json=as_json)


AGENT_ACTIONS = ("approve", "reject", "revoke", "remove", "converge")


def agents(
    action: Annotated[
        str | None, typer.Argument(help="approve, reject, revoke, remove or converge")
    ] = None,
    host: Annotated[str | None, typer.Argument(help="The host to act on.")] = None,
    as_json: Json = False,
) -> None:
    """Hosts, labels, liveness, key state; `agents approve|reject|revoke|remove HOST` act on
    a host's key; `agents converge HOST` replaces versions lockstep never deployed."""
    if action is None:
        _query("agents", as_json, render.agents)
    if action not in AGENT_ACTIONS or not host:
        fail(EXIT_BAD_INPUT, "user", f"unknown action {action!r} or missing HOST (agents "
             f"{'|'.join(AGENT_ACTIONS)} HOST)", "action", as_json=as_json)  # fmt: skip
    try:
        body = validate(ControlRequest, {"action": action, "host_id": host}, "")
    except UserError as e:
        fail(EXIT_BAD_INPUT, "user", e.reason, "HOST", as_json=as_json)
    key = "converge" if action == "converge" else "agents"

    async def go(broker: Broker) -> int:
        emit(await ask(broker, key, body), as_json, render.agent_action)
        return EXIT_OK

    call(go, as_json=as_json)


def events(
    follow: Annotated[bool, typer.Option("--follow", help="Keep printing new events.")] = False,
    as_json: Json = False,
) -> None:
    """The deployment event stream (`--json --follow`: one JSON object per line)."""

    async def go(broker: Broker) -> int:
        doc = await ask(broker, "query", QueryRequest(what="events"))
        if not follow:
            emit(doc, as_json, lambda d: "\n".join(render.event(e) for e in d["events"]))
            return EXIT_OK
        after = 0
        while True:
            for item in doc["events"]:
                typer.echo(json.dumps(item, default=str) if as_json else render.event(item))
                after = item["seq"]
            await asyncio.sleep(0.5)
            doc = await ask(broker, "query", QueryRequest(what="events", after=after))

    call(go, as_json=as_json)
