"""The coordinator's durable state: catalog, releases, deployments, agents, events, lease.

SQLite (aiosqlite, WAL with `synchronous=FULL`) by default, or PostgreSQL (asyncpg),
which standby coordinators share (`coordinator.store.db`). The only coordinator
package that imports either; every caller goes through `Store` and gets typed records
back (coordinator.records). A deployment's header carries the protocol state (votes,
the decision), and the runtime saves it before sending anything that depends on it.
Each public method is one transaction; once the coordinator holds the lease, every
commit is conditional on its epoch (fencing, `coordinator.store.db`). The store saves
and loads; what a finished deployment means for the releases is decided by
`coordinator.outcome`, who holds the lease by `coordinator.lease`.

One connection, one module per concern: `catalog` (service versions, releases, the
fleet pointer), `deployments` (deployments, their participants, their outcome),
`agents` (hosts, what they run, their keys), `events`, `leases`; `base` holds the
schema and its migrations.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from coordinator.store.agents import AgentTable
from coordinator.store.base import migrate
from coordinator.store.catalog import digest
from coordinator.store.db import open_db
from coordinator.store.deployments import DeploymentTable
from coordinator.store.leases import LeaseTable

__all__ = ["Store", "digest"]


class Store(DeploymentTable, AgentTable, LeaseTable):
    """Every part of the store over one connection (a transaction may span them)."""

    @classmethod
    async def open(cls, where: str | Path) -> Store:
        """The store at `where`: a SQLite file's path or a `postgresql://` URL, its
        schema migrated to this code's version."""
        db = await open_db(where)
        try:
            await migrate(db)
        except BaseException:
            await db.close()
            raise
        return cls(db)

    @property
    def dialect(self) -> str:
        return self._db.dialect

    def fence(self, epoch: int, on_fenced: Callable[[], None]) -> None:
        """Every later commit only while the lease still has `epoch` (coordinator.store.db)."""
        self._db.fence(epoch, on_fenced)

    async def close(self) -> None:
        await self._db.close()
