"""`lockstep`: the console script (SPEC 4).

`lockstep coordinator` and `lockstep agent` run the two processes; every other command
is a client that sends a request to the coordinator over `lockstep.requests` and
prints the reply (`--json`: one JSON document on stdout). This is the one module that
names both sides, because one console script starts either process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.cli import follow, render
from coordinator.cli.broker import broker_app
from coordinator.cli.client import (
    EXIT_BAD_INPUT,
    EXIT_NOT_REACHED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    ask,
    call,
    emit,
    fail,
)
from shared import log, signing
from shared.config import BrokerSettings, CoordinatorSettings, SecuritySettings
from shared.errors import BrokerUnavailable, UserError
from shared.messages import (
    ControlRequest,
    DeployRequest,
    QueryRequest,
    RegisterRequest,
    RollbackRequest,
)
from shared.specs import Strategy, load_release_file, load_service_version, validate
from shared.transport import Broker

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Deploy and roll back dependent services across a fleet, all or nothing.",
)

Json = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
Wait = Annotated[bool, typer.Option("--wait", help="Follow the deployment to its end.")]


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
    db: Annotated[Path, typer.Option(help="SQLite file.")] = Path("lockstep-coordinator.db"),
    key_dir: Annotated[
        Path, typer.Option(help="Where coordinator.key is (made by `lockstep keys init`).")
    ] = Path("."),
    metrics_port: Annotated[int | None, typer.Option(help="Prometheus metrics port.")] = None,
    auto_approve: Annotated[
        bool,
        typer.Option(help="Approve every new agent key at once (labs and demos only: any "
                     "host id that reports is then trusted)."),
    ] = False,
    operators: Annotated[
        list[str] | None,
        typer.Option(help="Broker user allowed to send requests (repeatable; default: any)."),
    ] = None,
) -> None:
    """Run the coordinator."""
    from coordinator.enrollment import Policy
    from coordinator.service import serve

    log.setup()
    try:
        key = _coordinator_key(key_dir)
        policy = Policy(SecuritySettings(), auto_approve, frozenset(operators or ()))
        _run_forever(serve(db, BrokerSettings(), CoordinatorSettings(), key, policy, metrics_port))
    except UserError as e:
        fail(EXIT_BAD_INPUT, "user", e.reason, e.field)
    except BrokerUnavailable as e:
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
        labels = dict(_pair(item, "--label") for item in label or [])
        run(host_id, labels, state_dir, driver, metrics_port, coordinator_key)
    except UserError as e:
        fail(EXIT_BAD_INPUT, "user", e.reason, e.field)
    except BrokerUnavailable as e:
        fail(EXIT_UNREACHABLE, "unreachable", str(e))


def _pair(text: str, where: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise UserError(where, f"{text!r} is not of the form KEY=VALUE")
    return key.strip(), value.strip()


@app.command()
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
        name, version = _pair(spec, "SVC=VERSION")
        services[name] = version
    if not services:
        raise UserError("SVC=VERSION", "name at least one service, or --file")
    strategy.update({k: v for k, v in flags.items() if v is not None})
    result: Strategy = validate(Strategy, strategy, "strategy.")
    validate(DeployRequest, {"services": services}, "")
    return services, result


@app.command()
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


@app.command()
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


@app.command()
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


# --- operator control of a running deployment ------------------------------------------

Target = Annotated[str | None, typer.Argument(help="Deployment id (default: the one in flight).")]


def _control(action: str, deployment_id: str | None, as_json: bool) -> NoReturn:
    body = ControlRequest.model_validate({"action": action, "deployment_id": deployment_id})

    async def go(broker: Broker) -> int:
        emit(await ask(broker, action, body), as_json, render.deployment)
        return EXIT_OK

    call(go, as_json=as_json)


@app.command()
def pause(deployment_id: Target = None, as_json: Json = False) -> None:
    """Let the batches in flight finish, then start no further batch."""
    _control("pause", deployment_id, as_json)


@app.command()
def resume(deployment_id: Target = None, as_json: Json = False) -> None:
    """Continue a paused deployment."""
    _control("resume", deployment_id, as_json)


@app.command()
def abort(deployment_id: Target = None, as_json: Json = False) -> None:
    """Return every participant to the release the deployment started from."""
    _control("abort", deployment_id, as_json)


# --- read-only views ------------------------------------------------------------------


def _query(what: str, as_json: Json, renderer: Any) -> NoReturn:
    async def go(broker: Broker) -> int:
        emit(
            await ask(broker, "query", QueryRequest.model_validate({"what": what})),
            as_json,
            renderer,
        )
        return EXIT_OK

    call(go, as_json=as_json)


@app.command()
def status(as_json: Json = False) -> None:
    """Current and desired release; per host, per service: version, health, last seen."""
    _query("status", as_json, render.status)


@app.command()
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


@app.command()
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


@app.command()
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
