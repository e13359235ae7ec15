"""A durable queue in SQLite, shared by the worker instances.

A message is `ready`, then `processing` (claimed by one instance), then `done`. Its
effect (here: a row in `effects`) and its `done` mark are one transaction, so a worker
killed before the commit leaves no effect, and its message can be handed out again.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path


def connect(path: str | Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=30, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript("""
        CREATE TABLE IF NOT EXISTS messages (
            id INTEGER PRIMARY KEY, body TEXT NOT NULL,
            state TEXT NOT NULL DEFAULT 'ready', owner TEXT);
        CREATE TABLE IF NOT EXISTS effects (message INTEGER NOT NULL, by TEXT NOT NULL);
    """)
    return db


def enqueue(db: sqlite3.Connection, bodies: list[str]) -> None:
    db.execute("BEGIN IMMEDIATE")
    db.executemany("INSERT INTO messages (body) VALUES (?)", [(b,) for b in bodies])
    db.execute("COMMIT")


def claim(db: sqlite3.Connection, owner: str) -> tuple[int, str] | None:
    row = db.execute(
        "UPDATE messages SET state = 'processing', owner = ? WHERE id = "
        "(SELECT id FROM messages WHERE state = 'ready' ORDER BY id LIMIT 1) "
        "RETURNING id, body", (owner,)).fetchone()
    return (row[0], row[1]) if row else None


def complete(db: sqlite3.Connection, message: int, owner: str) -> bool:
    """The effect and the done mark, together or not at all; and only while `owner` still
    holds the message (a stop may have handed it back meanwhile)."""
    db.execute("BEGIN IMMEDIATE")
    held = db.execute("UPDATE messages SET state = 'done' WHERE id = ? AND owner = ? "
                      "AND state = 'processing'", (message, owner)).rowcount
    if held:
        db.execute("INSERT INTO effects (message, by) VALUES (?, ?)", (message, owner))
    db.execute("COMMIT")
    return bool(held)


def release(db: sqlite3.Connection, owner: str) -> int:
    """Hand back what `owner` holds (a stop, or the leftovers of a killed incarnation)."""
    return db.execute("UPDATE messages SET state = 'ready', owner = NULL "
                      "WHERE state = 'processing' AND owner = ?", (owner,)).rowcount


def counts(db: sqlite3.Connection) -> dict[str, int]:
    states = dict(db.execute("SELECT state, COUNT(*) FROM messages GROUP BY state").fetchall())
    effects, distinct = db.execute(
        "SELECT COUNT(*), COUNT(DISTINCT message) FROM effects").fetchone()
    return {"ready": states.get("ready", 0), "processing": states.get("processing", 0),
            "done": states.get("done", 0), "effects": effects, "distinct": distinct}
