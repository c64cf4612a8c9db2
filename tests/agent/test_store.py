"""The agent store: idempotent commands, transactions, services, switches."""

from __future__ import annotations

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
        first = await store.add_command("e1", "d1", "demo", "commit", "{}")
        assert first.state == "received"
        assert await store.add_command("e1", "d1", "demo", "commit", "{}") == first
        assert (await store.add_command("e2", "d1", "demo", "commit", "{}")).id == "e1"
        await store.finish_command("e1", {"ok": True})
        again = await store.add_command("e1", "d1", "demo", "commit", "{}")
        assert again.state == "done"
        assert again.result == {"ok": True}
        assert await store.pending_commands() == []
    finally:
        await store.close()


async def test_state_survives_reopening(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "agent.db")
    await store.put_txn(Txn("d1", "demo", "1.0.0", None, SPEC, "prepared", "/staged"))
    row = ServiceRow("demo", "1.0.0", SPEC, ProcessRecord(10, 10, 99), "/r", "healthy")
    await store.put_service(row)
    await store.add_switch("demo", None, "1.0.0", "commit", "d1")
    await store.add_command("e9", "d1", "demo", "prepare", "{}")
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
        assert [c.id for c in await store.pending_commands()] == ["e9"]
    finally:
        await store.close()
