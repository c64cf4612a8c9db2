"""Health checks (SPEC 3.1 `[health]`) and waiting for a freshly started service.

`probe` runs every configured check once (http: GET, healthy on 2xx; tcp: connect;
exec: shell command exits 0), each bounded by the spec's `timeout`, and returns why it
failed or None. `wait_healthy` is what a commit or revert step awaits after starting a
service; the continuous watch of running services lives in `agent.monitor`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from urllib.parse import urlsplit

from shared.errors import PermanentError
from shared.specs import HealthSpec


class HealthFailed(PermanentError):
    """The service did not become healthy; the message says why."""


async def probe(
    spec: HealthSpec, cwd: Path | None = None, env: Mapping[str, str] | None = None
) -> str | None:
    """None if every configured check passes, else the first failure's reason."""
    try:
        if spec.http:
            reason = await asyncio.wait_for(check_http(spec.http), spec.timeout)
            if reason:
                return reason
        if spec.tcp:
            reason = await asyncio.wait_for(check_tcp(spec.tcp), spec.timeout)
            if reason:
                return reason
        if spec.exec:
            return await check_exec(spec.exec, spec.timeout, cwd, env)
    except TimeoutError:
        return f"health check timed out after {spec.timeout}s"
    return None


async def check_http(url: str) -> str | None:
    """GET `url`; None on a 2xx status."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"http check: unsupported URL {url!r}"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    path = parts.path or "/"
    if parts.query:
        path += f"?{parts.query}"
    try:
        reader, writer = await asyncio.open_connection(
            parts.hostname, port, ssl=parts.scheme == "https"
        )
    except OSError as e:
        return f"http check: cannot connect to {parts.hostname}:{port}: {e.strerror or e}"
    try:
        request = f"GET {path} HTTP/1.0\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n"
        writer.write(request.encode())
        await writer.drain()
        status_line = await reader.readline()
    except OSError as e:
        return f"http check: {url} failed: {e}"
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    fields = status_line.split()
    if len(fields) < 2 or not fields[1].isdigit():
        return f"http check: {url} sent no HTTP status"
    status = int(fields[1])
    return None if 200 <= status < 300 else f"http check: {url} answered {status}"


async def check_tcp(address: str) -> str | None:
    """Connect to `host:port`; None if the connection is accepted."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return f"tcp check: {address!r} is not host:port"
    try:
        _, writer = await asyncio.open_connection(host, int(port))
    except OSError as e:
        return f"tcp check: cannot connect to {address}: {e.strerror or e}"
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return None


async def check_exec(
    command: str, limit: float, cwd: Path | None, env: Mapping[str, str] | None
) -> str | None:
    """Run `command` (shell); None if it exits 0 within `limit` seconds."""
    proc = await asyncio.create_subprocess_shell(
        command,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        code = await asyncio.wait_for(proc.wait(), limit)
    except TimeoutError:
        await _kill(proc)
        return f"exec check: {command!r} timed out after {limit}s"
    except asyncio.CancelledError:
        await _kill(proc)
        raise
    return None if code == 0 else f"exec check: {command!r} exited with status {code}"


async def _kill(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    await proc.wait()


async def wait_healthy(
    spec: HealthSpec,
    exited: Callable[[], str | None],
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> None:
    """Return once `healthy_after` consecutive probes pass; else raise `HealthFailed`.

    `exited` returns None while the process runs, else how it ended: a process that
    exits fails at once. Not healthy by `start_deadline` fails too.
    """
    deadline = time.monotonic() + spec.start_deadline
    passes = 0
    last = "no health check passed yet"
    while True:
        ended = exited()
        if ended is not None:
            raise HealthFailed(f"{ended} before it became healthy")
        reason = await probe(spec, cwd, env)
        passes = passes + 1 if reason is None else 0
        last = reason or last
        if passes >= spec.healthy_after:
            return
        if time.monotonic() >= deadline:
            raise HealthFailed(f"not healthy within {spec.start_deadline}s: {last}")
        await asyncio.sleep(spec.interval)
