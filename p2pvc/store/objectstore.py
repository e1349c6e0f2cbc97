"""The object store: chunks and objects in packs, located through the index.

Reads verify every byte against its id before returning it, so corruption
on disk surfaces as CorruptionError naming the object, never as wrong data.

Writes go through a `WriteSession`: records are appended to a pack, and
their index rows are committed in batches after the pack is fsynced. Until
a batch is committed nothing in it is visible, so a crash at any point
leaves the index pointing only at durable, whole records.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from p2pvc.errors import CorruptionError
from p2pvc.objects import compress, model
from p2pvc.objects.ids import chunk_id, object_id
from p2pvc.store.db import BUSY_TIMEOUT_S, Database
from p2pvc.store.pack import KIND_CHUNK, PACK_MAGIC, PackAppender, PackReader, fsync_dir

PACK_TARGET_SIZE = 1024 * 1024 * 1024  # bytes; a session starts a new pack past this
BATCH_BYTES = 256 * 1024 * 1024  # stored bytes per durable batch of index rows


@dataclass(frozen=True, slots=True)
class IndexEntry:
    id: bytes
    kind: int
    pack_name: str
    offset: int
    stored_size: int
    raw_size: int
    codec: int


class ObjectStore:
    def __init__(self, root: Path, db: Database) -> None:
        self.root = root
        self.packs_dir = root / "packs"
        self.db = db
        self._reader = PackReader(self.packs_dir)
        self._local = threading.local()

    # Reads --------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        """Return a connection for this thread: sqlite3 connections must not be shared
        across threads while one of them is inside a transaction."""
        if threading.current_thread() is threading.main_thread():
            return self.db.conn
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.db.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            self._local.conn = conn
        return conn

    def entry(self, oid: bytes) -> IndexEntry | None:
        row = (
            self._conn()
            .execute(
                "SELECT o.kind, p.name, o.offset, o.stored_size, o.raw_size, o.codec "
                "FROM objects o JOIN packs p ON p.pack_id = o.pack_id WHERE o.id = ?",
                (oid,),
            )
            .fetchone()
        )
        return None if row is None else IndexEntry(oid, *row)

    def has(self, oid: bytes) -> bool:
        return self._conn().execute("SELECT 1 FROM objects WHERE id = ?", (oid,)).fetchone() is not None

    def has_many(self, ids: list[bytes]) -> set[bytes]:
        """Return the subset of `ids` in the index, with one query per 500 ids."""
        found: set[bytes] = set()
        conn = self._conn()
        for i in range(0, len(ids), 500):
            part = ids[i : i + 500]
            marks = ",".join("?" * len(part))
            found.update(bytes(r[0]) for r in conn.execute(f"SELECT id FROM objects WHERE id IN ({marks})", part))
        return found

    def entries(self, ids: Iterable[bytes]) -> dict[bytes, IndexEntry]:
        """Return the index entries of those `ids` that are stored, with one query per 500 ids."""
        unique = list(dict.fromkeys(ids))
        found: dict[bytes, IndexEntry] = {}
        conn = self._conn()
        for i in range(0, len(unique), 500):
            part = unique[i : i + 500]
            marks = ",".join("?" * len(part))
            rows = conn.execute(
                "SELECT o.id, o.kind, p.name, o.offset, o.stored_size, o.raw_size, o.codec "
                f"FROM objects o JOIN packs p ON p.pack_id = o.pack_id WHERE o.id IN ({marks})",
                part,
            )
            for row in rows:
                entry = IndexEntry(bytes(row[0]), *row[1:])
                found[entry.id] = entry
        return found

    def missing(self, ids: Iterable[bytes]) -> list[bytes]:
        return [oid for oid in ids if not self.has(oid)]

    def read_raw(self, oid: bytes) -> tuple[int, bytes]:
        """Return (kind, raw bytes) of any stored record, verified against its id."""
        entry = self.entry(oid)
        if entry is None:
            raise CorruptionError(f"object {oid.hex()} is missing from the store", expected=oid.hex())
        return entry.kind, self.read_entry(entry)

    def read_entry(self, entry: IndexEntry) -> bytes:
        return bytes(self.read_entry_view(entry))

    def read_entry_view(self, entry: IndexEntry) -> bytes | memoryview:
        """Return the same bytes as `read_entry`, as a view of the read buffer when the record is stored raw.

        Saves a copy of every raw record for callers that only write the bytes out.
        """
        header, stored = self._reader.read_view(entry.pack_name, entry.offset, entry.id, entry.stored_size)
        if header.kind != entry.kind or header.codec != entry.codec or header.raw_size != entry.raw_size:
            raise CorruptionError(
                f"object {entry.id.hex()}: pack record header disagrees with the index",
                expected=f"kind {entry.kind} codec {entry.codec} size {entry.raw_size}",
                actual=f"kind {header.kind} codec {header.codec} size {header.raw_size}",
            )
        try:
            raw = compress.decode(entry.codec, stored, entry.raw_size)
        except CorruptionError as exc:
            raise CorruptionError(f"object {entry.id.hex()}: {exc.message}") from exc
        actual = chunk_id(raw) if entry.kind == KIND_CHUNK else object_id(raw)
        if actual != entry.id:
            raise CorruptionError(
                f"{'chunk' if entry.kind == KIND_CHUNK else 'object'} {entry.id.hex()} does not match its hash",
                expected=entry.id.hex(),
                actual=actual.hex(),
                hint="run p2pvc fsck to list every damaged object",
            )
        return raw

    def get_chunk(self, cid: bytes) -> bytes:
        kind, raw = self.read_raw(cid)
        if kind != KIND_CHUNK:
            raise CorruptionError(f"{cid.hex()} is a {model.KIND_NAMES.get(kind, kind)}, not a chunk")
        return raw

    def get_object(self, oid: bytes, expected_kind: int | None = None) -> model.StoredObject:
        kind, raw = self.read_raw(oid)
        if kind == KIND_CHUNK:
            raise CorruptionError(f"{oid.hex()} is a chunk, not an object")
        try:
            return model.decode(raw, expected_kind)
        except CorruptionError as exc:
            raise CorruptionError(f"object {oid.hex()}: {exc.message}", expected=exc.expected, actual=exc.actual) from exc

    def iter_entries(self) -> Iterator[IndexEntry]:
        rows = self.db.conn.execute(
            "SELECT o.id, o.kind, p.name, o.offset, o.stored_size, o.raw_size, o.codec "
            "FROM objects o JOIN packs p ON p.pack_id = o.pack_id ORDER BY o.pack_id, o.offset"
        ).fetchall()
        for row in rows:
            yield IndexEntry(*row)

    def session(self, batch_bytes: int = BATCH_BYTES) -> WriteSession:
        return WriteSession(self, batch_bytes)

    def read_stored(self, oid: bytes) -> tuple[IndexEntry, bytes] | None:
        """Return a record's index entry and its stored (still compressed) bytes, unverified,
        for sending to a peer that verifies them itself; None if absent."""
        entry = self.entry(oid)
        if entry is None:
            return None
        _header, stored = self._reader.read(entry.pack_name, entry.offset, entry.id, entry.stored_size)
        return entry, stored

    def forget_pack(self, name: str) -> None:
        self._reader.forget(name)

    def close(self) -> None:
        self._reader.close()
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()


class WriteSession:
    """Appends new records and commits their index rows durably.

    Use it as a context manager. Leaving it normally commits what is pending.
    Leaving it by an exception drops the pending rows and truncates their
    bytes from the pack. One thread writes: the session is not thread-safe.
    """

    def __init__(self, store: ObjectStore, batch_bytes: int = BATCH_BYTES) -> None:
        self.store = store
        self.batch_bytes = batch_bytes
        self._appender: PackAppender | None = None
        self._pending: dict[bytes, tuple[int, int, int, int, int]] = {}  # id -> kind, offset, stored, raw, codec
        self._pending_bytes = 0
        self.new_bytes = 0  # raw bytes of records this session added
        self.generation = 0  # batches committed so far; see `absent`

    def __enter__(self) -> WriteSession:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.commit()
        finally:
            if self._appender is not None:
                if exc_type is not None or self._pending:
                    self._appender.discard_tail()
                self._appender.close()
                self._appender = None

    def has(self, oid: bytes) -> bool:
        return oid in self._pending or self.store.has(oid)

    @property
    def pending_records(self) -> int:
        """Records appended but not yet durable and visible; 0 right after a commit."""
        return len(self._pending)

    def has_many(self, ids: list[bytes]) -> set[bytes]:
        """Return the subset of `ids` that is stored or pending, with one query per 500 ids."""
        found = {oid for oid in ids if oid in self._pending}
        found.update(self.store.has_many([oid for oid in ids if oid not in found]))
        return found

    def absent(self, ids: list[bytes]) -> set[bytes]:
        """Return the subset of `ids` that is neither pending in this session nor in the index.

        Worker threads may call this while the session's thread appends: it only tests
        membership in the pending records and reads the index through the calling
        thread's own connection. A batch committed during the call moves ids from the
        pending records to the index, so a caller that later stores an absent id with
        `put_encoded(checked=True)` must read `generation` before this call and pass
        `checked=False` if it changed.
        """
        candidates = [oid for oid in ids if oid not in self._pending]
        return set(candidates) - self.store.has_many(candidates)

    def put_chunk(self, data: bytes | memoryview, cid: bytes | None = None) -> tuple[bytes, bool]:
        """Store a chunk unless present; return (id, whether it was new)."""
        cid = cid or chunk_id(data)
        if self.has(cid):
            return cid, False
        codec, stored = compress.encode(data)
        self.put_encoded(KIND_CHUNK, cid, len(data), codec, stored)
        return cid, True

    def put_encoded(
        self, kind: int, oid: bytes, raw_size: int, codec: int, stored: bytes, *, checked: bool = False
    ) -> bool:
        """Store an already encoded record unless present; the caller has verified `oid`.

        With `checked`, the caller has found it absent from the index already, so
        only this session's pending records need checking.
        """
        if oid in self._pending or (not checked and self.store.has(oid)):
            return False
        appender = self._ensure_appender()
        offset = appender.append(kind, codec, raw_size, oid, stored)
        self._pending[oid] = (kind, offset, len(stored), raw_size, codec)
        self._pending_bytes += len(stored)
        self.new_bytes += raw_size
        if self._pending_bytes >= self.batch_bytes:
            self.commit()
        return True

    def put_object(self, obj: model.StoredObject) -> bytes:
        oid, data = model.hash_object(obj)
        if not self.has(oid):
            codec, stored = compress.encode(data)
            self.put_encoded(obj.kind, oid, len(data), codec, stored)
        return oid

    def commit(self) -> None:
        """Make every pending record durable, then visible."""
        if not self._pending or self._appender is None:
            return
        appender = self._appender
        appender.sync()
        with self.store.db.write() as conn:
            conn.execute("UPDATE packs SET size = ? WHERE pack_id = ?", (appender.size, appender.pack_id))
            conn.executemany(
                "INSERT OR IGNORE INTO objects (id, kind, pack_id, offset, stored_size, raw_size, codec) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(oid, k, appender.pack_id, off, st, raw, codec) for oid, (k, off, st, raw, codec) in self._pending.items()],
            )
        appender.mark_durable()
        self._pending.clear()
        self._pending_bytes = 0
        self.generation += 1
        if appender.size >= PACK_TARGET_SIZE:
            appender.close()
            self._appender = None

    def _ensure_appender(self) -> PackAppender:
        if self._appender is None:
            self._appender = self._reuse_pack() or self._new_pack()
        return self._appender

    def _reuse_pack(self) -> PackAppender | None:
        rows = self.store.db.conn.execute(
            "SELECT pack_id, name, size FROM packs WHERE size < ? ORDER BY pack_id DESC LIMIT 4",
            (PACK_TARGET_SIZE,),
        ).fetchall()
        for pack_id, name, _size in rows:

            def indexed_size(pack_id: int = pack_id) -> int:
                row = self.store.db.conn.execute("SELECT size FROM packs WHERE pack_id = ?", (pack_id,)).fetchone()
                if row is None:
                    raise BlockingIOError  # removed by gc meanwhile: try another pack
                return row[0]

            try:
                appender = PackAppender(self.store.packs_dir / name, pack_id, indexed_size, new=False)
            except (BlockingIOError, FileNotFoundError):
                continue  # another process appends to it, or gc removed it
            if appender.size >= PACK_TARGET_SIZE:
                appender.close()
                continue
            return appender
        return None

    def _new_pack(self) -> PackAppender:
        self.store.packs_dir.mkdir(exist_ok=True)
        name = f"pack-{secrets.token_hex(8)}.pack"
        path = self.store.packs_dir / name
        # The file exists (locked by us) before its row, so gc never finds a row without a file;
        # a crash in between leaves an unlisted file that gc removes.
        appender = PackAppender(path, 0, len(PACK_MAGIC), new=True)
        appender.sync()
        fsync_dir(self.store.packs_dir)
        with self.store.db.write() as conn:
            cursor = conn.execute("INSERT INTO packs (name, size) VALUES (?, ?)", (name, len(PACK_MAGIC)))
        appender.pack_id = cursor.lastrowid
        return appender


def remove_file(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
