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

from p2pvc.errors import ConflictError, CorruptionError, InvalidSignatureError, SignatureError, UserError
from p2pvc.identity.keys import Identity, verify
from p2pvc.refs import hlc, membership
from p2pvc.refs.membership import Members, MembershipRecord, compute_members
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
CREATE TABLE IF NOT EXISTS membership (
    id      BLOB PRIMARY KEY,
    record  BLOB NOT NULL          -- canonical signed encoding
) WITHOUT ROWID;
"""

Clock = Callable[[], int]  # Unix time in milliseconds


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class RefDB:
    def __init__(self, db: Database, repo_id: bytes, creator: bytes, clock: Clock = wall_clock_ms) -> None:
        self.db = db
        self.repo_id = repo_id
        self.creator = creator
        self.clock = clock
        self._members: Members | None = None
        db.ensure_schema(SCHEMA)

    # Membership -----------------------------------------------------------

    def members(self) -> Members:
        if self._members is None:
            records = []
            for row_id, record in self.db.conn.execute("SELECT id, record FROM membership"):
                try:
                    m = membership.decode(bytes(record))
                    self._check_membership_signature(m)
                except CorruptionError as exc:
                    log.warning("ignoring stored membership record %s: %s", bytes(row_id).hex()[:12], exc.message)
                    continue
                records.append(m)
            self._members = compute_members(self.creator, records)
        return self._members

    def membership_records(self) -> list[tuple[bytes, bytes]]:
        """Return (id, record) of every stored membership record, unverified."""
        return [(bytes(i), bytes(r)) for i, r in self.db.conn.execute("SELECT id, record FROM membership")]

    def change_member(self, identity: Identity, action: int, member: bytes) -> MembershipRecord:
        """Sign and store a record adding or removing `member`; the signer must be a member."""
        if identity.public_key not in self.members().current:
            raise UserError(
                "you are not a member of this repository, so you cannot change its members",
                hint="ask a member to run: p2pvc member add " + identity.public_key.hex(),
            )
        with self.db.write() as conn:
            record = MembershipRecord(
                self.repo_id, action, member, membership.ROLE_WRITER, self.next_timestamp(conn), identity.public_key
            )
            record = replace(record, signature=identity.sign(record.signing_payload()))
            conn.execute(
                "INSERT OR IGNORE INTO membership (id, record) VALUES (?, ?)", (record.id, membership.encode(record))
            )
        self._members = None
        return record

    def add_membership_verified(self, record: MembershipRecord) -> bool:
        """Insert a membership record received from elsewhere; False if already present."""
        self._check_membership_signature(record)
        self._check_clock(record.clock, f"membership record {record.id.hex()[:12]}")
        with self.db.write() as conn:
            self._fold_clock(conn, record.clock)
            cursor = conn.execute(
                "INSERT OR IGNORE INTO membership (id, record) VALUES (?, ?)", (record.id, membership.encode(record))
            )
        self._members = None
        return cursor.rowcount > 0

    def _check_membership_signature(self, record: MembershipRecord) -> None:
        if record.repo != self.repo_id:
            raise CorruptionError(f"membership record {record.id.hex()[:12]} belongs to another repository")
        if not verify(record.author, record.signature, record.signing_payload()):
            raise InvalidSignatureError(f"membership record {record.id.hex()[:12]} has an invalid signature")

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
                # Every stored row was verified when it was stored, so this is local damage. Skipping
                # it would silently move the ref back (and let gc delete what only it reached).
                raise CorruptionError(
                    f"stored ref update {bytes(row_id).hex()[:12]} of {name} is damaged: {exc.message}",
                    hint="run p2pvc fsck; restore the repository folder from a backup or clone it again from a peer",
                ) from exc
            result.append(update)
        return result

    def all_updates(self) -> list[tuple[bytes, bytes]]:
        """Return (id, record) of every stored update, unverified, for fsck and sync."""
        rows = self.db.conn.execute("SELECT id, record FROM ref_updates").fetchall()
        return [(bytes(i), bytes(r)) for i, r in rows]

    def update_ids_by_name(self) -> list[tuple[str, bytes]]:
        return [(name, bytes(i)) for name, i in self.db.conn.execute("SELECT name, id FROM ref_updates")]

    def records_for(self, names: list[str]) -> list[bytes]:
        """Return the stored records of these refs (unverified: the receiver verifies)."""
        result = []
        for name in names:
            rows = self.db.conn.execute("SELECT record FROM ref_updates WHERE name = ?", (name,))
            result.extend(bytes(r[0]) for r in rows)
        return result

    def has_update(self, update_id: bytes) -> bool:
        return self.db.conn.execute("SELECT 1 FROM ref_updates WHERE id = ?", (update_id,)).fetchone() is not None

    def has_membership(self, record_id: bytes) -> bool:
        return self.db.conn.execute("SELECT 1 FROM membership WHERE id = ?", (record_id,)).fetchone() is not None

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
        supersede_all: bool = False,
        meta: dict[str, bytes] | None = None,
    ) -> RefUpdate:
        """Write a signed update of `name` to `target`.

        `expected` is the commit the caller based its change on; when the ref's
        value differs at write time, nothing is written and ConflictError is
        raised. The check and the insert run in one IMMEDIATE transaction, so two
        processes cannot both succeed from the same starting point.

        The update supersedes only the current heads that `target` descends
        from, so an ordinary commit on a conflicted branch leaves the other
        head listed and reachable. `supersede_all` (resolving a conflict, a
        deletion) retires every current head on purpose. `meta` rows are written
        in the same transaction (the working tree's base moves with the branch).
        """
        check_ref_name(name)
        if identity.public_key not in self.members().current:
            raise UserError(
                "you are not a member of this repository, so your updates would be rejected by every peer",
                hint="show your key with p2pvc id and ask a member to run: p2pvc member add KEY; "
                "if one already has, run p2pvc sync to receive that record",
            )
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
                supersedes=_superseded(current, target, is_ancestor, supersede_all or target is None),
            )
            update = _sign(identity, update)
            self._insert(conn, update)
            for key, value in (meta or {}).items():
                self.db.set_meta(conn, key, value)
        return update

    def check_acceptable(self, update: RefUpdate) -> None:
        """Raise unless a received update verifies: repository, signature, membership, clock."""
        self._check_signature(update)
        self._check_clock(update.clock, f"ref update {update.id.hex()[:12]} of {update.name}")

    def add_verified(self, update: RefUpdate) -> bool:
        """Insert an update received from elsewhere; return False if already present."""
        self._check_signature(update)
        self._check_clock(update.clock, f"ref update {update.id.hex()[:12]} of {update.name}")
        with self.db.write() as conn:
            self._fold_clock(conn, update.clock)
            return self._insert(conn, update)

    def _check_clock(self, stamp: hlc.Timestamp, what: str) -> None:
        physical = self.clock()
        if hlc.too_far_ahead(stamp, physical):
            raise CorruptionError(
                f"{what} is stamped {(stamp.wall_ms - physical) // 1000} s ahead of this clock "
                f"(the limit is {hlc.MAX_FUTURE_SKEW_MS // 60000} minutes)",
                hint="the sender's clock is wrong; it must be fixed before its updates are accepted",
            )

    def _fold_clock(self, conn: sqlite3.Connection, stamp: hlc.Timestamp) -> None:
        """Fold a remote stamp into our clock, so our next update orders after it."""
        merged = hlc.receive(self._load_clock(conn), stamp, self.clock())
        self.db.set_meta(conn, "hlc", str(merged).encode())

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
            raise InvalidSignatureError(f"ref update {update.id.hex()[:12]} of {update.name} has an invalid signature")
        if update.author not in self.members().at(update.clock):
            raise SignatureError(
                f"ref update {update.id.hex()[:12]} of {update.name} is signed by {update.author.hex()[:16]}, "
                "who was not a member of the repository at that time"
            )


def _superseded(current: RefState | None, target: bytes | None, is_ancestor: IsAncestor, everything: bool) -> tuple[bytes, ...]:
    if current is None:
        return ()
    if everything:
        return tuple(h.id for h in current.heads)
    return tuple(
        h.id
        for h in current.heads
        if (h.target is not None and target is not None and is_ancestor(h.target, target))
        # Re-creating a deleted ref replaces its tombstone.
        or (h.target is None and current.target is None and target is not None)
    )


def _sign(identity: Identity, update: RefUpdate) -> RefUpdate:
    return replace(update, signature=identity.sign(update.signing_payload()))
