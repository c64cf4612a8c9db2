"""A throwaway RabbitMQ node of a test's own, and the test PKI its TLS listener uses.

`CertAuthority` makes a CA and issues server and client certificates with
`cryptography`. `rabbit_node` starts a second RabbitMQ node on this machine beside the
shared one, with nothing in common with it but the binaries and epmd: its own node
name, Erlang cookie (in a HOME of its own), distribution port, data and log dirs,
rabbitmq.conf and an empty plugin list. It always stops the node and removes its dirs,
whatever the test did. The caller gives the config lines: `tls_listener` makes a
TLS-only node on 127.0.0.1; a cluster test would give plain listeners of its own.

The node runs in the foreground under `subprocess.Popen` in a process group of its
own rather than `rabbitmq-server -detached`: holding the process lets teardown kill
it even when `rabbitmqctl stop` hangs, and lets startup fail fast with the node's
output when it dies while booting.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import ipaddress
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Issued:
    """A PEM certificate and its unencrypted PEM key, as files."""

    cert: Path
    key: Path


class CertAuthority:
    """A self-signed CA whose certificate and issued pairs are written into `directory`."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.name = name
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
        self._cert = (
            _builder(subject, subject, self._key.public_key(), self._key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_usage(sign=False, ca=True), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        directory.mkdir(parents=True, exist_ok=True)
        self.cert = directory / f"{name}-ca.pem"
        self.cert.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, common_name: str, *, server: bool) -> Issued:
        """A leaf certificate: for a server, valid for `localhost` and 127.0.0.1."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        purpose = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            _builder(subject, self._cert.subject, key.public_key(), self._key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_usage(sign=True, ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
        )
        if server:
            names: list[x509.GeneralName] = [
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            ]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        issued = Issued(
            self.directory / f"{self.name}-{common_name}.pem",
            self.directory / f"{self.name}-{common_name}.key",
        )
        issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        issued.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        issued.key.chmod(0o600)
        return issued


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public: ec.EllipticCurvePublicKey,
    issuer_public: ec.EllipticCurvePublicKey,
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public), critical=False
        )
    )


def _usage(*, sign: bool, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


# --- the node ---------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    """A running throwaway node: its name, ports, and how to run rabbitmqctl on it."""

    name: str
    port: int
    """The port of the listener the caller's config lines put on `{port}`."""
    dist_port: int
    env: dict[str, str]
    started_in: float
    """Seconds from launch to `await_startup` returning."""

    def ctl(self, *args: str, timeout: float = 60) -> str:
        done = subprocess.run(
            [str(_sbin() / "rabbitmqctl"), "-q", "-n", self.name, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )
        return done.stdout


def tls_listener(ca: Path, server: Issued) -> list[str]:
    """rabbitmq.conf lines: no plain AMQP, TLS on 127.0.0.1:{port}, client certs
    verified when presented (and refused if not signed by `ca`), not required."""
    return [
        "listeners.tcp = none",
        "listeners.ssl.1 = 127.0.0.1:{port}",
        f"ssl_options.cacertfile = {ca}",
        f"ssl_options.certfile = {server.cert}",
        f"ssl_options.keyfile = {server.key}",
        "ssl_options.verify = verify_peer",
        "ssl_options.fail_if_no_peer_cert = false",
    ]


@contextlib.contextmanager
def rabbit_node(
    root: Path, label: str, config: list[str], *, startup_timeout: float = 60
) -> Iterator[Node]:
    """Start node `lockstep-<label>-<random>@localhost` with every file of it under
    `root` (a dir of its own, removed afterwards); stop it however the test ends.

    `config` holds rabbitmq.conf lines; `{port}` in them becomes a free port.
    """
    root.mkdir(parents=True)
    name = f"lockstep-{label}-{secrets.token_hex(4)}@localhost"
    port, dist_port = _free_port(), _free_port()
    env = _environment(root, name, dist_port, [line.format(port=port) for line in config])
    out = (root / "node.out").open("ab")
    started = time.monotonic()
    proc = subprocess.Popen(
        [str(_sbin() / "rabbitmq-server")],
        env=env,
        cwd=root,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    out.close()
    node = Node(name, port, dist_port, env, started_in=0.0)
    try:
        _await_startup(node, proc, root, started + startup_timeout)
        yield dataclasses.replace(node, started_in=time.monotonic() - started)
    finally:
        _stop(node, proc)
        shutil.rmtree(root, ignore_errors=True)


def _environment(root: Path, name: str, dist_port: int, config: list[str]) -> dict[str, str]:
    """The node's (and its rabbitmqctl's) environment, every path under `root`."""
    home = root / "home"
    home.mkdir(parents=True)
    cookie = home / ".erlang.cookie"
    cookie.write_text(secrets.token_hex(16).upper())
    cookie.chmod(0o400)
    (root / "rabbitmq.conf").write_text("\n".join(config) + "\n")
    (root / "enabled_plugins").write_text("[].\n")
    (root / "rabbitmq-env.conf").write_text("")  # not the machine's /etc/rabbitmq one
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
    env.update(
        HOME=str(home),
        LC_ALL="C.UTF-8",
        RABBITMQ_NODENAME=name,
        RABBITMQ_DIST_PORT=str(dist_port),
        RABBITMQ_CONF_ENV_FILE=str(root / "rabbitmq-env.conf"),
        RABBITMQ_CONFIG_FILE=str(root / "rabbitmq.conf"),
        RABBITMQ_ADVANCED_CONFIG_FILE=str(root / "advanced.config"),
        RABBITMQ_ENABLED_PLUGINS_FILE=str(root / "enabled_plugins"),
        RABBITMQ_MNESIA_BASE=str(root / "mnesia"),
        RABBITMQ_LOG_BASE=str(root / "log"),
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
    )
    return env


def _await_startup(node: Node, proc: subprocess.Popen[bytes], root: Path, deadline: float) -> None:
    """Wait (bounded) for the node to boot; fail with its output if it dies or hangs."""
    while True:
        remaining = deadline - time.monotonic()
        if proc.poll() is not None or remaining <= 0:
            tail = (root / "node.out").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"RabbitMQ node {node.name} did not start:\n{tail}")
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            wait = max(1, int(min(remaining, 10)))
            node.ctl("await_startup", "--timeout", str(wait), timeout=wait + 30)
            return


def _stop(node: Node, proc: subprocess.Popen[bytes]) -> None:
    """`rabbitmqctl stop`; whatever is left of the process group is killed."""
    with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
        node.ctl("stop", timeout=60)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError, PermissionError):  # stragglers, or a hang
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _sbin() -> Path:
    """The dir of the real rabbitmq scripts (Debian's /usr/sbin ones are su wrappers)."""
    found = shutil.which("rabbitmq-server")
    if found is None:
        raise RuntimeError("rabbitmq-server is not on PATH")
    return Path(found).resolve().parent
