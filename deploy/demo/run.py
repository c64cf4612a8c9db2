"""The demo (README: `bash deploy/demo.sh`): lockstep on this machine, told step by step.

It drives real processes through the `lockstep` command line only: a coordinator and
three agents on a RabbitMQ vhost of its own, and two dependent services (`orders`
requires `payments`) started by the agents. It deploys a first release, a good upgrade
(payments switches before orders) and a bad one (orders 2.1.0 fails its health check
and is rolled back), and after each step checks what every host really runs by asking
each service process for its /version, next to what `lockstep status` says.

Everything it makes lives under ./.demo/ (wiped at start, left for inspection; logs in
.demo/logs/). Every process it started is stopped and its vhost deleted at the end.
Exit status 0 when the story went as expected, 1 otherwise.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / ".demo"
SERVICE_SOURCE = Path(__file__).resolve().parent / "service.py"
LOCKSTEP = str(Path(sys.executable).parent / "lockstep")
BROKER = "amqp://guest:guest@127.0.0.1:5672/"
SERVICES = ("payments", "orders")
HOSTS = {
    "host-a": {"pay": "yes"},
    "host-b": {"web": "yes"},
    "host-c": {"pay": "yes", "web": "yes"},
}
SELECTORS = {"payments": {"pay": "yes"}, "orders": {"web": "yes"}}
VERSIONS = {
    ("payments", "1.0.0"): {},
    ("payments", "2.0.0"): {},
    ("orders", "1.0.0"): {"payments": ">=1.0.0, <3.0.0"},
    ("orders", "2.0.0"): {"payments": ">=2.0.0"},
    ("orders", "2.1.0"): {"payments": ">=2.0.0"},
}
BAD = ("orders", "2.1.0")
"""The release whose /health always fails: FAIL_HEALTH=1 baked into its service.env."""


# --- output -----------------------------------------------------------------------------


def say(text: str = "") -> None:
    print(text, flush=True)


def title(text: str) -> None:
    say()
    say(f"=== {text} " + "=" * max(0, 76 - len(text)))


def indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())


# --- processes --------------------------------------------------------------------------


@dataclass
class Demo:
    vhost: str
    env: dict[str, str]
    ports: dict[tuple[str, str], int]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    verdicts: list[tuple[str, bool]] = field(default_factory=list)

    def start(self, name: str, *args: str) -> None:
        log = (DEMO / "logs" / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            [LOCKSTEP, *args],
            cwd=DEMO,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.procs.append(proc)

    def cli(self, *args: str, timeout: float = 60) -> tuple[int, str]:
        """Run `lockstep ARGS`; its exit code and stdout (stderr goes to the log)."""
        with (DEMO / "logs" / "cli.log").open("a") as log:
            log.write(f"$ lockstep {' '.join(args)}\n")
            log.flush()
            done = subprocess.run(
                [LOCKSTEP, *args],
                cwd=DEMO,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                timeout=timeout,
                check=False,
            )
            log.write(done.stdout)
        return done.returncode, done.stdout

    def json(self, *args: str, timeout: float = 60) -> tuple[int, dict[str, Any]]:
        code, out = self.cli(*args, "--json", timeout=timeout)
        try:
            return code, json.loads(out)
        except json.JSONDecodeError:
            return code, {"error": {"reason": f"no JSON on stdout (exit {code}): {out[:200]!r}"}}

    def check(self, what: str, ok: bool) -> bool:
        self.verdicts.append((what, ok))
        say(f"  [{'ok' if ok else 'UNEXPECTED'}] {what}")
        return ok


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


def pids_under(root: Path) -> list[int]:
    """Live processes whose working directory is inside `root` (the services too)."""
    found = []
    prefix = str(root.resolve())
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                cwd = os.readlink(entry / "cwd")
                if cwd == prefix or cwd.startswith(prefix + "/"):
                    found.append(int(entry.name))
    return found


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(os.getpgid(pid), sig)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def stop_everything(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM what we started and every process under .demo/, SIGKILL what is left."""
    pids = [p.pid for p in procs if p.poll() is None] + pids_under(DEMO)
    signal_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        for proc in procs:
            proc.poll()
        if not [p for p in procs if p.returncode is None] and not pids_under(DEMO):
            return
        time.sleep(0.1)
    signal_all([p.pid for p in procs if p.returncode is None] + pids_under(DEMO), signal.SIGKILL)
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def wait_for(predicate: Any, timeout: float, interval: float = 0.3) -> Any:
    """Poll `predicate` until it returns something truthy or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


# --- artifacts and catalog --------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def build_artifact(name: str, version: str) -> tuple[Path, str]:
    """<name>-<version>.tar.gz: server.py, VERSION and service.env; and its sha256."""
    settings = "FAIL_HEALTH=1\n" if (name, version) == BAD else ""
    files = {
        "server.py": SERVICE_SOURCE.read_bytes(),
        "VERSION": f"{version}\n".encode(),
        "service.env": settings.encode(),
    }
    path = DEMO / "artifacts" / f"{name}-{version}.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for member, data in files.items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def toml_table(table: dict[str, str]) -> str:
    # a JSON string is a valid TOML basic string
    return "{" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in table.items()) + "}"


def service_toml(name: str, version: str, requires: dict[str, str]) -> Path:
    artifact, digest = build_artifact(name, version)
    port = f"${{meta.{name}_port}}"
    text = f"""\
