"""`lockstep register`, `plan`, `deploy` and `rollback`: the commands that change what
runs (SPEC 4). `coordinator/cli/main.py` registers them on the `lockstep` app.

Each builds its request here, sends it to the coordinator through `client.call`, and
prints the reply; `--wait` follows the deployment's events to its end (follow.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from coordinator.cli import follow, render
from coordinator.cli.client import EXIT_BAD_INPUT, EXIT_NOT_REACHED, EXIT_OK, ask, call, emit, fail
from coordinator.cli.options import Json, Wait, pair
from shared.errors import UserError
from shared.messages import DeployRequest, RegisterRequest, RollbackRequest
from shared.specs import Strategy, load_release_file, load_service_version, validate
from shared.transport import Broker


def register(
    files: Annotated[list[Path], typer.Argument(help="Service version TOML files.")],
    as_json: Json = False,
) -> None:
    """Add service versions to the catalog."""
    try:
        versions = [load_service_version(f) for f in files]
    except UserError as e:
        fail(EXIT_BAD_INPUT, "user", e.reason, e.field, as_json=as_json)

    async def go(broker: Broker) -> int:
        doc = await ask(broker, "register", RegisterRequest(versions=versions))
        emit(doc, as_json, render.register)
        return EXIT_OK

    call(go, as_json=as_json)


# --- deploy and plan ------------------------------------------------------------------

Specs = Annotated[list[str] | None, typer.Argument(help="SVC=VERSION pairs.")]
File = Annotated[Path | None, typer.Option("--file", help="Release file (TOML).")]
MaxParallel = Annotated[str | None, typer.Option(help="Hosts per batch: count or percentage.")]
MaxParallelPrepare = Annotated[
    str | None, typer.Option(help="Prepares (artifact fetches) at once: count or percentage.")
]
Canary = Annotated[int | None, typer.Option(help="Hosts committed first.")]
CanaryBake = Annotated[str | None, typer.Option(help="How long canaries must stay healthy.")]
Bake = Annotated[str | None, typer.Option(help="Watch window after the last commit.")]
Scope = Annotated[str | None, typer.Option(help="dependents or all.")]
Unavailable = Annotated[int | None, typer.Option(help="Hosts that may miss prepare.")]
PrepareTimeout = Annotated[str | None, typer.Option(help="Deadline for votes.")]
CommitTimeout = Annotated[str | None, typer.Option(help="Deadline for one batch's commits.")]


def _request(
    specs: list[str] | None, file: Path | None, flags: dict[str, Any]
) -> tuple[dict[str, str], Strategy]:
    services: dict[str, str] = {}
    strategy: dict[str, Any] = {}
    if file is not None:
        release = load_release_file(file)
        services.update(release.services)
        strategy = release.strategy.model_dump(exclude_unset=True)
    for spec in specs or []:
        name, version = pair(spec, "SVC=VERSION")
        services[name] = version
    if not services:
        raise UserError("SVC=VERSION", "name at least one service, or --file")
    strategy.update({k: v for k, v in flags.items() if v is not None})
    result: Strategy = validate(Strategy, strategy, "strategy.")
    validate(DeployRequest, {"services": services}, "")
    return services, result


def plan(
    specs: Specs = None,
    file: File = None,
    max_parallel: MaxParallel = None,
    max_parallel_prepare: MaxParallelPrepare = None,
    canary: Canary = None,
    as_json: Json = False,
) -> None:
    """Dry run: the resolved version set, its waves and batches, each state checked."""
    flags = {"max_parallel": max_parallel, "max_parallel_prepare": max_parallel_prepare,
             "canary": canary}  # fmt: skip
    try:
        services, strategy = _request(specs, file, flags)
    except UserError as e:
        fail(EXIT_BAD_INPUT, "user", e.reason, e.field, as_json=as_json)

    async def go(broker: Broker) -> int:
        body = DeployRequest(services=services, strategy=strategy, dry_run=True)
        emit(await ask(broker, "deploy", body), as_json, render.plan)
        return EXIT_OK

    call(go, as_json=as_json)


def deploy(
    specs: Specs = None,
    file: File = None,
    wait: Wait = False,
    as_json: Json = False,
    max_parallel: MaxParallel = None,
    max_parallel_prepare: MaxParallelPrepare = None,
    canary: Canary = None,
    canary_bake: CanaryBake = None,
    bake: Bake = None,
    rollback_scope: Scope = None,
    allow_unavailable: Unavailable = None,
    prepare_timeout: PrepareTimeout = None,
    commit_timeout: CommitTimeout = None,
    no_queue: Annotated[
        bool, typer.Option("--no-queue", help="Refuse instead of waiting behind overlapping work.")
    ] = False,
) -> None:
    """Start a deployment (`--wait` follows it to the end)."""
    flags = {
        "max_parallel": max_parallel, "max_parallel_prepare": max_parallel_prepare,
        "canary": canary, "canary_bake": canary_bake,
        "bake": bake, "rollback_scope": rollback_scope, "allow_unavailable": allow_unavailable,
        "prepare_timeout": prepare_timeout, "commit_timeout": commit_timeout,
    }  # fmt: skip
    try:
        services, strategy = _request(specs, file, flags)
    except UserError as e:
        fail(EXIT_BAD_INPUT, "user", e.reason, e.field, as_json=as_json)

    async def go(broker: Broker) -> int:
        body = DeployRequest(services=services, strategy=strategy, queue=not no_queue)
        return await _follow(broker, "deploy", body, wait, as_json)

    call(go, as_json=as_json)


async def _follow(
    broker: Broker, key: str, body: DeployRequest | RollbackRequest, wait: bool, as_json: bool
) -> int:
    """Send a deploy or rollback request and print the accepted deployment; with `wait`,
    follow its events to the end with a line per phase change (follow.py)."""
    if not wait:
        emit(await ask(broker, key, body), as_json, render.deployment)
        return EXIT_OK
    subscription = await follow.Subscription.open(broker)  # before the request: none missed
    doc = await ask(broker, key, body)
    doc = await follow.to_the_end(broker, subscription, doc, _progress_printer(as_json))
    emit(doc, as_json, render.deployment)
    return EXIT_OK if doc["state"] == "completed" else EXIT_NOT_REACHED


def _progress_printer(as_json: bool) -> Callable[[dict[str, Any]], None]:
    """Prints `render.progress` of each state it is shown, when the line changed (with
    `--json`, nothing: stdout holds the one document)."""
    last = [""]

    def show(doc: dict[str, Any]) -> None:
        line = render.progress(doc)
        if line != last[0] and not as_json:
            typer.echo(line)
            last[0] = line

    return show


def rollback(
    to: Annotated[int | None, typer.Option("--to", help="Release id to return to.")] = None,
    service: Annotated[
        list[str] | None,
        typer.Option("--service", help="Only these services (and what must move with them)."),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Allow --to a release marked bad.")
    ] = False,
    wait: Wait = False,
    as_json: Json = False,
) -> None:
    """Deploy the last good (or named) release, or roll back only some services."""
    body = RollbackRequest(to=to, services=service or [], force=force)

    async def go(broker: Broker) -> int:
        return await _follow(broker, "rollback", body, wait, as_json)

    call(go, as_json=as_json)
