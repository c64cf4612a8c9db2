"""Issue 10 "a store with two backends behind one interface": SQLite and PostgreSQL.

Every store test runs against both (the `store_at` fixture); these cover what is the
backends' own: schema versions migrated forward on start, a newer schema refused, a
failed statement taking its whole transaction with it, and the SQL translation.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator import machine
from coordinator.store import Store
from coordinator.store.base import VERSION
from coordinator.store.postgres import translate
from shared.specs import Strategy
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
    with pytest.raises(RuntimeError, match=f"version {VERSION + 1}, newer"):
        await Store.open(store_at)
    await behind(store_at, f"UPDATE schema_version SET version = {VERSION}")
    store = await Store.open(store_at)
    await store.close()


async def test_a_failed_statement_takes_its_whole_transaction_with_it(
    store_at: str | Path,
) -> None:
    store = await Store.open(store_at)
    try:
        queued = machine.queued("d1", Strategy())
        args = {"deployment_id": "d1", "request_id": "r1", "trigger": "operator",
                "kind": "deploy", "target": {"web": "1.0.0"}, "request": {},
                "locks": ["web"], "machine": queued}  # fmt: skip
        await store.queue_deployment(**args)
        await store._db.execute("UPDATE fleet SET value = 'x'")  # opens a transaction
        await store._db.execute(
            "INSERT INTO releases (services, state, created_at) VALUES ('{}', 'good', 0)"
        )
        with pytest.raises(Exception, match=r"(?i)unique"):
            await store.queue_deployment(**{**args, "deployment_id": "d2"})  # same request id
        assert not store._db.in_transaction
        await store._db.commit()  # nothing of the failed transaction is left to commit
        assert await store.releases() == []
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
    ],
)
def test_sqlite_spellings_become_postgresql_ones(sqlite: str, postgresql: str) -> None:
    assert translate(sqlite) == postgresql
