"""The agent store: idempotent commands, transactions, services, switches."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

from agent.driver import ProcessRecord
from agent.store import ServiceRow, Store, Txn
from shared.specs import ServiceVersion

SPEC = ServiceVersion.model_validate(
    {"name": "demo", "version": "1.0.0", "artifact": "file:///a", "run": "true",
     "health": {"exec": "true"}}
)  # fmt: skip


async def test_commands_are_idempotent_by_id_and_by_step(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "agent.db")
    try:
        first = await store.commands.add("e1", "d1", "demo", "commit", "{}")
        assert first.state == "received"
        assert await store.commands.add("e1", "d1", "demo", "commit", "{}") == first
        assert (await store.commands.add("e2", "d1", "demo", "commit", "{}")).id == "e1"
        await store.commands.finish("e1", {"ok": True})
        again = await store.commands.add("e1", "d1", "demo", "commit", "{}")
        assert again.state == "done"
        assert again.result == {"ok": True}
        assert await store.commands.pending() == []
    finally:
        await store.close()


async def test_state_survives_reopening(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "agent.db")
    await store.put_txn(Txn("d1", "demo", "1.0.0", None, SPEC, "prepared", "/staged"))
    row = ServiceRow("demo", "1.0.0", SPEC, ProcessRecord(10, 10, 99), "/r", "healthy")
    await store.put_service(row)
    await store.add_switch("demo", None, "1.0.0", "commit", "d1")
    await store.commands.add("e9", "d1", "demo", "prepare", "{}")
    await store.close()
    store = await Store.open(tmp_path / "agent.db")
    try:
        txn = await store.txn("d1", "demo")
        assert txn is not None
        assert txn.state == "prepared"
        assert txn.spec == SPEC
        assert await store.service("demo") == row
        [switch] = await store.switches("demo")
        assert (switch.kind, switch.to_version, switch.deployment_id) == ("commit", "1.0.0", "d1")
        assert [c.id for c in await store.commands.pending()] == ["e9"]
    finally:
        await store.close()


async def test_a_new_switch_settles_the_open_one_in_the_same_statement(tmp_path: Path) -> None:
    """Review of issue 9's autocommit store: no crash can come between settling the
    earlier switch and recording the new one: the INSERT that records a switch settles
    the open one itself (trigger switch_supersedes), whoever runs it."""
    store = await Store.open(tmp_path / "agent.db")
    try:
        await store.add_switch("demo", None, "1.0.0", "commit", "d1")
        await store.add_switch("other", None, "1.0.0", "commit", "d1")
        with contextlib.closing(sqlite3.connect(tmp_path / "agent.db")) as db, db:
            db.execute(
                "INSERT INTO switches (ts, service, from_version, to_version, kind,"
                " deployment_id) VALUES (1, 'demo', '1.0.0', '2.0.0', 'commit', 'd2')"
            )
            rows = db.execute("SELECT service, to_version, settled_at IS NULL FROM switches"
                              " ORDER BY id").fetchall()  # fmt: skip
        assert rows == [("demo", "1.0.0", 0), ("other", "1.0.0", 1), ("demo", "2.0.0", 1)]
        second = await store.add_switch("demo", "2.0.0", "3.0.0", "commit", "d3")
        reopened = await Store.open(tmp_path / "agent.db")  # what a restart finds open
        try:
            switching = [await reopened.switching(name) for name in ("demo", "other")]
            assert [s.id if s else None for s in switching] == [second, 2]
        finally:
            await reopened.close()
    finally:
        await store.close()


async def test_a_database_from_before_rollback_flags_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "agent.db"
    with contextlib.closing(sqlite3.connect(path)) as db:  # the txns table as first shipped
        db.execute(
            "CREATE TABLE txns (deployment_id TEXT NOT NULL, service TEXT NOT NULL,"
            " version TEXT NOT NULL, from_version TEXT, spec TEXT NOT NULL,"
            " state TEXT NOT NULL, staged_path TEXT, PRIMARY KEY (deployment_id, service))"
        )
        db.execute(
            "INSERT INTO txns VALUES ('d0', 'demo', '1.0.0', NULL, ?, 'prepared', NULL)",
            (SPEC.model_dump_json(),),
        )
        db.commit()
    store = await Store.open(path)
    try:
        old = await store.txn("d0", "demo")
        assert old is not None
        assert (old.state, old.rollback, old.updated_at) == ("prepared", False, 0.0)
        await store.put_txn(Txn("d1", "demo", "1.0.0", "0.9.0", SPEC, "prepared", None, True))
        new = await store.txn("d1", "demo")
        assert new is not None
        assert new.rollback
        assert new.updated_at > 0
        assert [t.deployment_id for t in await store.txns(None, ("prepared",))] == ["d0", "d1"]
    finally:
        await store.close()


async def test_crash_loops_are_recorded_until_cleared(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "agent.db")
    try:
        assert await store.crash_looped("demo") is None
        await store.set_crash_loop("demo", "1.0.0", 3)
        assert await store.crash_looped("demo") == "1.0.0"
        await store.clear_crash_loop("demo")
        assert await store.crash_looped("demo") is None
    finally:
        await store.close()
