"""gc and the storage summary; fsck is in p2pvc.ops.fsck."""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass

from p2pvc.errors import CorruptionError
from p2pvc.objects import model
from p2pvc.objects.model import ENTRY_DIR, ENTRY_FILE
from p2pvc.ops.conflicts import pending_merge
from p2pvc.progress import NULL_PROGRESS, Progress
from p2pvc.repo import Repository
from p2pvc.store.objectstore import remove_file
from p2pvc.store.pack import KIND_CHUNK, PACK_MAGIC, RECORD_HEADER, fsync_dir

# reachability -------------------------------------------------------------------


def reachable(repo: Repository, commits: list[bytes], *, tolerate_missing: bool = False):
    """Yield (id, kind name) of every commit, tree, manifest and chunk reachable from `commits`."""
    seen: set[bytes] = set()
    stack: list[tuple[bytes, str]] = [(c, "commit") for c in commits]
    while stack:
        oid, kind = stack.pop()
        if oid in seen:
            continue
        seen.add(oid)
        if not repo.store.has(oid):
            if tolerate_missing:
                yield oid, f"missing {kind}"
                continue
            raise CorruptionError(f"{kind} {oid.hex()} is reachable but missing from the store")
        yield oid, kind
        if kind == "chunk":
            continue
        try:
            obj = repo.store.get_object(oid)
        except CorruptionError:
            if tolerate_missing:
                continue
            raise
        if isinstance(obj, model.Commit):
            stack.append((obj.tree, "tree"))
            stack.extend((p, "commit") for p in obj.parents)
        elif isinstance(obj, model.Tree):
            for e in obj.entries:
                if e.kind == ENTRY_DIR:
                    stack.append((e.target, "tree"))
                elif e.kind == ENTRY_FILE:
                    stack.append((e.target, "manifest"))
        elif isinstance(obj, model.Manifest):
            stack.extend((c.id, "chunk") for c in obj.chunks)


# gc ----------------------------------------------------------------------------------


@dataclass
class GcReport:
    reachable: int = 0
    removed_objects: int = 0
    freed_bytes: int = 0
    packs_rewritten: int = 0
    orphan_packs_removed: int = 0
    dry_run: bool = False


def gc_roots(repo: Repository) -> list[bytes]:
    """Return the commits gc keeps with their history: every current head of every ref
    (including each side of a conflict) and a detached HEAD."""
    roots = []
    for state in repo.ref_states():
        roots.extend(h.target for h in state.heads if h.target is not None)
    name, head = repo.head()
    if name is None and head is not None:
        roots.append(head)
    pending = pending_merge(repo)
    if pending is not None:
        roots.append(pending.theirs)  # the second parent of a merge not committed yet
    return roots


def gc(repo: Repository, *, dry_run: bool = False, progress: Progress = NULL_PROGRESS) -> GcReport:
    report = GcReport(dry_run=dry_run)
    with repo.lock(exclusive=True):
        live = {oid for oid, _kind in reachable(repo, gc_roots(repo))}
        report.reachable = len(live)
        by_pack: dict[str, list] = {}
        for entry in repo.store.iter_entries():
            by_pack.setdefault(entry.pack_name, []).append(entry)
        for name, entries in by_pack.items():
            dead = [e for e in entries if e.id not in live]
            file_size = _file_size(repo.store.packs_dir / name)
            indexed = len(PACK_MAGIC) + sum(RECORD_HEADER.size + e.stored_size for e in entries)
            # Unindexed bytes: torn tails of crashed writers, and duplicate records that lost
            # the race to the index when two processes stored the same chunk.
            unindexed = max(0, file_size - indexed)
            if not dead and unindexed < max(WASTE_MIN_BYTES, WASTE_FRACTION * file_size):
                continue
            report.removed_objects += len(dead)
            report.freed_bytes += sum(RECORD_HEADER.size + e.stored_size for e in dead) + unindexed
            report.packs_rewritten += 1
            if not dry_run:
                _rewrite_pack(repo, name, [e for e in entries if e.id in live], [e.id for e in dead])
        report.freed_bytes += _drop_empty_packs(repo, dry_run, report)
        report.orphan_packs_removed = _remove_orphans(repo, dry_run)
    return report


WASTE_MIN_BYTES = 1024 * 1024  # unindexed bytes in a pack worth a rewrite...
WASTE_FRACTION = 0.05  # ...or this share of the pack, whichever is larger