name = "{name}"
version = "{version}"
artifact = {json.dumps(artifact.as_uri())}
sha256 = "{digest}"
requires = {toml_table(requires)}
hosts = {toml_table(SELECTORS[name])}
run = {json.dumps(f"{sys.executable} server.py")}
env = {{ PORT = "{port}" }}

[health]
http = "http://127.0.0.1:{port}/health"
interval = "0.2s"
timeout = "1s"
healthy_after = 2
start_deadline = "8s"
"""
    path = DEMO / "catalog" / f"{name}-{version}.toml"
    path.write_text(text)
    return path


# --- what runs where --------------------------------------------------------------------


def ask_version(port: int) -> str:
    """What the service process on `port` says its version is."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/version", timeout=1) as reply:
            return str(reply.read().decode().strip())
    except (urllib.error.URLError, OSError):
        return "not running"


def runs_on(host: str) -> tuple[str, ...]:
    return tuple(
        s for s in SERVICES if all(HOSTS[host].get(k) == v for k, v in SELECTORS[s].items())
    )


def observe(demo: Demo) -> dict[tuple[str, str], tuple[str, str, str]]:
    """(host, service) -> (lockstep's version, lockstep's health, the process's /version)."""
    _, status = demo.json("status")
    reported = {
        (h["host_id"], s["service"]): (s["version"] or "-", s["health"])
        for h in status.get("hosts", [])
        for s in h["services"]
    }
    return {
        (host, svc): (*reported.get((host, svc), ("-", "-")), ask_version(demo.ports[host, svc]))
        for host in HOSTS
        for svc in runs_on(host)
    }


def matches(seen: dict[tuple[str, str], tuple[str, str, str]], want: dict[str, str]) -> bool:
    return all(
        said == want[svc] and actual == want[svc] and health == "healthy"
        for (_, svc), (said, health, actual) in seen.items()
    )


def show_fleet(demo: Demo, want: dict[str, str]) -> bool:
    """Host by host: what lockstep says and what each service process answers."""

    def settled() -> dict[tuple[str, str], tuple[str, str, str]] | None:
        seen = observe(demo)
        return seen if matches(seen, want) else None

    seen = wait_for(settled, 10) or observe(demo)
    say("  host     service    lockstep status says     the process itself says")
    for (host, svc), (said, health, actual) in seen.items():
        mark = "" if said == actual == want[svc] else f"   <-- expected {want[svc]}"
        say(f"  {host:<8} {svc:<10} {said:<8} {health:<15} /version = {actual}{mark}")
    return demo.check(
        "every host runs " + ", ".join(f"{s} {want[s]}" for s in SERVICES) + ", verified over HTTP",
        matches(seen, want),
    )


def show_outcome(code: int, doc: dict[str, Any]) -> None:
    if "error" in doc:
        say(f"  outcome: error (exit {code}): {doc['error'].get('reason')}")
        return
    reason = f" ({doc['reason']})" if doc.get("reason") else ""
    say(f"  outcome: deployment {doc['deployment_id']} {doc['state']}{reason}, exit code {code}")
    say(f"  release {doc['from_release_id']} -> {doc['release_id']}")
    for p in doc["participants"]:
        why = f"  {p['reason']}" if p.get("reason") else ""
        say(f"    {p['host']:<8} {p['service']:<10} {p.get('from_version') or '-'} -> "
            f"{p['version']:<7} {p['state']}{why}")  # fmt: skip


