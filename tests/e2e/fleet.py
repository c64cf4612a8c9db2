"""A real fleet for end-to-end tests: a `lockstep coordinator` and `lockstep agent`
processes in the test's own vhost, driven through the real CLI.

Facts are read from where they live: each service process is asked its `/version`
over HTTP, each host's `current` symlink is read from disk, switch timestamps come
from the agent's own SQLite store, and the coordinator's view from `status --json`.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.artifacts import build_artifact, free_port, service_toml
from tests.support.procs import Procs, kill_group, wait_until

LOCKSTEP = str(Path(sys.executable).parent / "lockstep")
SERVICES = ("orders", "payments", "mail")


@dataclass
class Result:
    code: int
    doc: Any
    stdout: str
    stderr: str


@dataclass
class Host:
    host_id: str
    labels: dict[str, str]
    state_dir: Path
    proc: subprocess.Popen[bytes] | None = None
    ports: dict[str, int] = field(default_factory=dict)


class Fleet:
    def __init__(
        self, root: Path, env: dict[str, str], procs: Procs, *, auto_approve: bool = True
    ) -> None:
        self.root = root
        self.env = env
        self.procs = procs
        self.auto_approve = auto_approve
        self.coordinator_args: tuple[str, ...] = ()
        """Extra `lockstep coordinator` flags (e.g. `--operators alice`)."""
        self.key_dir = Path(env["LOCKSTEP_COORDINATOR_KEY"]).parent
        self.hosts: dict[str, Host] = {}
        self._ports: set[int] = set()
        self.coordinator: subprocess.Popen[bytes] | None = None
        """The coordinator started last."""
        self.db = str(root / "coordinator.db")
        """The coordinators' `--db`: a SQLite file, or a PostgreSQL URL they share."""
        self.artifacts = root / "artifacts"
        self.specs = root / "specs"

    # --- processes ----------------------------------------------------------------

    def start_coordinator(
        self, fault: str | None = None, *, log: str = "coordinator.log", wait: bool = True,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:  # fmt: skip
        """Start a coordinator (`self.coordinator`) on `self.db`; with `fault`, it kills
        itself at that protocol point; `env` adds to the fleet's environment. With
        `wait`, returns once a coordinator answers (this one, or an active one when this
        is a standby)."""
        env = {**self.env, **(env or {}), **({"LOCKSTEP_FAULT_POINT": fault} if fault else {})}
        args = [LOCKSTEP, "coordinator", "--db", self.db, "--key-dir", str(self.key_dir)]
        if self.auto_approve:
            args.append("--auto-approve")
        args += self.coordinator_args
        self.coordinator = self.procs.start(args, env=env, log=self.root / log)
        if wait:  # any answer will do (a user outside --operators is answered with exit 2)
            wait_until(lambda: self.cli("status", "--json").code != 3, 20,
                       "the coordinator to answer")  # fmt: skip
        return self.coordinator

    def start_standby(self, log: str) -> subprocess.Popen[bytes]:
        """One more coordinator on the same `self.db`, left as `self.coordinator` is
        (it waits for the lease while another holds it)."""
        active = self.coordinator
        proc = self.start_coordinator(log=log, wait=False)
        self.coordinator = active or proc
        return proc

    def add_three_hosts(self) -> None:
        """payments on host-a and host-c, orders on host-b and host-c (host-c runs both)."""
        self.add_host("host-a", pay="yes")
        self.add_host("host-b", web="yes")
        self.add_host("host-c", pay="yes", web="yes")
        self.wait_alive("host-a", "host-b", "host-c")

    def kill_coordinator(self) -> None:
        assert self.coordinator is not None
        kill_group(self.coordinator.pid, signal.SIGKILL)
        self.coordinator.wait(10)

    def _port(self) -> int:
        """A free port no other service of this fleet was given (free_port alone may repeat)."""
        port = free_port()
        while port in self._ports:
            port = free_port()
        self._ports.add(port)
        return port

    def add_host(self, host_id: str, **labels: str) -> Host:
        ports = {s: self._port() for s in SERVICES}
        all_labels = {**labels, **{f"{s}_port": str(p) for s, p in ports.items()}}
        host = Host(host_id, all_labels, self.root / host_id, ports=ports)
        self.hosts[host_id] = host
        self.start_agent(host_id)
        return host

    def start_agent(self, host_id: str, fault: str | None = None) -> None:
        """Start an agent; with `fault`, it kills itself at that protocol point."""
        env = dict(self.env, LOCKSTEP_FAULT_POINT=fault) if fault else self.env
        host = self.hosts[host_id]
        args = [LOCKSTEP, "agent", "--host-id", host_id, "--state-dir", str(host.state_dir)]
        for key, value in host.labels.items():
            args += ["--label", f"{key}={value}"]
        host.proc = self.procs.start(args, env=env, log=self.root / f"{host_id}.log")

    def kill_agent(self, host_id: str) -> None:
        proc = self.hosts[host_id].proc
        assert proc is not None
        os.kill(proc.pid, signal.SIGKILL)  # the agent alone, not its services
        proc.wait(10)

    def signal_agent(self, host_id: str, sig: int) -> None:
        """SIGSTOP/SIGCONT the agent process alone (its services keep running)."""
        proc = self.hosts[host_id].proc
        assert proc is not None
        os.kill(proc.pid, sig)

    def cli_background(self, *args: str) -> subprocess.Popen[str]:
        """Start a CLI command and return at once; `finish` collects it."""
        return subprocess.Popen(
            [LOCKSTEP, *args], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip

    @staticmethod
    def finish(proc: subprocess.Popen[str], timeout: float = 120) -> Result:
        out, err = proc.communicate(timeout=timeout)
        return Result(proc.returncode, json.loads(out) if out.strip() else None, out, err)

    def deployment(self, deployment_id: str) -> dict[str, Any]:
        for row in self.history()["deployments"]:
            if row["deployment_id"] == deployment_id:
                return dict(row)
        raise AssertionError(f"no deployment {deployment_id}")

    def wait_alive(self, *host_ids: str, timeout: float = 20) -> None:
        def alive() -> bool:
            result = self.cli("agents", "--json")
            if result.code != 0:
                return False
            states = {a["host_id"]: a["state"] for a in result.doc["agents"]}
            return all(states.get(h) == "alive" for h in host_ids)

        wait_until(alive, timeout, f"agents {host_ids} alive")

    # --- the CLI ------------------------------------------------------------------

    def cli(self, *args: str, timeout: float = 120) -> Result:
        done = subprocess.run(
            [LOCKSTEP, *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        doc = None
        if "--json" in args and done.stdout.strip():
            doc = json.loads(done.stdout)
        return Result(done.returncode, doc, done.stdout, done.stderr)

    def register(
        self,
        name: str,
        version: str,
        *,
        requires: dict[str, str] | None = None,
        hosts: dict[str, str] | None = None,
        fail_health: bool = False,
        fail_health_after: float | None = None,
        sha256: str | None = None,
        env: dict[str, str] | None = None,
        artifact_url: str | None = None,
    ) -> Path:
        path, digest = build_artifact(
            self.artifacts, name, version, fail_health=fail_health,
            fail_health_after=fail_health_after,
        )  # fmt: skip
        deadline = "3s" if fail_health else "10s"
        text = service_toml(
            name, version, path, sha256 or digest, requires=requires, hosts=hosts,
            start_deadline=deadline, env=env, artifact_url=artifact_url,
        )  # fmt: skip
        self.specs.mkdir(exist_ok=True)
        spec = self.specs / f"{name}-{version}.toml"
        spec.write_text(text)
        result = self.cli("register", str(spec), "--json")
        assert result.code == 0, result.stderr
        return spec

    def deploy_mid_commit(self, *pairs: str) -> str:
        """Deploy `pairs` one host at a time and return once a first host switched (the
        decision on record, the commits under way); the deployment's id."""
        sent = self.cli("deploy", *pairs, "--max-parallel", "1", "--json")
        assert sent.code == 0, sent.stdout + sent.stderr
        wanted = dict(p.split("=", 1) for p in pairs)
        wait_until(lambda: any(wanted.get(s) == v for (_, s), v in self.running().items()), 60,
                   "a first host to switch (mid-commit)")  # fmt: skip
        return str(sent.doc["deployment_id"])

    def deploy(self, *pairs: str, flags: tuple[str, ...] = ()) -> Result:
        return self.cli("deploy", *pairs, "--wait", "--json", *flags)

    # --- facts on the hosts ---------------------------------------------------------

    def http_version(self, host_id: str, service: str) -> str | None:
        port = self.hosts[host_id].ports[service]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/version", timeout=2) as r:
                return str(r.read().decode().strip())
        except OSError:
            return None

    def current(self, host_id: str, service: str) -> str | None:
        link = self.hosts[host_id].state_dir / "services" / service / "current"
        return Path(os.readlink(link)).name if link.is_symlink() else None

    def staging(self, host_id: str, service: str) -> list[Path]:
        staging = self.hosts[host_id].state_dir / "services" / service / "staging"
        return list(staging.iterdir()) if staging.exists() else []

    def _agent_db(self, host_id: str) -> sqlite3.Connection:
        dbs = sorted(self.hosts[host_id].state_dir.glob("*.db"))
        assert dbs, f"no agent store in {self.hosts[host_id].state_dir}"
        return sqlite3.connect(f"file:{dbs[0]}?mode=ro", uri=True)

    def switches(self, host_id: str) -> list[dict[str, Any]]:
        with self._agent_db(host_id) as db:
            db.row_factory = sqlite3.Row
            rows = db.execute("SELECT * FROM switches ORDER BY id").fetchall()
        return [dict(r) for r in rows]

    def pid(self, host_id: str, service: str) -> int | None:
        with self._agent_db(host_id) as db:
            row = db.execute("SELECT pid FROM services WHERE service = ?", (service,)).fetchone()
        return int(row[0]) if row and row[0] else None

    def history(self) -> dict[str, Any]:
        result = self.cli("history", "--json")
        assert result.code == 0, result.stderr
        return dict(result.doc)

    def status(self) -> dict[str, Any]:
        result = self.cli("status", "--json")
        assert result.code == 0, result.stderr
        return dict(result.doc)

    def reported(self) -> dict[tuple[str, str], str | None]:
        """(host, service) -> version, as the coordinator's status says."""
        return {
            (h["host_id"], s["service"]): s["version"]
            for h in self.status()["hosts"]
            for s in h["services"]
        }

    def running(self) -> dict[tuple[str, str], str | None]:
        """(host, service) -> version, as every service process answers /version."""
        found = {}
        for host_id in self.hosts:
            for service in SERVICES:
                version = self.http_version(host_id, service)
                if version is not None:
                    found[(host_id, service)] = version
        return found
