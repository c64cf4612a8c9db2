"""Entry point of the agent process: `lockstep agent` (coordinator/cli) calls `run`.

Builds an `Agent` from the LOCKSTEP_* settings, runs it until SIGTERM or SIGINT, then
stops it gracefully (services keep running; the next agent adopts them).
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from agent.service import Agent
from shared import log, metrics
from shared.config import AgentSettings, BrokerSettings
from shared.errors import UserError

DRIVERS = ("process",)


def run(
    host_id: str,
    labels: dict[str, str],
    state_dir: Path,
    driver: str,
    metrics_port: int | None,
) -> None:
    """Run the agent for `host_id` until it is told to stop."""
    if driver == "systemd":
        raise UserError("--driver", "the systemd driver is not implemented yet")
    if driver not in DRIVERS:
        raise UserError("--driver", f"unknown driver {driver!r} (choose process or systemd)")
    log.setup()
    metrics.serve(metrics_port)
    asyncio.run(serve(host_id, labels, state_dir.resolve(), metrics_port))


async def serve(
    host_id: str, labels: dict[str, str], state_dir: Path, metrics_port: int | None
) -> None:
    """Start an agent, wait for SIGTERM/SIGINT, stop it."""
    logger = log.get("agent.main", host_id=host_id)
    agent = Agent(host_id, labels, state_dir, BrokerSettings(), AgentSettings())
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
