"""Issue 9 "no caps that break correctness": a real SQLite store, no broker.

Recovery and the lock sets read every in-flight and queued deployment (the store used to
return the newest 100 only, so the oldest running deployment's locks vanished behind a
long queue); the history pages through everything with a limit and a cursor.
"""

from __future__ import annotations

from pathlib import Path

from coordinator import machine
from coordinator.store import Store
from shared.specs import Strategy


async def _queue(store: Store, count: int) -> list[str]:
    ids = [f"d{i:04d}" for i in range(count)]
    for deployment_id in ids:
        await store.queue_deployment(
            deployment_id=deployment_id, request_id=f"r{deployment_id}", trigger="operator",
            kind="deploy", target={"orders": "1.0.0"}, request={}, locks=["orders"],
            machine=machine.queued(deployment_id, Strategy()),
        )  # fmt: skip
    return ids


async def test_every_in_flight_and_queued_deployment_is_seen_past_a_hundred(
    store_at: str | Path,
) -> None:
    store = await Store.open(store_at)
    try:
        ids = await _queue(store, 250)
        assert {r.id for r in await store.in_flight()} == set(ids)
    finally:
        await store.close()


async def test_history_pages_through_everything_with_limit_and_before(store_at: str | Path) -> None:
    store = await Store.open(store_at)
    try:
        ids = await _queue(store, 25)
        seen: list[str] = []
        before = None
        while True:
            page = await store.deployments(limit=10, before=before)
            seen += [r.id for r in page]
            if len(page) < 10:
                break
            before = page[-1].id
        assert seen == list(reversed(ids))
    finally:
        await store.close()
