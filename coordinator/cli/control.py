"""`lockstep pause`, `resume` and `abort`: operator control of a running deployment
(SPEC 4). `coordinator/cli/main.py` registers them on the `lockstep` app."""

from __future__ import annotations

from typing import Annotated, NoReturn

import typer

from coordinator.cli import render
from coordinator.cli.client import EXIT_OK, ask, call, emit
from coordinator.cli.options import Json
from shared.messages import ControlRequest
from shared.transport import Broker

Target = Annotated[str | None, typer.Argument(help="Deployment id (default: the one in flight).")]


def _control(action: str, deployment_id: str | None, as_json: bool) -> NoReturn:
    body = ControlRequest.model_validate({"action": action, "deployment_id": deployment_id})

    async def go(broker: Broker) -> int:
        emit(await ask(broker, action, body), as_json, render.deployment)
        return EXIT_OK

    call(go, as_json=as_json)


def pause(deployment_id: Target = None, as_json: Json = False) -> None:
    """Let the batches in flight finish, then start no further batch."""
    _control("pause", deployment_id, as_json)


def resume(deployment_id: Target = None, as_json: Json = False) -> None:
    """Continue a paused deployment."""
    _control("resume", deployment_id, as_json)


def abort(deployment_id: Target = None, as_json: Json = False) -> None:
    """Return every participant to the release the deployment started from."""
    _control("abort", deployment_id, as_json)
