"""One worker process of the fleet benchmark: many simulated hosts, the real agent code.

    python -m tests.perf.fleetworker '<json config>'     (started by tests.perf.fleet)

It lowers its own priority (`os.nice`), opens `ceil(hosts / per_connection)` broker
connections and then obeys one command per line on stdin, answering each with one
JSON line on stdout:

- `floor`: serve the floor's queues for its hosts (`tests.perf.floor.Responders`, on
  raw aio-pika connections laid out like the agents'); `floor_stop` deletes them.
- `agents`: start one `agent.service.Agent` per host, each with its own state dir,
  store, key pair and command queue, sharing the worker's connections (a channel pair
  each: `Broker(share=...)`), running services through `tests.perf.perfdriver`.
- `agents_stop`: stop every agent (a host going down); `agents` starts them again,
  with the same state dirs, keys and stores (the host coming back).
- `stop` (or stdin closed, or SIGTERM): stop every agent, close the connections, exit.

Agents log at warning level only: one process logging for hundreds of hosts would
steal the CPU the coordinator is measured on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractConnection

from agent.service import Agent
from shared import log, signing
from shared.config import AgentSettings, BrokerSettings
from shared.transport import Broker
from tests.perf import perfdriver
from tests.perf.floor import Responders

LABELS = {"role": "perf"}
START_CONCURRENCY = 100


class Worker:
    def __init__(self, config: dict[str, Any]) -> None:
        self.index: int = config["index"]
        self.hosts: list[str] = config["hosts"]
        self.amqp_url: str = config["amqp_url"]
        self.state_root = Path(config["state_root"])
        self.queue_type: str = config["queue_type"]
        per = max(1, int(config["per_connection"]))
        self.connection_count = -(-len(self.hosts) // per)
        self.trusted = signing.load_public(Path(config["coordinator_pub"]))
        self.settings = BrokerSettings(amqp_url=self.amqp_url)
        self.hubs: list[Broker] = []
        self.agents: list[Agent] = []
        self.floor_connections: list[AbstractConnection] = []
        self.responders: Responders | None = None

    async def connect(self) -> None:
        for j in range(self.connection_count):
            hub = Broker(self.settings, f"perf-worker-{self.index}-{j}")
            await hub.connect()
            self.hubs.append(hub)

    async def floor(self) -> dict[str, Any]:
        for j in range(self.connection_count):
            self.floor_connections.append(await aio_pika.connect(
                self.amqp_url, client_properties={"connection_name": f"perf-floor-{self.index}-{j}"}
            ))  # fmt: skip
        self.responders = Responders(self.floor_connections, self.queue_type)
        await self.responders.start(self.hosts)
        return {"event": "floor_ready", "queues": len(self.hosts)}

    async def floor_stop(self) -> dict[str, Any]:
        if self.responders is not None:
            await self.responders.stop()
        for connection in self.floor_connections:
            await connection.close()
        self.floor_connections.clear()
        return {"event": "floor_stopped"}

    async def start_agents(self) -> dict[str, Any]:
        started = time.monotonic()
        limit = asyncio.Semaphore(START_CONCURRENCY)
        per = -(-len(self.hosts) // len(self.hubs))
        settings = AgentSettings()

        async def one(i: int, host_id: str) -> bool:
            agent = Agent(
                host_id, LABELS, self.state_root / host_id, self.settings, settings,
                self.trusted, share=self.hubs[i // per], process_driver=perfdriver,
                health_wait=perfdriver.healthy_at_once,
            )  # fmt: skip
            self.agents.append(agent)
            async with limit:
                try:
                    await agent.start()
                except Exception as e:  # counted and reported; the others go on
                    print(f"agent {host_id} failed to start: {e!r}", file=sys.stderr)
                    return False
            return True

        results = await asyncio.gather(*(one(i, h) for i, h in enumerate(self.hosts)))
        return {"event": "agents_started", "started": sum(results),
                "failed": len(results) - sum(results),
                "seconds": round(time.monotonic() - started, 2)}  # fmt: skip

    async def stop_agents(self) -> dict[str, Any]:
        """Stop every agent (as a host going down would); their state dirs stay."""
        agents, self.agents = self.agents, []
        await asyncio.gather(*(a.stop() for a in agents), return_exceptions=True)
        return {"event": "agents_stopped", "stopped": len(agents)}

    async def stop(self) -> None:
        await asyncio.gather(*(a.stop() for a in self.agents), return_exceptions=True)
        await self.floor_stop()
        for hub in self.hubs:
            await hub.close()


def _say(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


async def _lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def serve(config: dict[str, Any]) -> None:
    worker = Worker(config)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    reader = await _lines()
    try:
        await worker.connect()
        _say({"event": "connected", "connections": len(worker.hubs)})
        commands = {"floor": worker.floor, "floor_stop": worker.floor_stop,
                    "agents": worker.start_agents, "agents_stop": worker.stop_agents}  # fmt: skip
        while not stopping.is_set():
            read = asyncio.ensure_future(reader.readline())
            stop = asyncio.ensure_future(stopping.wait())
            await asyncio.wait({read, stop}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if not read.done():
                read.cancel()
                break
            line = read.result().decode().strip()
            if not line or line == "stop":
                break
            _say(await commands[line]())
    finally:
        await worker.stop()
        with contextlib.suppress(OSError):  # the harness may be gone
            _say({"event": "stopped"})


def main() -> None:
    config = json.loads(sys.argv[1])
    os.nice(int(config.get("nice", 10)))
    log.setup("warning", json=True)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(config))


if __name__ == "__main__":
    main()
