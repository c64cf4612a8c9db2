"""Issue 10 "a store with two backends behind one interface": SQLite and PostgreSQL.

Every store test runs against both (the `store_at` fixture); these cover what is the
backends' own: schema versions migrated forward on start, a newer schema refused, a
failed statement taking its whole transaction with it, and the SQL translation.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from coordinator import machine
from coordinator.store import Store
from coordinator.store.base import VERSION
from coordinator.store.postgres import translate
from shared.errors import Fenced, UserError
from shared.specs import HealthSpec, ServiceVersion, Strategy
from tests.support.stores import behind


async def _version(store: Store) -> int:
    return int((await store._rows("SELECT version FROM schema_version"))[0]["version"])


async def test_schema_versions_are_recorded_and_migrated_forward_on_start(
    store_at: str | Path,
) -> None:
    store = await Store.open(store_at)
    try:
        assert await _version(store) == VERSION
    finally:
        await store.close()
    # what a version-1 store (before the lease) looks like: it gains the lease on start
    await behind(store_at, "DROP TABLE lease; UPDATE schema_version SET version = 1")
    store = await Store.open(store_at)
    try:
        assert await _version(store) == VERSION
        [lease] = await store._rows("SELECT epoch, holder FROM lease")
        assert (lease["epoch"], lease["holder"]) == (0, "")
    finally:
        await store.close()


async def test_a_store_newer_than_this_code_is_refused_and_left_as_it_was(
    store_at: str | Path,
) -> None:
    await (await Store.open(store_at)).close()
    await behind(store_at, f"UPDATE schema_version SET version = {VERSION + 1}")
    with pytest.raises(UserError, match=f"version {VERSION + 1}, newer"):
        await Store.open(store_at)
    await behind(store_at, f"UPDATE schema_version SET version = {VERSION}")
    store = await Store.open(store_at)
    await store.close()


async def test_a_method_that_fails_half_way_leaves_nothing_and_others_are_untouched(
    store_at: str | Path,
) -> None:
    """Each store method is one transaction, alone on the connection: one that fails
    after writing leaves none of it, and the writes of another method running at the
    same time are neither lost nor committed half-way."""
    store = await Store.open(store_at)
    try:
        args = {"deployment_id": "d1", "request_id": "r1", "trigger": "operator",
                "kind": "deploy", "target": {"web": "1.0.0"}, "request": {},
                "locks": ["web"], "machine": machine.queued("d1", Strategy())}  # fmt: skip
        await store.queue_deployment(**args)
        spec = ServiceVersion(name="web", version="1.0.0", artifact="file:///srv/web",
                              run="true", health=HealthSpec(exec="true"))  # fmt: skip
        duplicate = store.queue_deployment(**{**args, "deployment_id": "d2"})  # same request
        registered, failed = await asyncio.gather(store.register([spec]), duplicate,
                                                  return_exceptions=True)  # fmt: skip
        assert not isinstance(registered, BaseException), registered
        assert isinstance(failed, Exception)
        assert "unique" in str(failed).lower()
        assert list(await store.catalog()) == [("web", "1.0.0")]
        with pytest.raises(IndexError):  # a release is written, then the deployment is missing
            await store.start_deployment(
                deployment_id="nope", target={"web": "1.0.0"}, from_release_id=None,
                release_id=None, plan={}, machine=machine.queued("nope", Strategy()),
            )  # fmt: skip
        assert await store.releases() == []  # the release went with the rest
        assert [r.id for r in await store.in_flight()] == ["d1"]
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("sqlite", "postgresql"),
    [
        ("SELECT * FROM t WHERE a = ? AND b = '?'", "SELECT * FROM t WHERE a = $1 AND b = '?'"),
        (
            "UPDATE a SET x = MAX(x, ?) WHERE id = ?",
            "UPDATE a SET x = GREATEST(x, $1) WHERE id = $2",
        ),
        ("SELECT MAX(ended_at) AS t FROM d", "SELECT MAX(ended_at) AS t FROM d"),
        (
            "INSERT OR IGNORE INTO t (a) VALUES (?)",
            "INSERT INTO t (a) VALUES ($1) ON CONFLICT DO NOTHING",
        ),
        (
            "INSERT OR IGNORE INTO t (a) VALUES (?) RETURNING id",
            "INSERT INTO t (a) VALUES ($1) ON CONFLICT DO NOTHING RETURNING id",
        ),
        ("update a set x = max(x, ?)", "update a set x = GREATEST(x, $1)"),
    ],
)
def test_sqlite_spellings_become_postgresql_ones(sqlite: str, postgresql: str) -> None:
    assert translate(sqlite) == postgresql


async def test_a_former_leaders_writes_are_refused_once_the_lease_moved_past_its_epoch(
    store_at: str | Path,
) -> None:
    """Issue 10 "fencing": every commit of the active coordinator is conditional on its
    epoch; once a standby took the lease, the former leader's transaction is rolled back
    and `Fenced` raised, and nothing of it lands."""
    old, new = await Store.open(store_at), await Store.open(store_at)
    try:
        epoch = await old.take_lease("old", "host-1", 1, ttl=0.5)
        assert epoch == 1
        assert await new.take_lease("new", "host-2", 2, ttl=30) is None  # held: it waits
        fenced: list[bool] = []
        old.fence(epoch, lambda: fenced.append(True))
        await _queue(old, "d1")  # a write while it holds the lease lands
        deadline = time.monotonic() + 10
        while (taken := await new.take_lease("new", "host-2", 2, ttl=30)) is None:
            assert time.monotonic() < deadline, "the lease never expired"
            await asyncio.sleep(0.1)  # the old one stalled: its lease runs out
        assert taken == 2
        leases = await Store.open(store_at)  # the old one's lease connection (unfenced)
        try:
            assert not await leases.renew_lease(epoch, "old", ttl=30)
        finally:
            await leases.close()
        with pytest.raises(Fenced):
            await _queue(old, "d2")
        assert fenced == [True]
        assert [r.id for r in await new.in_flight()] == ["d1"]  # d2 never landed
        lease = await new.lease()
        assert (lease.epoch, lease.holder, lease.pid, lease.active) == (2, "new", 2, True)
    finally:
        await old.close()
        await new.close()


async def _queue(store: Store, deployment_id: str) -> None:
    await store.queue_deployment(
        deployment_id=deployment_id, request_id=f"r-{deployment_id}", trigger="operator",
        kind="deploy", target={"web": "1.0.0"}, request={}, locks=["web"],
        machine=machine.queued(deployment_id, Strategy()),
    )  # fmt: skip
