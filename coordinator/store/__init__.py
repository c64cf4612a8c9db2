"""The coordinator's durable state (aiosqlite): catalog, releases, deployments, agents, events.

The only coordinator package that imports aiosqlite; every caller goes through `Store`
and gets typed records back (coordinator.records). WAL with `synchronous=FULL`: a
deployment's header carries the protocol state (votes, the decision), and the runtime
saves it before sending anything that depends on it. Each public method is one
transaction. The store saves and loads; what a finished deployment means for the
releases is decided by `coordinator.outcome`.

One connection, one module per concern: `catalog` (service versions, releases, the
fleet pointer), `deployments` (deployments, their participants, their outcome),
`agents` (hosts, what they run, their keys), `events`; `base` holds the schema.
"""

from __future__ import annotations

from pathlib import Path

from coordinator.store.agents import AgentTable
from coordinator.store.base import connect
from coordinator.store.catalog import digest
from coordinator.store.deployments import DeploymentTable

__all__ = ["Store", "digest"]


class Store(DeploymentTable, AgentTable):
    """Every part of the store over one connection (a transaction may span them)."""

    @classmethod
    async def open(cls, path: Path) -> Store:
        return cls(await connect(path))

    async def close(self) -> None:
        await self._db.close()
