"""The store's lease: which coordinator is active, until when, and its epoch.

Part of `coordinator.store.Store`. `coordinator.leadership` takes, renews and releases
it on a connection of its own (a store opened for it alone), so renewing never waits
behind the deployments' transactions, and never commits one of them. Each is one
atomic conditional UPDATE, judged by the store's own clock (`Db.now_sql`), so
coordinators on different machines need no agreement on time: a lease is taken only
once it expired, with the next epoch; renewed or released only by its holder at its
epoch. Every other table's commits check the epoch (`coordinator.store.db`).
"""

from __future__ import annotations

from coordinator.records import LeaseRecord
from coordinator.store.base import Table, transaction


class LeaseTable(Table):
    async def lease(self) -> LeaseRecord:
        now = self._db.now_sql
        [row] = await self._rows(
            f"SELECT epoch, holder, host, pid, since, expires_at, {now} AS now FROM lease"
            " WHERE name = 'coordinator'"
        )
        return LeaseRecord(
            int(row["epoch"]), row["holder"], row["host"], int(row["pid"]),
            float(row["since"]), float(row["expires_at"]), float(row["now"]),
        )  # fmt: skip

    @transaction
    async def take_lease(self, holder: str, host: str, pid: int, ttl: float) -> int | None:
        """The next epoch, if the lease had expired (or was released) and is now
        `holder`'s for `ttl` seconds; None while another coordinator holds it."""
        now = self._db.now_sql
        rows = await self._rows(
            f"UPDATE lease SET epoch = epoch + 1, holder = ?, host = ?, pid = ?, since = {now},"
            f" expires_at = {now} + ? WHERE name = 'coordinator' AND expires_at <= {now}"
            " RETURNING epoch",
            holder, host, pid, ttl,
        )  # fmt: skip
        return int(rows[0]["epoch"]) if rows else None

    @transaction
    async def renew_lease(self, epoch: int, holder: str, ttl: float) -> bool:
        """Extend `holder`'s lease by `ttl` from now; False if it was taken over."""
        now = self._db.now_sql
        rows = await self._rows(
            f"UPDATE lease SET expires_at = {now} + ? WHERE name = 'coordinator'"
            " AND epoch = ? AND holder = ? RETURNING epoch",
            ttl, epoch, holder,
        )  # fmt: skip
        return bool(rows)

    @transaction
    async def release_lease(self, epoch: int, holder: str) -> None:
        """Give the lease up at once (a standby need not wait for it to expire)."""
        await self._db.execute(
            "UPDATE lease SET expires_at = 0 WHERE name = 'coordinator' AND epoch = ?"
            " AND holder = ?",
            epoch, holder,
        )  # fmt: skip
