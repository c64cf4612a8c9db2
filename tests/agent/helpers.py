"""Helpers for the agent tests: async polling with a deadline, HTTP to a service,
and building service versions of the demo service."""

from __future__ import annotations

import asyncio
import tomllib
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar, overload

from shared.specs import ServiceVersion
from tests.support.artifacts import build_artifact, service_toml

T = TypeVar("T")


@overload
async def eventually(
    predicate: Callable[[], Awaitable[T | None]], what: str, timeout: float = 15.0
) -> T: ...


@overload
async def eventually(predicate: Callable[[], T | None], what: str, timeout: float = 15.0) -> T: ...


async def eventually(predicate: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    """Poll `predicate` (sync or async) until it returns a truthy value, or fail."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value: Any = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


async def http_get(port: int, path: str) -> tuple[int, str]:
    """(status, body) of GET http://127.0.0.1:<port><path>; (0, "") if unreachable."""
    return await asyncio.to_thread(_get, f"http://127.0.0.1:{port}{path}")


def demo_version(
    root: Path,
    version: str,
    *,
    name: str = "demo",
    fail_health: bool = False,
    fail_health_after: float | None = None,
    start_deadline: str = "10s",
    sha256: str | None = None,
) -> ServiceVersion:
    """A ServiceVersion of the demo service, its artifact built under `root`."""
    path, digest = build_artifact(
        root, name, version, fail_health=fail_health, fail_health_after=fail_health_after
    )
    text = service_toml(name, version, path, sha256 or digest, start_deadline=start_deadline)
    return ServiceVersion.model_validate(tomllib.loads(text))


async def answered(port: int, path: str, status: int = 200, timeout: float = 15.0) -> str:
    """The body of GET `path` once the service answers it with `status`."""

    async def check() -> str | None:
        code, body = await http_get(port, path)
        return body if code == status else None

    result: str = await eventually(check, f"GET :{port}{path} -> {status}", timeout)
    return result
