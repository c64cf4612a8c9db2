"""`lockstep`: the console script (SPEC 4), the `app` of `[project.scripts]`.

`lockstep coordinator` and `lockstep agent` run the two processes (here: this is the
one module that names both sides, because one console script starts either process);
`lockstep keys init` writes the coordinator's key pair. Every other command is a client
that sends a request to the coordinator over `lockstep.requests` and prints the reply
(`--json`: one JSON document on stdout): deploys.py (register, plan, deploy,
rollback), control.py (pause, resume, abort), queries.py (status, history, agents,
events) and broker.py (`lockstep broker ...`), registered below in `--help` order.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any

import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.cli import control, deploys, queries
from coordinator.cli.broker import broker_app
from coordinator.cli.client import EXIT_BAD_INPUT, EXIT_UNREACHABLE, emit, fail
from coordinator.cli.options import Json, pair
from shared import log, signing
from shared.config import BrokerSettings, CoordinatorSettings, SecuritySettings
from shared.errors import BrokerUnavailable, StoreUnavailable, UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Deploy and roll back dependent services across a fleet, all or nothing.",
)


def _run_forever(main: Coroutine[Any, Any, None]) -> None:
    """Run a server coroutine until SIGTERM or SIGINT."""

    async def runner() -> None:
        task = asyncio.ensure_future(main)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(runner())


@app.command()
def coordinator(
    db: Annotated[
        str,
        typer.Option(
            help="SQLite file, or a postgresql:// URL that standby coordinators share "
            "(pip install 'lockstep[postgres]')."
        ),
    ] = "lockstep-coordinator.db",
    key_dir: Annotated[
        Path, typer.Option(help="Where coordinator.key is (made by `lockstep keys init`).")
    ] = Path("."),
    metrics_port: Annotated[int | None, typer.Option(help="Prometheus metrics port.")] = None,
    auto_approve: Annotated[
        bool,
        typer.Option(
            help="Approve every new agent key at once (labs and demos only: any "
            "host id that reports is then trusted)."
        ),
    ] = False,
    operators: Annotated[
        list[str] | None,
        typer.Option(help="Broker user allowed to send requests (repeatable; default: any)."),
    ] = None,
) -> None:
    """Run the coordinator."""
    from coordinator.enrollment import Policy
    from coordinator.service import serve
    from coordinator.store.db import is_url

    log.setup()
    try:
        key = _coordinator_key(key_dir)
        policy = Policy(SecuritySettings(), auto_approve, frozenset(operators or ()))
        where = db if is_url(db) else Path(db)
        _run_forever(
            serve(where, BrokerSettings(), CoordinatorSettings(), key, policy, metrics_port)
        )
    except UserError as e:
        fail(EXIT_BAD_INPUT, "user", e.reason, e.field)
    except (BrokerUnavailable, StoreUnavailable) as e:
        fail(EXIT_UNREACHABLE, "unreachable", str(e))


def _coordinator_key(key_dir: Path) -> Ed25519PrivateKey:
    path = key_dir / signing.COORDINATOR_KEY
    if not path.exists():
        raise UserError("--key-dir", f"no {path}: the coordinator signs every command; run "
                        f"`lockstep keys init --dir {key_dir}` first")  # fmt: skip
    return signing.load_private(path)


keys_app = typer.Typer(no_args_is_help=True, help="The coordinator's signing keys.")
app.add_typer(keys_app, name="keys")
app.add_typer(broker_app, name="broker")


@keys_app.command("init")
def keys_init(
    dir: Annotated[Path, typer.Option("--dir", help="Where to write the key pair.")] = Path("."),
    as_json: Json = False,
) -> None:
    """Write the coordinator's key pair (coordinator.key 0600, coordinator.pub)."""
    try:
        private, public = signing.write_pair(dir, "coordinator", signing.generate())
    except UserError as e:
        fail(EXIT_BAD_INPUT, "user", e.reason, e.field, as_json=as_json)
    doc = {"key": str(private), "public_key": str(public.resolve())}
    emit(doc, as_json, lambda d: f"{d['public_key']}\n(give this file to every agent: "
         "--coordinator-key; keep coordinator.key secret)")  # fmt: skip


@app.command()
def agent(
    host_id: Annotated[str, typer.Option(help="This host's id.")],
    label: Annotated[list[str] | None, typer.Option(help="k=v label (repeatable).")] = None,
    state_dir: Annotated[Path, typer.Option(help="Where releases and state live.")] = Path(
        "lockstep-agent"
    ),
    driver: Annotated[str, typer.Option(help="process or systemd.")] = "process",
    coordinator_key: Annotated[
        Path | None,
        typer.Option(help="The coordinator's coordinator.pub (or LOCKSTEP_COORDINATOR_KEY)."),
    ] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Prometheus metrics port.")] = None,
) -> None:
    """Run an agent on this host."""
    from agent.main import run

    log.setup()
    try:
        labels = dict(pair(item, "--label") for item in label or [])
        run(host_id, labels, state_dir, driver, metrics_port, coordinator_key)
    except UserError as e:
        fail(EXIT_BAD_INPUT, "user", e.reason, e.field)
    except BrokerUnavailable as e:
        fail(EXIT_UNREACHABLE, "unreachable", str(e))


for command in (
    deploys.register, deploys.plan, deploys.deploy, deploys.rollback,
    control.pause, control.resume, control.abort,
    queries.status, queries.history, queries.agents, queries.events,
):  # fmt: skip
    app.command()(command)
