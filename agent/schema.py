"""The tables of the agent's SQLite store (`agent.store` creates and migrates them).

`SCHEMA` creates what is missing (the trigger `command_seen` records a command's id in
`seen` in the very statement that logs the command: one write, atomic); `ADDED_COLUMNS`
lists columns added after a table was first shipped, which the store adds to an older
database when it opens it.
"""

from __future__ import annotations

SCHEMA = """
CREATE TABLE IF NOT EXISTS commands (
    id TEXT PRIMARY KEY, deployment_id TEXT NOT NULL, service TEXT NOT NULL,
    step TEXT NOT NULL, body TEXT NOT NULL, state TEXT NOT NULL, result TEXT,
    UNIQUE (deployment_id, service, step));
CREATE TABLE IF NOT EXISTS txns (
    deployment_id TEXT NOT NULL, service TEXT NOT NULL, version TEXT NOT NULL,
    from_version TEXT, spec TEXT NOT NULL, state TEXT NOT NULL, staged_path TEXT,
    rollback INTEGER NOT NULL DEFAULT 0, updated_at REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (deployment_id, service));
CREATE TABLE IF NOT EXISTS services (
    service TEXT PRIMARY KEY, version TEXT NOT NULL, spec TEXT NOT NULL, pid INTEGER,
    pgid INTEGER, start_time INTEGER, release_dir TEXT NOT NULL, health TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS switches (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, service TEXT NOT NULL,
    from_version TEXT, to_version TEXT, kind TEXT NOT NULL, deployment_id TEXT,
    settled_at REAL);
CREATE TABLE IF NOT EXISTS seen (id TEXT PRIMARY KEY, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS crash_loops (
    service TEXT PRIMARY KEY, version TEXT NOT NULL, exits INTEGER NOT NULL, ts REAL NOT NULL);
CREATE TRIGGER IF NOT EXISTS command_seen AFTER INSERT ON commands BEGIN
    INSERT OR IGNORE INTO seen (id, at)
    VALUES (NEW.id, (julianday('now') - 2440587.5) * 86400.0);
END;
CREATE TRIGGER IF NOT EXISTS switch_supersedes AFTER INSERT ON switches BEGIN
    UPDATE switches SET settled_at = NEW.ts
    WHERE service = NEW.service AND settled_at IS NULL AND id != NEW.id;
END;
"""
ADDED_COLUMNS = {
    "switches": (("settled_at", "REAL"),),
    "txns": (
        ("rollback", "INTEGER NOT NULL DEFAULT 0"),
        ("updated_at", "REAL NOT NULL DEFAULT 0"),
    ),
}
"""Columns added after the first release: added to an older database when it opens."""
