"""The head's persistent state in SQLite: the desired deployments (one column per DeploymentSpec field), the epoch
(incremented at every start) and the ids of the nodes that registered (a restarted head waits for them before it acts).

Every write is its own committed transaction, so a head killed at any point restarts from what it acknowledged.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import msgspec

from schemas.deployment import DeploymentSpec

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS deployments (
    name TEXT PRIMARY KEY,
    engine TEXT NOT NULL,
    engine_args TEXT NOT NULL,
    replicas INTEGER NOT NULL,
    max_concurrency INTEGER NOT NULL,
    first_token_timeout_s REAL,
    idle_timeout_s REAL,
    gpus_per_replica INTEGER,
    placement TEXT
);
CREATE TABLE IF NOT EXISTS nodes (node_id TEXT PRIMARY KEY);
"""
# Columns added after the first release: a database written before them gains them, NULL in its rows, which reads as
# the field's default in DeploymentSpec.
_ADDED_COLUMNS = {
    "deployments": (
        ("first_token_timeout_s", "REAL"),
        ("idle_timeout_s", "REAL"),
        ("gpus_per_replica", "INTEGER"),
        ("placement", "TEXT"),
    ),
}
_SPEC_COLUMNS = tuple(f.name for f in msgspec.structs.fields(DeploymentSpec))


def _spec(row: dict[str, Any]) -> DeploymentSpec:
    row["engine_args"] = json.loads(row["engine_args"])
    return msgspec.convert({k: v for k, v in row.items() if v is not None}, DeploymentSpec)


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

    def load_deployments(self) -> list[DeploymentSpec]:
        rows = self._db.execute(f"SELECT {', '.join(_SPEC_COLUMNS)} FROM deployments ORDER BY name").fetchall()
        return [_spec(dict(zip(_SPEC_COLUMNS, row, strict=True))) for row in rows]

    def put_deployment(self, spec: DeploymentSpec) -> None:
        row = msgspec.to_builtins(spec)
        # as DeploymentSpec measures them: msgspec's JSON, which takes anything a bus message can carry
        row["engine_args"] = msgspec.json.encode(row["engine_args"], order="sorted").decode()
        self._db.execute(
            f"INSERT OR REPLACE INTO deployments ({', '.join(_SPEC_COLUMNS)}) "
            f"VALUES ({', '.join('?' * len(_SPEC_COLUMNS))})",
            [row[c] for c in _SPEC_COLUMNS],
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
