"""Health checks against the real demo service."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from agent import driver
from agent.driver import ProcessRecord
from agent.health import HealthFailed, probe, wait_healthy
from shared.specs import HealthSpec
from tests.agent.helpers import answered, eventually, http_get
from tests.support.artifacts import SERVICE_SOURCE, free_port
from tests.support.procs import Procs


def _serve(tmp_path: Path, port: int, **env: str) -> ProcessRecord:
    release = tmp_path / f"svc-{port}"
    release.mkdir()
    shutil.copy(SERVICE_SOURCE, release / "server.py")
    env = {"PORT": str(port), "VERSION": "1.0.0", **env}
    return driver.start(f"{sys.executable} server.py", release, env, tmp_path / f"{port}.log")


def _exited(record: ProcessRecord) -> Callable[[], str | None]:
    return lambda: None if driver.is_alive(record) else driver.exit_reason(record)


def _spec(**fields: object) -> HealthSpec:
    base: dict[str, object] = {"interval": "0.05s", "timeout": "1s", "healthy_after": 2}
    return HealthSpec.model_validate({**base, **fields})


@pytest.fixture
async def healthy_port(tmp_path: Path, procs: Procs) -> int:
    port = free_port()
    _serve(tmp_path, port)
    await answered(port, "/health")
    return port


async def test_http_tcp_exec_pass_on_a_healthy_service(healthy_port: int, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{healthy_port}/health"
    assert await probe(_spec(http=url)) is None
    assert await probe(_spec(tcp=f"127.0.0.1:{healthy_port}")) is None
    assert await probe(_spec(exec="test -d .", http=url), cwd=tmp_path) is None


async def test_checks_fail_with_reasons(healthy_port: int) -> None:
    free = free_port()
    assert "404" in str(await probe(_spec(http=f"http://127.0.0.1:{healthy_port}/nope")))
    assert "cannot connect" in str(await probe(_spec(http=f"http://127.0.0.1:{free}/health")))
    assert "cannot connect" in str(await probe(_spec(tcp=f"127.0.0.1:{free}")))
    assert "status 1" in str(await probe(_spec(exec="false")))
    assert "timed out" in str(await probe(_spec(exec="sleep 5", timeout="0.2s")))


async def test_fail_health_answers_500(tmp_path: Path, procs: Procs) -> None:
    port = free_port()
    record = _serve(tmp_path, port, FAIL_HEALTH="1")
    await answered(port, "/version")
    reason = await probe(_spec(http=f"http://127.0.0.1:{port}/health"))
    assert reason is not None
    assert "500" in reason
    spec = _spec(http=f"http://127.0.0.1:{port}/health", start_deadline="0.5s")
    with pytest.raises(HealthFailed, match=r"not healthy within 0\.5s.*500"):
        await wait_healthy(spec, _exited(record))


async def test_fail_health_after_turns_unhealthy(tmp_path: Path, procs: Procs) -> None:
    port = free_port()
    _serve(tmp_path, port, FAIL_HEALTH_AFTER="0.5")
    url = f"http://127.0.0.1:{port}/health"
    await answered(port, "/health")
    await eventually(lambda: _is_500(port), "health to turn 500")
    assert "500" in str(await probe(_spec(http=url)))


async def _is_500(port: int) -> bool:
    return (await http_get(port, "/health"))[0] == 500


async def test_wait_healthy_passes_after_consecutive_probes(tmp_path: Path, procs: Procs) -> None:
    port = free_port()
    record = _serve(tmp_path, port)
    await wait_healthy(_spec(http=f"http://127.0.0.1:{port}/health"), _exited(record))


async def test_wait_healthy_fails_at_once_when_the_process_exits(
    tmp_path: Path, procs: Procs
) -> None:
    record = driver.start("exit 7", tmp_path, {}, tmp_path / "x.log")
    spec = _spec(tcp=f"127.0.0.1:{free_port()}", start_deadline="30s")
    with pytest.raises(HealthFailed, match="exited with status 7"):
        await wait_healthy(spec, _exited(record))
