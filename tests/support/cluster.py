"""A three-node RabbitMQ cluster for the HA tier, through `deploy/rabbitmq-cluster.sh`.

The fixture runs the same script a user would (`start`, `kill`, `revive`, `stop`), in a
dir of its own with ports free on this machine, beside the shared broker; every node is
stopped and its dir removed afterwards. Each test gets a vhost of its own on it.
"""

from __future__ import annotations

import contextlib
import random
import re
import socket
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "rabbitmq-cluster.sh"


def _script(*args: str, timeout: float = 180) -> str:
    done = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, check=False)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmq-cluster.sh {' '.join(args)}: {done.stderr[-2000:]}")
    return done.stdout


@dataclass(frozen=True)
class Cluster:
    root: Path
    base: int

    def port(self, node: int) -> int:
        return self.base + node

    def urls(self, vhost: str = "") -> str:
        """LOCKSTEP_AMQP_URL for every node (a vhost's, if given)."""
        return ",".join(f"amqp://guest:guest@127.0.0.1:{self.port(n)}/{vhost}" for n in (1, 2, 3))

    def ctl(self, node: int, *args: str) -> str:
        """rabbitmqctl on `node` (the script's environment for it)."""
        command = (f'source <(sed -n "/^node_env()/,/^}}/p;/^ctl()/,/^}}/p" {SCRIPT}); '
                   f'sbin=$(dirname "$(readlink -f "$(command -v rabbitmq-server)")"); '
                   f'ctl {self.root} {node} "$@"')  # fmt: skip
        done = subprocess.run(["bash", "-c", command, "ctl", *args], capture_output=True,
                              text=True, timeout=60, check=True)  # fmt: skip
        return done.stdout

    def kill(self, node: int) -> None:
        _script("kill", str(self.root), str(node))

    def revive(self, node: int) -> None:
        _script("revive", str(self.root), str(node))

    def leader(self, vhost: str, queue: str, ask: int = 1) -> int:
        """The node (1-3) holding the leader of quorum queue `queue`, asked of `ask`."""
        out = self.ctl(ask, "list_queues", "-p", vhost, "name", "leader", "--no-table-headers")
        for line in out.splitlines():
            name, _, leader = line.partition("\t")
            if name == queue:
                found = re.match(r"lockstep-(\d)-", leader.strip())
                if found:
                    return int(found.group(1))
        raise AssertionError(f"no leader of {queue} in {out!r}")

    @contextlib.contextmanager
    def vhost(self, label: str) -> Iterator[str]:
        name = f"t-{label[:40]}-{uuid.uuid4().hex[:6]}"
        self.ctl(1, "add_vhost", name)
        try:
            self.ctl(1, "set_permissions", "-p", name, "guest", ".*", ".*", ".*")
            yield name
        finally:
            for node in (1, 2, 3):  # any node that is up
                with contextlib.suppress(subprocess.CalledProcessError):
                    self.ctl(node, "delete_vhost", name)
                    break


def _free_base() -> int:
    """A base port whose next three ports, and their distribution ports, are free."""
    for _ in range(50):
        base = random.randrange(20000, 40000)
        ports = [base + n for n in (1, 2, 3)] + [base + n + 20000 for n in (1, 2, 3)]
        if all(_free(p) for p in ports):
            return base
    raise RuntimeError("no free ports for a cluster")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@contextlib.contextmanager
def cluster(root: Path) -> Iterator[Cluster]:
    """Three nodes under `root` (removed afterwards), started and joined."""
    base = _free_base()
    try:
        _script("start", str(root), str(base))
        yield Cluster(root.resolve(), base)
    finally:
        _script("stop", str(root))
