"""Sync bookkeeping in the repository database: complete commits and known peers."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from p2pvc.store.db import Database

SCHEMA = """
CREATE TABLE IF NOT EXISTS complete_commits (
    id BLOB PRIMARY KEY              -- every object this commit reaches is stored and verified
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS peers (
    peer_id      TEXT PRIMARY KEY,
    address      TEXT NOT NULL,      -- multiaddr including /p2p/PEER_ID
    added_ms     INTEGER NOT NULL,
    last_seen_ms INTEGER,            -- last successful exchange
    last_error   TEXT,
    refs         INTEGER             -- refs the peer had at the last exchange
);
"""


@dataclass(frozen=True)
class RefChange:
    """How one ref moved during a pull or a bundle apply."""

    name: str
    old: bytes | None
    new: bytes | None
    conflicted: bool


@dataclass(frozen=True)
class Peer:
    peer_id: str
    address: str
    added_ms: int
    last_seen_ms: int | None
    last_error: str | None
    refs: int | None


class SyncState:
    def __init__(self, db: Database) -> None:
        self.db = db
        db.ensure_schema(SCHEMA)

    def is_complete(self, commit_id: bytes) -> bool:
        return self.db.conn.execute("SELECT 1 FROM complete_commits WHERE id = ?", (commit_id,)).fetchone() is not None

    def mark_complete(self, commit_ids: Iterable[bytes]) -> None:
        with self.db.write() as conn:
            conn.executemany("INSERT OR IGNORE INTO complete_commits (id) VALUES (?)", [(c,) for c in commit_ids])

    def peers(self) -> list[Peer]:
        rows = self.db.conn.execute(
            "SELECT peer_id, address, added_ms, last_seen_ms, last_error, refs FROM peers ORDER BY added_ms"
        ).fetchall()
        return [Peer(*row) for row in rows]

    def add_peer(self, peer_id: str, address: str) -> bool:
        with self.db.write() as conn:
            existing = conn.execute("SELECT 1 FROM peers WHERE peer_id = ?", (peer_id,)).fetchone()
            if existing:
                conn.execute("UPDATE peers SET address = ? WHERE peer_id = ?", (address, peer_id))
                return False
            conn.execute(
                "INSERT INTO peers (peer_id, address, added_ms) VALUES (?, ?, ?)",
                (peer_id, address, time.time_ns() // 1_000_000),
            )
            return True

    def remove_peer(self, peer_id: str) -> bool:
        with self.db.write() as conn:
            return conn.execute("DELETE FROM peers WHERE peer_id = ?", (peer_id,)).rowcount > 0

    def record_contact(self, peer_id: str, *, error: str | None, refs: int | None = None) -> None:
        with self.db.write() as conn:
            if error is None:
                conn.execute(
                    "UPDATE peers SET last_seen_ms = ?, last_error = NULL, refs = ? WHERE peer_id = ?",
                    (time.time_ns() // 1_000_000, refs, peer_id),
                )
            else:
                conn.execute("UPDATE peers SET last_error = ? WHERE peer_id = ?", (error[:500], peer_id))
