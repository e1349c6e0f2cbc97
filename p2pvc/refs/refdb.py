"""Storage of ref updates and the local clock, in the repository database.

Every stored update is kept: the state of a ref is computed from all of them
(see `p2pvc.refs.state`). Updates are verified when they enter and again
when they are read, so a damaged row can never pick a ref's value.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import replace
from collections.abc import Callable

from p2pvc.errors import ConflictError, CorruptionError, SignatureError
from p2pvc.identity.keys import Identity, verify
from p2pvc.refs import hlc
from p2pvc.refs.records import RefUpdate, check_ref_name, decode_ref_update, encode_ref_update
from p2pvc.refs.state import IsAncestor, RefState, resolve
from p2pvc.store.db import Database

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS ref_updates (
    id      BLOB PRIMARY KEY,
    name    TEXT NOT NULL,
    record  BLOB NOT NULL          -- canonical signed encoding
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS ref_updates_by_name ON ref_updates (name);
"""

Clock = Callable[[], int]  # Unix time in milliseconds


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class RefDB:
    def __init__(self, db: Database, repo_id: bytes, clock: Clock = wall_clock_ms) -> None:
        self.db = db
        self.repo_id = repo_id
        self.clock = clock
        db.ensure_schema(SCHEMA)

    # Reading ------------------------------------------------------------

    def names(self) -> list[str]:
        rows = self.db.conn.execute("SELECT DISTINCT name FROM ref_updates ORDER BY name").fetchall()
        return [r[0] for r in rows]

    def updates(self, name: str, conn: sqlite3.Connection | None = None) -> list[RefUpdate]:
        rows = (conn or self.db.conn).execute("SELECT id, record FROM ref_updates WHERE name = ?", (name,)).fetchall()
        result = []
        for row_id, record in rows:
            try:
                update = self._check(bytes(record))
            except CorruptionError as exc:
                log.warning("ignoring stored ref update %s: %s", bytes(row_id).hex()[:12], exc.message)
                continue
            result.append(update)
        return result

    def all_updates(self) -> list[tuple[bytes, bytes]]:
        """Return (id, record) of every stored update, unverified, for fsck and sync."""
        rows = self.db.conn.execute("SELECT id, record FROM ref_updates").fetchall()
        return [(bytes(i), bytes(r)) for i, r in rows]

    def state(self, name: str, is_ancestor: IsAncestor, conn: sqlite3.Connection | None = None) -> RefState | None:
        return resolve(name, self.updates(name, conn), is_ancestor)

    # Writing ------------------------------------------------------------

    def next_timestamp(self, conn: sqlite3.Connection) -> hlc.Timestamp:
        """Advance and persist the local clock; call inside a write transaction."""
        last = self._load_clock(conn)
        now = hlc.tick(last, self.clock())
        self.db.set_meta(conn, "hlc", str(now).encode())
        return now

    def _load_clock(self, conn: sqlite3.Connection) -> hlc.Timestamp:
        row = conn.execute("SELECT value FROM meta WHERE key = 'hlc'").fetchone()
        if row is None:
            return hlc.ZERO
        wall, counter = bytes(row[0]).decode().split(".")
        return hlc.Timestamp(int(wall), int(counter))

    def set(
        self,
        identity: Identity,
        name: str,
        target: bytes | None,
        *,
        expected: bytes | None | type[...] = ...,
        is_ancestor: IsAncestor,
    ) -> RefUpdate:
        """Write a signed update of `name` to `target` that supersedes the current heads.

        `expected` is the commit the caller based its change on; when the ref's
        value differs at write time, nothing is written and ConflictError says
        so. The check and the insert run in one IMMEDIATE transaction, so two
        processes cannot both succeed from the same starting point.
        """
        check_ref_name(name)
        with self.db.write() as conn:
            current = self.state(name, is_ancestor, conn)
            current_target = current.target if current else None
            if expected is not ... and current_target != expected:
                raise ConflictError(
                    f"{name} moved to {current_target.hex()[:12] if current_target else 'nothing'} "
                    f"while this command ran (it expected {expected.hex()[:12] if expected else 'nothing'})",
                    hint="nothing was lost: the new objects are stored; run the command again",
                )
            update = RefUpdate(
                repo=self.repo_id,
                name=name,
                target=target,
                clock=self.next_timestamp(conn),
                author=identity.public_key,
                supersedes=tuple(h.id for h in current.heads) if current else (),
            )
            update = _sign(identity, update)
            self._insert(conn, update)
        return update

    def add_verified(self, update: RefUpdate) -> bool:
        """Insert an update received from elsewhere; return False if already present."""
        self._check_signature(update)
        physical = self.clock()
        if hlc.too_far_ahead(update.clock, physical):
            raise CorruptionError(
                f"ref update {update.id.hex()[:12]} of {update.name} is stamped "
                f"{(update.clock.wall_ms - physical) // 1000} s ahead of this clock",
                hint="the sender's clock is wrong; it must be fixed before its updates are accepted",
            )
        with self.db.write() as conn:
            # Fold the remote stamp into our clock so our next update orders after it.
            merged = hlc.receive(self._load_clock(conn), update.clock, physical)
            self.db.set_meta(conn, "hlc", str(merged).encode())
            return self._insert(conn, update)

    def _insert(self, conn: sqlite3.Connection, update: RefUpdate) -> bool:
        cursor = conn.execute(
            "INSERT OR IGNORE INTO ref_updates (id, name, record) VALUES (?, ?, ?)",
            (update.id, update.name, encode_ref_update(update)),
        )
        return cursor.rowcount > 0

    def _check(self, record: bytes) -> RefUpdate:
        update = decode_ref_update(record)
        self._check_signature(update)
        return update

    def _check_signature(self, update: RefUpdate) -> None:
        if update.repo != self.repo_id:
            raise CorruptionError(f"ref update {update.id.hex()[:12]} belongs to another repository")
        if not verify(update.author, update.signature, update.signing_payload()):
            raise SignatureError(f"ref update {update.id.hex()[:12]} of {update.name} has an invalid signature")


def _sign(identity: Identity, update: RefUpdate) -> RefUpdate:
    return replace(update, signature=identity.sign(update.signing_payload()))
