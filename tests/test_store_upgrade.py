"""Issue 8: a coordinator database from before agent keys opens and its hosts enroll.

Real SQLite files: the old `agents` table (no key columns) gains them on open, a host
recorded then counts as not enrolled (not as a key mismatch), and its first self-signed
key enrolls it in place, keeping what was recorded of it.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from coordinator.store import Store
from shared import signing

OLD_AGENTS = """
CREATE TABLE agents (
    host_id TEXT PRIMARY KEY, labels TEXT NOT NULL, services TEXT NOT NULL,
    last_seen REAL NOT NULL, first_seen REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'alive', overwrite INTEGER NOT NULL DEFAULT 0,
    reported_at REAL NOT NULL DEFAULT 0);
INSERT INTO agents (host_id, labels, services, last_seen, first_seen)
VALUES ('host-a', '{"role": "web"}', '[{"service": "orders", "version": "1.0.0",
        "health": "healthy"}]', 1.0, 1.0);
"""


async def test_hosts_recorded_before_keys_existed_enroll_with_their_first_key(
    tmp_path: Path,
) -> None:
    path = tmp_path / "coordinator.db"
    with sqlite3.connect(path) as db:
        db.executescript(OLD_AGENTS)
    store = await Store.open(path)
    try:
        assert await store.known_key("host-a") is None
        assert await store.agents() == []  # not approved: not planned for, not shown
        key = signing.Signer(signing.generate()).public
        await store.enroll("host-a", key, {"role": "web"}, "pending")
        known = await store.known_key("host-a")
        assert known is not None
        assert (known.public_key, known.state) == (key, "pending")
        await store.set_key_state("host-a", "approved")
        [agent] = await store.agents()
        assert agent.services[0].version == "1.0.0"
        other = signing.Signer(signing.generate()).public
        await store.enroll("host-a", other, {}, "approved")  # a second key changes nothing
        known = await store.known_key("host-a")
        assert known is not None
        assert (known.public_key, known.state) == (key, "approved")
    finally:
        await store.close()
