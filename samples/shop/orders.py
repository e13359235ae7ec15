"""Orders in SQLite: the web role takes them, the worker ships them, exactly once."""

import os
import sqlite3


def connect(path: str) -> sqlite3.Connection:
    """The orders database: the `orders_db` setting, or, when it is empty, orders.db in the
    run directory, which both roles reach and no other run shares (a fixed path such as
    /tmp/orders.db would be every user's and every run's on the machine)."""
    path = path or os.path.join(os.environ["ROLEHOST_RUN_DIR"], "orders.db")
    db = sqlite3.connect(path, timeout=30, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, item TEXT, "
               "state TEXT DEFAULT 'new', owner TEXT, shipped_by TEXT)")
    return db


def place(db: sqlite3.Connection, item: str) -> int:
    return int(db.execute("INSERT INTO orders (item) VALUES (?) RETURNING id",
                          (item,)).fetchone()[0])


def claim(db: sqlite3.Connection, owner: str) -> int | None:
    row = db.execute("UPDATE orders SET state = 'shipping', owner = ? WHERE id = (SELECT id "
                     "FROM orders WHERE state = 'new' ORDER BY id LIMIT 1) RETURNING id",
                     (owner,)).fetchone()
    return int(row[0]) if row else None


def ship(db: sqlite3.Connection, order: int, owner: str) -> bool:
    return bool(db.execute("UPDATE orders SET state = 'shipped', shipped_by = ? WHERE id = ? "
                           "AND owner = ? AND state = 'shipping'", (owner, order, owner)).rowcount)


def release(db: sqlite3.Connection, owner: str) -> None:
    db.execute("UPDATE orders SET state = 'new', owner = NULL "
               "WHERE state = 'shipping' AND owner = ?", (owner,))
