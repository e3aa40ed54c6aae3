"""The head's persistent state in SQLite: the desired deployments, the epoch (incremented at every start) and the
ids of the nodes that registered (a restarted head waits for them before it acts).

Every write is its own committed transaction, so a head killed at any point restarts from what it acknowledged.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas.messages import DEFAULT_FIRST_TOKEN_TIMEOUT_S, DEFAULT_IDLE_TIMEOUT_S


@dataclass
class Deployment:
    """A deployment's desired state."""

    name: str
    engine: str
    engine_args: dict[str, Any]
    replicas: int
    max_concurrency: int
    first_token_timeout_s: float = DEFAULT_FIRST_TOKEN_TIMEOUT_S  # the proxy's deadlines for its streams (0 = none)
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS deployments (
    name TEXT PRIMARY KEY,
    engine TEXT NOT NULL,
    engine_args TEXT NOT NULL,
    replicas INTEGER NOT NULL,
    max_concurrency INTEGER NOT NULL,
    first_token_timeout_s REAL NOT NULL,
    idle_timeout_s REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS nodes (node_id TEXT PRIMARY KEY);
"""
# Columns added after the first release: a database written before them gains them, with their defaults.
_ADDED_COLUMNS = {
    "deployments": (
        ("first_token_timeout_s", f"REAL NOT NULL DEFAULT {DEFAULT_FIRST_TOKEN_TIMEOUT_S}"),
        ("idle_timeout_s", f"REAL NOT NULL DEFAULT {DEFAULT_IDLE_TIMEOUT_S}"),
    ),
}


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None)  # autocommit; transactions are explicit
        self._db.executescript(_SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        for table, columns in _ADDED_COLUMNS.items():
            have = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            for name, decl in columns:
                if name not in have:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")

    def next_epoch(self) -> int:
        """Increments and returns the persisted epoch: called once per head start."""
        with self._transaction():
            row = self._db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
            epoch = (row[0] if row else 0) + 1
            self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('epoch', ?)", (epoch,))
        return epoch

    def load_deployments(self) -> list[Deployment]:
        rows = self._db.execute(
            "SELECT name, engine, engine_args, replicas, max_concurrency, first_token_timeout_s, idle_timeout_s "
            "FROM deployments ORDER BY name"
        ).fetchall()
        return [
            Deployment(name, engine, json.loads(args), replicas, mc, first_token, idle)
            for name, engine, args, replicas, mc, first_token, idle in rows
        ]

    def put_deployment(self, d: Deployment) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO deployments "
            "(name, engine, engine_args, replicas, max_concurrency, first_token_timeout_s, idle_timeout_s) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                d.name,
                d.engine,
                json.dumps(d.engine_args, sort_keys=True),
                d.replicas,
                d.max_concurrency,
                d.first_token_timeout_s,
                d.idle_timeout_s,
            ),
        )

    def delete_deployment(self, name: str) -> None:
        self._db.execute("DELETE FROM deployments WHERE name = ?", (name,))

    def load_nodes(self) -> frozenset[str]:
        return frozenset(row[0] for row in self._db.execute("SELECT node_id FROM nodes"))

    def add_node(self, node_id: str) -> None:
        self._db.execute("INSERT OR IGNORE INTO nodes (node_id) VALUES (?)", (node_id,))

    def forget_node(self, node_id: str) -> None:
        self._db.execute("DELETE FROM nodes WHERE node_id = ?", (node_id,))

    def close(self) -> None:
        self._db.close()

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