# --- the story --------------------------------------------------------------------------


def deploy(
    demo: Demo, asked: str, why: str, pairs: list[str], expect: str, fleet: dict[str, str]
) -> bool:
    """One deployment, told: what was asked, the outcome, then the fleet host by host."""
    title(asked)
    say(indent(why, "  "))
    say(f"  $ lockstep deploy {' '.join(pairs)} --wait --json")
    code, doc = demo.json("deploy", *pairs, "--wait", timeout=90)
    show_outcome(code, doc)
    state = doc.get("state")
    wanted_code = 0 if expect == "completed" else 1
    if not demo.check(
        f"state is {expect} (got {state}), exit code {wanted_code} (got {code})",
        state == expect and code == wanted_code,
    ):
        return False
    return show_fleet(demo, fleet)


def start_fleet(demo: Demo) -> bool:
    title("Making the coordinator's signing key, starting a coordinator and three agents")
    code, out = demo.cli("keys", "init", "--dir", str(DEMO / "keys"))
    say(f"  $ lockstep keys init --dir {DEMO / 'keys'}")
    say(indent(out.strip(), "  "))
    if not demo.check("the coordinator's key pair was written", code == 0):
        return False
    say("  Every command is signed with it; agents trust only this key (--coordinator-key).")
    say("  The demo starts the coordinator with --auto-approve: every new agent key is trusted")
    say("  at once. In production leave it off and run `lockstep agents approve HOST`.")
    demo.start("coordinator", "coordinator", "--db", str(DEMO / "coordinator.db"),
               "--key-dir", str(DEMO / "keys"), "--auto-approve")  # fmt: skip
    # Agents start once the coordinator answers, as an operator would start them.
    if not demo.check(
        "the coordinator answers (lockstep agents)",
        wait_for(lambda: demo.json("agents", timeout=20)[0] == 0, 30),
    ):
        return False
    for host, labels in HOSTS.items():
        args = ["agent", "--host-id", host, "--state-dir", str(DEMO / host),
                "--coordinator-key", str(DEMO / "keys" / "coordinator.pub")]  # fmt: skip
        ports = {f"{svc}_port": str(demo.ports[host, svc]) for svc in SERVICES}
        for key, value in {**labels, **ports}.items():
            args += ["--label", f"{key}={value}"]
        demo.start(host, *args)
        say(f"  {host}: labels " + ", ".join(f"{k}={v}" for k, v in labels.items())
            + f" -> will run {', '.join(runs_on(host))}")  # fmt: skip

    def all_alive() -> bool:
        _, doc = demo.json("agents", timeout=20)
        alive = {a["host_id"] for a in doc.get("agents", [])
                 if a["state"] == "alive" and a["key_state"] == "approved"}  # fmt: skip
        return alive >= set(HOSTS)

    return demo.check(
        "all three agents report alive, keys approved (lockstep agents)", wait_for(all_alive, 30)
    )


