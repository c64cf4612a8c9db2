"""Release artifacts of the demo service, as tests and the demo build them.

`build_artifact` packs deploy/demo/service.py (as server.py), a VERSION file and a
`service.env` with any FAIL_* settings into <root>/<name>-<version>.tar.gz and returns
its path and sha256. `service_toml` writes the matching service version file (SPEC
3.1) with fast health settings, so tests and the demo register the same thing.
`pack` and `member` build hostile archives for the unpacking tests, and
`escaping_symlink_chain` the CVE-2025-4517 kind: links whose every hop looks inside.
"""

from __future__ import annotations

import hashlib
import io
import json
import shlex
import socket
import sys
import tarfile
from collections.abc import Iterable
from pathlib import Path

SERVICE_SOURCE = Path(__file__).resolve().parents[2] / "deploy" / "demo" / "service.py"


def build_artifact(
    root: Path,
    name: str,
    version: str,
    *,
    fail_health: bool = False,
    fail_health_after: float | None = None,
) -> tuple[Path, str]:
    """A .tar.gz release of the demo service and its sha256 hex digest."""
    root.mkdir(parents=True, exist_ok=True)
    settings = []
    if fail_health:
        settings.append("FAIL_HEALTH=1")
    if fail_health_after is not None:
        settings.append(f"FAIL_HEALTH_AFTER={fail_health_after}")
    files = {
        "server.py": SERVICE_SOURCE.read_bytes(),
        "VERSION": f"{version}\n".encode(),
        "service.env": "".join(f"{line}\n" for line in settings).encode(),
    }
    path = root / f"{name}-{version}.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for member, data in files.items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def _q(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def service_toml(
    name: str,
    version: str,
    artifact: Path,
    sha256: str,
    *,
    requires: dict[str, str] | None = None,
    hosts: dict[str, str] | None = None,
    interval: str = "0.1s",
    healthy_after: int = 2,
    start_deadline: str = "10s",
    env: dict[str, str] | None = None,
    artifact_url: str | None = None,
) -> str:
    """The TOML text of the ServiceVersion running `artifact` on ${meta.<name>_port}."""
    port = f"${{meta.{name}_port}}"
    run = f"{shlex.quote(sys.executable)} server.py"
    lines = [
        f"name = {_q(name)}",
        f"version = {_q(version)}",
        f"artifact = {_q(artifact_url or artifact.resolve().as_uri())}",
        f"sha256 = {_q(sha256)}",
        f"run = {_q(run)}",
        f"requires = {_inline(requires or {})}",
        f"hosts = {_inline(hosts or {})}",
        f"env = {_inline({'PORT': port, **(env or {})})}",
        "",
        "[health]",
        f"http = {_q(f'http://127.0.0.1:{port}/health')}",
        f"interval = {_q(interval)}",
        'timeout = "1s"',
        f"healthy_after = {healthy_after}",
        f"start_deadline = {_q(start_deadline)}",
    ]
    return "\n".join(lines) + "\n"


def _inline(table: dict[str, str]) -> str:
    return "{" + ", ".join(f"{_q(k)} = {_q(v)}" for k, v in table.items()) + "}"


def free_port() -> int:
    """A TCP port nothing listens on right now (127.0.0.1)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def member(
    name: str, kind: bytes = tarfile.REGTYPE, link: str = "", data: bytes = b""
) -> tuple[tarfile.TarInfo, bytes]:
    """One archive member: a file holding `data`, or a link/dir/device of type `kind`."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def pack(path: Path, members: Iterable[tuple[tarfile.TarInfo, bytes]]) -> str:
    """Write `members` (in order) as the .tar.gz `path`; its sha256 hex digest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def escaping_symlink_chain(
    steps: int = 16, width: int = 247, payload: str = "escaped/pwned"
) -> list[tuple[tarfile.TarInfo, bytes]]:
    """Members whose names all look inside but that write `payload` outside (CVE-2025-4517).

    Each of `steps` short links ("a", "a/b", ...) points at a `width`-character dir
    beside it, so "a/b/.../p" is a few dozen characters while the real path is
    steps x width (past PATH_MAX by default, where `os.path.realpath` stops following
    links). A link at the bottom climbs back `steps` levels to the top; "escape" goes
    one level further, and `payload` is written through it.
    """
    long_dir = "d" * width
    names = [chr(ord("a") + i) for i in range(steps)]
    found: list[tuple[tarfile.TarInfo, bytes]] = []
    for depth, name in enumerate(names):
        here = "/".join(names[:depth])
        found.append(member(f"{here}/{long_dir}".lstrip("/"), tarfile.DIRTYPE))
        found.append(member(f"{here}/{name}".lstrip("/"), tarfile.SYMTYPE, long_dir))
    bottom = "/".join([*names, "l" * 254])
    found.append(member(bottom, tarfile.SYMTYPE, "/".join([".."] * steps)))
    found.append(member("escape", tarfile.SYMTYPE, f"{bottom}/.."))
    first, rest = payload.split("/", 1)
    found.append(member(f"escape/{first}", tarfile.DIRTYPE))
    found.append(member(f"escape/{first}/{rest}", data=b"pwned\n"))
    return found
