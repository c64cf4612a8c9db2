"""Entry point of the agent process: `lockstep agent` (coordinator/cli) calls `run`.

Builds an `Agent` from the LOCKSTEP_* settings, runs it until SIGTERM or SIGINT, then
stops it gracefully (services keep running; the next agent adopts them). It refuses to
start without the coordinator's public key: an agent trusts nothing else (SPEC 7).
"""

from __future__ import annotations

import asyncio
import re
import signal
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.service import Agent
from shared import log, metrics, signing
from shared.config import AgentSettings, BrokerSettings, SecuritySettings
from shared.errors import UserError
from shared.specs import HOST

DRIVERS = ("process",)


def run(
    host_id: str,
    labels: dict[str, str],
    state_dir: Path,
    driver: str,
    metrics_port: int | None,
    coordinator_key: Path | None = None,
) -> None:
    """Run the agent for `host_id` until it is told to stop."""
    if not re.match(HOST, host_id):
        raise UserError("--host-id", f"{host_id!r} is not a host id (letters, digits, '.', "
                        "'_' and '-', starting with a letter or digit)")  # fmt: skip
    if driver == "systemd":
        raise UserError("--driver", "the systemd driver is not implemented yet")
    if driver not in DRIVERS:
        raise UserError("--driver", f"unknown driver {driver!r} (choose process or systemd)")
    security = SecuritySettings()
    key_path = coordinator_key or (
        Path(security.coordinator_key) if security.coordinator_key else None
    )
    if key_path is None:
        raise UserError("--coordinator-key", "required: the path of the coordinator's "
                        "coordinator.pub (or LOCKSTEP_COORDINATOR_KEY); an agent trusts "
                        "only commands signed by that key")  # fmt: skip
    trusted = signing.load_public(key_path)
    log.setup()
    metrics.serve(metrics_port)
    asyncio.run(serve(host_id, labels, state_dir.resolve(), metrics_port, trusted, security))


async def serve(
    host_id: str, labels: dict[str, str], state_dir: Path, metrics_port: int | None,
    trusted: Ed25519PublicKey, security: SecuritySettings,
) -> None:  # fmt: skip
    """Start an agent, wait for SIGTERM/SIGINT, stop it."""
    logger = log.get("agent.main", host_id=host_id)
    agent = Agent(host_id, labels, state_dir, BrokerSettings(), AgentSettings(), trusted,
                  security)  # fmt: skip
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await agent.start()
        logger.info("agent.ready", state_dir=str(state_dir), metrics_port=metrics_port)
        await stopping.wait()
    finally:
        await agent.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