def story(demo: Demo) -> bool:
    """The four steps; False as soon as one went wrong (the rest would make no sense)."""
    if not start_fleet(demo):
        return False
    title("Registering 5 service versions")
    files = [str(service_toml(n, v, req)) for (n, v), req in VERSIONS.items()]
    code, out = demo.cli("register", *files)
    say(indent(out.strip(), "  "))
    say("  orders 1.0.0 requires payments >=1.0.0, <3.0.0; orders 2.x requires payments >=2.0.0;")
    say("  orders 2.1.0 is broken: its /health always answers 500.")
    if not demo.check("all versions registered", code == 0):
        return False

    v1 = {"orders": "1.0.0", "payments": "1.0.0"}
    if not deploy(
        demo,
        "1. First release: orders 1.0.0 + payments 1.0.0",
        "Every agent prepares (downloads, checks the sha256, unpacks) and votes; only when\n"
        "all voted yes does the coordinator record COMMIT and have the services started.",
        ["orders=1.0.0", "payments=1.0.0"],
        "completed",
        v1,
    ):
        return False

    title("2. Plan the upgrade to v2 (dry run)")
    say("  $ lockstep plan orders=2.0.0 payments=2.0.0")
    code, out = demo.cli("plan", "orders=2.0.0", "payments=2.0.0")
    say(indent(out.strip()))
    _, plan = demo.json("plan", "orders=2.0.0", "payments=2.0.0")
    order = [w["services"] for w in plan.get("plan", {}).get("waves", [])]
    demo.check(
        f"payments switches before orders (waves {order})", order == [["payments"], ["orders"]]
    )

    v2 = {"orders": "2.0.0", "payments": "2.0.0"}
    if not deploy(
        demo,
        "3. Good upgrade: orders 2.0.0 + payments 2.0.0",
        "orders 2.0.0 needs payments >=2.0.0, so payments switches on every host first, then\n"
        "orders: no orders ever runs against a payments version it cannot use.",
        ["orders=2.0.0", "payments=2.0.0"],
        "completed",
        v2,
    ):
        return False
    return deploy(
        demo,
        "4. Bad upgrade: orders 2.1.0 (fails its health check)",
        "orders 2.1.0 prepares fine (nothing is wrong with its artifact), but once switched its\n"
        "/health answers 500. The commit fails, so lockstep compensates: every host that\n"
        "switched goes back to orders 2.0.0 from its kept release dir. Expected: rolled_back.",
        ["orders=2.1.0"],
        "rolled_back",
        v2,
    )


def prepare() -> Demo:
    """A clean .demo/ (stopping leftovers of an earlier run) and a fresh vhost."""
    stop_everything([])
    old = DEMO / "vhost"
    if old.is_file():
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            rabbitmqctl("delete_vhost", old.read_text().strip())
    shutil.rmtree(DEMO, ignore_errors=True)
    for sub in ("logs", "artifacts", "catalog"):
        (DEMO / sub).mkdir(parents=True)
    vhost = f"lockstep-demo-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", vhost)
    old.write_text(vhost + "\n")
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    env = dict(os.environ)
    env.update(
        LOCKSTEP_AMQP_URL=BROKER + vhost,
        LOCKSTEP_HEARTBEAT_INTERVAL="0.5",
        LOCKSTEP_LOG_LEVEL="info",
        # One broker user (guest) for everyone, so the coordinator cannot tell agents
        # apart by user; a real fleet gives each agent its own (`lockstep broker add-agent`).
        LOCKSTEP_AGENT_USERS="shared",
        PYTHONUNBUFFERED="1",
    )
    ports: dict[tuple[str, str], int] = {}
    for place in ((h, s) for h in HOSTS for s in SERVICES):
        port = free_port()
        while port in ports.values():  # a port just closed may be handed out again
            port = free_port()
        ports[place] = port
    return Demo(vhost=vhost, env=env, ports=ports)


def finish(demo: Demo, told: bool, started: float) -> int:
    title("History (lockstep history)")
    _, out = demo.cli("history")
    say(indent(out.strip(), "  "))
    failed = [what for what, ok in demo.verdicts if not ok]
    title("Verdict")
    elapsed = time.monotonic() - started
    if failed or not told:
        say(f"  FAILED after {elapsed:.0f}s: " + "; ".join(failed or ["the story stopped early"]))
        say(f"  logs: {DEMO / 'logs'}")
        return 1
    say(f"  OK in {elapsed:.0f}s: v1 deployed, v2 deployed payments first, the bad orders 2.1.0")
    say("  was rolled back and every host runs orders 2.0.0 + payments 2.0.0 again.")
    return 0


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(130)


def main() -> int:
    signal.signal(signal.SIGTERM, _terminate)
    started = time.monotonic()
    say(f"lockstep demo: working in {DEMO} (logs in {DEMO / 'logs'})")
    demo = prepare()
    say(f"RabbitMQ vhost {demo.vhost} on 127.0.0.1:5672")
    code = 1
    try:
        code = finish(demo, story(demo), started)
    except subprocess.TimeoutExpired as e:
        say(f"\nFAILED: `{' '.join(map(str, e.cmd))}` did not answer within {e.timeout}s")
    finally:
        stop_everything(demo.procs)
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            rabbitmqctl("delete_vhost", demo.vhost)
            (DEMO / "vhost").unlink()
        say("stopped every process the demo started and deleted its vhost")
    return code


if __name__ == "__main__":
    sys.exit(main())
