"""How CLI commands reach the coordinator, and how failures become exit codes.

`call` runs one coroutine with a connected `Broker` and maps the error tree onto the
exit codes of SPEC 4: `UserError` -> 2, broker or coordinator unreachable -> 3.
With `--json`, errors are printed as one JSON document on stdout too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import typer

from shared import log
from shared.config import BrokerSettings
from shared.errors import BrokerUnavailable, CoordinatorTimeout, UserError
from shared.messages import Body, Reply
from shared.transport import Broker

EXIT_OK, EXIT_NOT_REACHED, EXIT_BAD_INPUT, EXIT_UNREACHABLE = 0, 1, 2, 3


def fail(code: int, kind: str, reason: str, field: str = "", *, as_json: bool = False) -> NoReturn:
    if as_json:
        print(json.dumps({"error": {"kind": kind, "field": field, "reason": reason}}))
    where = f"{field}: " if field else ""
    typer.echo(f"error: {where}{reason}", err=True)
    raise typer.Exit(code)


def call(fn: Callable[[Broker], Awaitable[int]], *, as_json: bool) -> NoReturn:
    """Run `fn` with a broker connection; exit with its code or the error's."""
    log.setup("error")  # stdout is for documents: logs go to stderr, and only errors
    for library in ("aiormq", "aio_pika"):  # a cluster node that is down is no error here:
        logging.getLogger(library).setLevel(logging.CRITICAL)  # the CLI says what failed
    try:
        code = asyncio.run(_with_broker(fn))
    except UserError as e:
        fail(EXIT_BAD_INPUT, "user", e.reason, e.field, as_json=as_json)
    except (BrokerUnavailable, CoordinatorTimeout) as e:
        fail(EXIT_UNREACHABLE, "unreachable", str(e), as_json=as_json)
    raise typer.Exit(code)


async def _with_broker(fn: Callable[[Broker], Awaitable[int]]) -> int:
    settings = BrokerSettings()
    broker = Broker(settings, f"cli:{os.getpid()}")
    await broker.connect()
    try:
        return await fn(broker)
    finally:
        await broker.close()


async def ask(broker: Broker, routing_key: str, body: Body) -> dict[str, Any]:
    """The data of the coordinator's reply; `UserError` if it refused the request."""
    reply: Reply = await broker.request(routing_key, body)
    if not reply.ok:
        error = reply.error
        if error is None or error.kind != "user":
            raise BrokerUnavailable(f"the coordinator failed: {error.reason if error else '?'}")
        raise UserError(error.field, error.reason)
    return reply.data


def emit(doc: dict[str, Any], as_json: bool, render: Callable[[dict[str, Any]], str]) -> None:
    """Print `doc` as JSON or as text."""
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
    else:
        typer.echo(render(doc))