def _file_size(path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _drop_empty_packs(repo: Repository, dry_run: bool, report: GcReport) -> int:
    """Remove registered packs that hold no indexed record (left by failed or crashed writes).

    Asks the index after the rewrites, so packs that a rewrite just filled are kept.
    """
    freed = 0
    rows = repo.db.conn.execute(
        "SELECT pack_id, name FROM packs WHERE pack_id NOT IN (SELECT DISTINCT pack_id FROM objects)"
    ).fetchall()
    for pack_id, name in rows:
        path = repo.store.packs_dir / name
        freed += _file_size(path)
        report.packs_rewritten += 1
        if dry_run:
            continue
        with repo.db.write() as conn:
            conn.execute("DELETE FROM packs WHERE pack_id = ?", (pack_id,))
        repo.store.forget_pack(name)
        remove_file(path)
    return freed


def _rewrite_pack(repo: Repository, name: str, keep: list, drop: list[bytes]) -> None:
    """Copy the live records of a pack into a new pack, switch the index, delete the old pack.

    The switch is one transaction, so a crash leaves either the old pack
    indexed (the new one is an orphan) or the new one (the old one is).
    """
    store = repo.store
    old_id = repo.db.conn.execute("SELECT pack_id FROM packs WHERE name = ?", (name,)).fetchone()[0]
    moved = []
    if keep:
        session = store.session()
        appender = session._new_pack()  # registers the pack row at its empty size
        for e in keep:
            _header, stored = store._reader.read(e.pack_name, e.offset, e.id, e.stored_size)
            offset = appender.append(e.kind, e.codec, e.raw_size, e.id, stored)
            moved.append((appender.pack_id, offset, e.id))
        appender.sync()
        new_size = appender.size
        new_id = appender.pack_id
    with repo.db.write() as conn:
        if keep:
            conn.execute("UPDATE packs SET size = ? WHERE pack_id = ?", (new_size, new_id))
            conn.executemany("UPDATE objects SET pack_id = ?, offset = ? WHERE id = ?", moved)
        conn.executemany("DELETE FROM objects WHERE id = ?", [(oid,) for oid in drop])
        conn.execute("DELETE FROM packs WHERE pack_id = ?", (old_id,))
    if keep:
        appender.close()
    store.forget_pack(name)
    remove_file(store.packs_dir / name)
    fsync_dir(store.packs_dir)


def _remove_orphans(repo: Repository, dry_run: bool) -> int:
    listed = {r[0] for r in repo.db.conn.execute("SELECT name FROM packs")}
    removed = 0
    for name in sorted(os.listdir(repo.store.packs_dir)):
        if name in listed:
            continue
        path = repo.store.packs_dir / name
        fd = os.open(path, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a writer is still creating it
            removed += 1
            if not dry_run:
                remove_file(path)
        finally:
            os.close(fd)
    return removed


# storage summary ------------------------------------------------------------------


@dataclass
class StorageSummary:
    commits: int
    head_logical_bytes: int  # files in HEAD
    history_logical_bytes: int  # files of every reachable commit, each counted in full
    unique_chunk_bytes: int  # raw bytes of distinct chunks
    stored_chunk_bytes: int  # the same chunks after compression
    pack_bytes: int  # pack files on disk
    chunks: int
    objects: int

    @property
    def dedupe_ratio(self) -> float:
        return self.history_logical_bytes / self.unique_chunk_bytes if self.unique_chunk_bytes else 1.0

    @property
    def compression_ratio(self) -> float:
        return self.unique_chunk_bytes / self.stored_chunk_bytes if self.stored_chunk_bytes else 1.0


def storage_summary(repo: Repository) -> StorageSummary:
    with repo.lock():
        conn = repo.db.conn
        chunks, raw, stored = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(raw_size), 0), COALESCE(SUM(stored_size), 0) FROM objects WHERE kind = ?",
            (KIND_CHUNK,),
        ).fetchone()
        objects = conn.execute("SELECT COUNT(*) FROM objects WHERE kind != ?", (KIND_CHUNK,)).fetchone()[0]
        pack_bytes = sum(
            (repo.store.packs_dir / n).stat().st_size
            for n in os.listdir(repo.store.packs_dir)
            if n.endswith(".pack")
        )
        _name, head = repo.head()
        head_logical = _tree_size(repo, head) if head else 0
        history = 0
        commits = 0
        roots = gc_roots(repo)
        if roots:
            for info in repo.walk_commits(roots):
                commits += 1
                history += _tree_size(repo, info.id)
    return StorageSummary(commits, head_logical, history, raw, stored, pack_bytes, chunks, objects)


def _tree_size(repo: Repository, commit_id: bytes) -> int:
    tree = repo.read_tree(repo.read_commit(commit_id).commit.tree)
    return sum(e.size for e in tree.entries if e.kind != model.ENTRY_SYMLINK)

