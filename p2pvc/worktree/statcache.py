"""The stat cache: which manifest a working-tree file had when last read.

A row maps a path to (size, mtime, ctime, inode) and the manifest id of the
content read at that stat. A file whose stat still matches is taken as
unchanged without reading it, which keeps `status` of a large unchanged
tree down to one lstat per file.

Racy entries: a file written shortly before its row was recorded could be
rewritten in the same timestamp tick without changing its stat, so such
rows are never trusted, and the file is read again next time. How short
depends on the file system's timestamp resolution: a timestamp with a
sub-second part comes from a nanosecond-resolution file system whose clock
ticks at least every 10 ms (Linux kernel timer), so `RACY_WINDOW_FINE_NS`
is enough; a whole-second timestamp may come from one with 1 or 2 s
resolution (ext3, FAT), so `RACY_WINDOW_COARSE_NS` applies. Rows are only
written for manifests that are in the store.
"""

from __future__ import annotations

import time

from p2pvc.store.db import Database
from p2pvc.worktree.ingest import FileStat

RACY_WINDOW_FINE_NS = 50_000_000  # 50 ms: five ticks of the slowest (100 Hz) kernel timer
RACY_WINDOW_COARSE_NS = 2_000_000_000  # FAT stores modification times in 2 s steps

SCHEMA = """
CREATE TABLE IF NOT EXISTS stat_cache (
    path        BLOB PRIMARY KEY,   -- relative, b"/" separators
    size        INTEGER NOT NULL,
    mtime_ns    INTEGER NOT NULL,
    ctime_ns    INTEGER NOT NULL,
    ino         INTEGER NOT NULL,
    manifest    BLOB NOT NULL,
    recorded_ns INTEGER NOT NULL
) WITHOUT ROWID;
"""


def racy_window(stat: FileStat) -> int:
    """Return how long after a file's last change its stat cannot prove it unchanged, in ns."""
    coarse = stat.mtime_ns % 1_000_000_000 == 0 and stat.ctime_ns % 1_000_000_000 == 0
    return RACY_WINDOW_COARSE_NS if coarse else RACY_WINDOW_FINE_NS


class StatCache:
    def __init__(self, db: Database) -> None:
        self.db = db
        db.ensure_schema(SCHEMA)
        self._rows: dict[bytes, tuple[FileStat, bytes, int]] | None = None
        self._updates: dict[bytes, tuple[FileStat, bytes, int]] = {}

    def _load(self) -> dict[bytes, tuple[FileStat, bytes, int]]:
        if self._rows is None:
            self._rows = {
                bytes(path): (FileStat(size, mtime, ctime, ino), bytes(manifest), recorded)
                for path, size, mtime, ctime, ino, manifest, recorded in self.db.conn.execute(
                    "SELECT path, size, mtime_ns, ctime_ns, ino, manifest, recorded_ns FROM stat_cache"
                )
            }
        return self._rows

    def lookup(self, path: bytes, current: FileStat) -> bytes | None:
        """Return the cached manifest id if the file's stat proves it unchanged."""
        row = self._load().get(path)
        if row is None:
            return None
        cached, manifest, recorded_ns = row
        if cached != current:
            return None
        if max(current.mtime_ns, current.ctime_ns) >= recorded_ns - racy_window(current):
            return None
        return manifest

    def record(self, path: bytes, current: FileStat, manifest: bytes) -> None:
        """Remember a file's manifest; call right after the read that produced it ended."""
        self._updates[path] = (current, manifest, time.time_ns())

    def save(self, keep: set[bytes] | None = None) -> None:
        """Write recorded rows; with `keep`, also drop rows of paths not in it."""
        if keep is None and not self._updates:
            return
        with self.db.write() as conn:
            if keep is not None:
                stale = [(p,) for p in self._load() if p not in keep]
                conn.executemany("DELETE FROM stat_cache WHERE path = ?", stale)
            conn.executemany(
                "INSERT OR REPLACE INTO stat_cache VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (path, st.size, st.mtime_ns, st.ctime_ns, st.ino, manifest, recorded_ns)
                    for path, (st, manifest, recorded_ns) in self._updates.items()
                ],
            )
        self._updates.clear()
        self._rows = None
