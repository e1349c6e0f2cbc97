"""The repository's SQLite database: one file holding the object index, the
ref updates, the stat cache and local settings.

SQLite runs in WAL mode with `synchronous=FULL`, so a committed transaction
survives a crash or power loss, and readers never block the one writer.
Writers wait up to `BUSY_TIMEOUT_S` for each other instead of failing.
Each layer owns its own tables and creates them through `Database.ensure_schema`.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from p2pvc.errors import StorageError

BUSY_TIMEOUT_S = 60.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS packs (
    pack_id INTEGER PRIMARY KEY,
    name    TEXT NOT NULL UNIQUE,
    size    INTEGER NOT NULL          -- bytes made durable and indexed; past this is a torn tail
);
CREATE TABLE IF NOT EXISTS objects (
    id          BLOB PRIMARY KEY,     -- 32-byte BLAKE3 id
    kind        INTEGER NOT NULL,     -- 0 chunk, else objects.model.KIND_*
    pack_id     INTEGER NOT NULL,
    offset      INTEGER NOT NULL,     -- of the record header in the pack
    stored_size INTEGER NOT NULL,     -- bytes after compression
    raw_size    INTEGER NOT NULL,
    codec       INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS objects_by_pack ON objects (pack_id, offset);
"""


class Database:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open the repository database {path}: {exc}") from exc
        self.ensure_schema(SCHEMA)

    def ensure_schema(self, script: str) -> None:
        try:
            self.conn.executescript(script)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot create tables in {self.path}: {exc}") from exc

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """Run a write transaction; BEGIN IMMEDIATE takes the write lock up front,
        so a read-then-write inside it (a compare-and-swap) cannot race another writer."""
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise self._error("cannot lock the repository database", exc) from exc
        try:
            yield self.conn
        except sqlite3.Error as exc:
            self._rollback()
            raise self._error("write to the repository database failed", exc) from exc
        except BaseException:
            self._rollback()
            raise
        try:
            self.conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            raise self._error("cannot commit to the repository database", exc) from exc

    def _rollback(self) -> None:
        # SQLite may already have rolled back (for example on a full disk); then ROLLBACK fails.
        with contextlib.suppress(sqlite3.Error):
            self.conn.execute("ROLLBACK")

    def _error(self, action: str, exc: sqlite3.Error) -> StorageError:
        if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            return StorageError(
                f"disk full while writing the repository database {self.path}; nothing was committed",
                hint="free some space (p2pvc gc removes unreachable data) and run the command again",
            )
        return StorageError(f"{action} {self.path}: {exc}")

    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """Run reads in one snapshot."""
        self.conn.execute("BEGIN")
        try:
            yield self.conn
        finally:
            self.conn.execute("COMMIT")

    def get_meta(self, key: str) -> bytes | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def set_meta(self, conn: sqlite3.Connection, key: str, value: bytes) -> None:
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def close(self) -> None:
        self.conn.close()
