"""fsck, gc and the storage summary."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from p2pvc.errors import CorruptionError
from p2pvc.identity.keys import verify
from p2pvc.objects import model
from p2pvc.objects.model import ENTRY_DIR, ENTRY_FILE
from p2pvc.ops.conflicts import pending_merge
from p2pvc.progress import NULL_PROGRESS, Progress
from p2pvc.refs.records import decode_ref_update
from p2pvc.repo import Repository
from p2pvc.store.objectstore import remove_file
from p2pvc.store.pack import KIND_CHUNK, PACK_MAGIC, RECORD_HEADER, fsync_dir
from p2pvc.sync.state import SyncState
from p2pvc.worktree.statcache import StatCache

# fsck ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    kind: str  # corrupt, missing, bad-signature, orphan-pack
    object: str  # hex id, pack name or ref name
    message: str
    expected: str | None = None
    actual: str | None = None
    object_kind: str | None = None  # chunk, manifest, tree or commit, for corrupt and missing objects


@dataclass
class AffectedFile:
    """A version of a file or folder that cannot be restored, because an object it needs is damaged or missing."""

    path: str  # relative, "/" separators; a folder ends in "/"
    object: str  # hex id of its manifest (file) or tree (folder)
    commits: list[str] = field(default_factory=list)  # hex ids of the commits that contain it, newest first
    refs: list[str] = field(default_factory=list)  # refs (or "HEAD") whose current head contains it
    history_refs: list[str] = field(default_factory=list)  # refs (or "HEAD") whose history contains it


@dataclass
class FsckReport:
    objects_checked: int = 0
    bytes_checked: int = 0
    commits: int = 0
    ref_updates: int = 0
    problems: list[Problem] = field(default_factory=list)
    affected: list[AffectedFile] = field(default_factory=list)
    repaired: bool = False  # whether a repair ran and found something to drop
    forgotten: int = 0  # corrupt records dropped from the index by a repair

    @property
    def ok(self) -> bool:
        return not self.problems


def fsck(repo: Repository, progress: Progress = NULL_PROGRESS, *, repair: bool = False) -> FsckReport:
    """Rehash every stored record, decode every object, verify every signature,
    and check that everything the refs reach is present.

    With `repair`, also drop the index rows of corrupt records (see
    `_forget_corrupt`). That needs the exclusive lock, like gc, because a
    writer that found a record indexed relies on it staying there.
    """
    report = FsckReport()
    with repo.lock(exclusive=repair):
        entries = list(repo.store.iter_entries())
        progress.start("checking", sum(e.stored_size for e in entries))
        try:
            for entry in entries:
                report.objects_checked += 1
                report.bytes_checked += entry.raw_size
                try:
                    raw = repo.store.read_entry(entry)
                    if entry.kind != KIND_CHUNK:
                        obj = model.decode(raw)
                        if isinstance(obj, model.Commit):
                            report.commits += 1
                            if not verify(obj.author, obj.signature, obj.signing_payload()):
                                report.problems.append(
                                    Problem("bad-signature", entry.id.hex(), "commit signature does not verify")
                                )
                except CorruptionError as exc:
                    kind_name = model.KIND_NAMES.get(entry.kind, "chunk")
                    report.problems.append(
                        Problem("corrupt", entry.id.hex(), exc.message, exc.expected, exc.actual, kind_name)
                    )
                progress.advance(entry.stored_size)
        finally:
            progress.finish()
        for update_id, record in repo.refs.all_updates():
            report.ref_updates += 1
            try:
                update = decode_ref_update(record)
                repo.refs._check_signature(update)
            except CorruptionError as exc:
                report.problems.append(Problem("bad-ref-update", update_id.hex(), exc.message))
        try:
            states = repo.ref_states()
        except CorruptionError as exc:
            report.problems.append(Problem("bad-ref-update", "-", exc.message))
            states = []
        missing: dict[bytes, tuple[str, list[str]]] = {}  # one problem per object, naming every ref that needs it
        for state in states:
            for head in state.heads:
                if head.target is None:
                    continue
                for oid, kind in _missing_reachable(repo, head.target):
                    refs = missing.setdefault(oid, (kind, []))[1]
                    if state.name not in refs:
                        refs.append(state.name)
        for oid, (kind, refs) in missing.items():
            message = f"{kind} reachable from {', '.join(refs)} is missing"
            report.problems.append(Problem("missing", oid.hex(), message, object_kind=kind))
        damaged = {bytes.fromhex(p.object) for p in report.problems if p.kind in ("corrupt", "missing")}
        if damaged:
            report.affected = _affected_files(repo, damaged)
        if repair and (report.affected or report.problems):
            report.forgotten = _forget_corrupt(repo, report)
            report.repaired = bool(report.forgotten or report.affected)
    return report


def _forget_corrupt(repo: Repository, report: FsckReport) -> int:
    """Drop the index rows of corrupt records and the stat-cache rows of the files that need a damaged object.

    A corrupt record can never be read, but while its row exists every write
    takes the object as stored and never stores a good copy. Without the row,
    the object is missing: fetch or sync gets it again from a peer, and add or
    commit stores it again from an intact file in the working tree, which
    they reread because its stat-cache row is gone. The damaged bytes stay
    in the pack until gc rewrites it. Returns the number of records dropped.
    """
    corrupt = [(bytes.fromhex(p.object),) for p in report.problems if p.kind == "corrupt"]
    manifests = [(bytes.fromhex(a.object),) for a in report.affected]
    if not corrupt and not manifests:
        return 0
    # Both create their tables if no command has yet.
    StatCache(repo.db)
    SyncState(repo.db)
    with repo.db.write() as conn:
        conn.executemany("DELETE FROM objects WHERE id = ?", corrupt)
        conn.executemany("DELETE FROM stat_cache WHERE manifest = ?", manifests)
        # A pull skips the history of a commit marked complete, so no mark may outlive
        # a dropped object; the next pull walks the history once and marks again.
        conn.execute("DELETE FROM complete_commits")
    return len(corrupt)


def _affected_files(repo: Repository, damaged: set[bytes]) -> list[AffectedFile]:
    """Return every file or folder version, in the history of every head, that needs a damaged object.

    Each distinct commit, tree and manifest is decoded once. The history is
    walked once per head, but a commit seen before costs only dictionary
    lookups, since its tree's result is cached.
    """
    heads: dict[bytes, list[str]] = {}
    for state in _ref_states_or_none(repo):
        for head in state.heads:
            if head.target is not None:
                heads.setdefault(head.target, []).append(state.name)
    name, detached = repo.head()
    if name is None and detached is not None:
        heads.setdefault(detached, []).append("HEAD")

    bad_below: dict[bytes, list[tuple[str, bytes]]] = {}  # tree id -> (relative path, object id) needing a damaged object
    bad_manifest: dict[bytes, bool] = {}
    commits: dict[bytes, model.Commit | None] = {}  # None: damaged, missing or not a commit
    found: dict[tuple[str, bytes], tuple[AffectedFile, dict[str, int]]] = {}  # value: (file, commit hex -> time)
    # One walk per head, so each version learns which refs have it in their history; the
    # caches above keep each commit, tree and manifest to one read.
    for head_id, names in heads.items():
        seen: set[bytes] = set()
        stack = [head_id]
        while stack:
            commit_id = stack.pop()
            if commit_id in seen or commit_id in damaged:
                continue  # a damaged commit is a problem of its own, and its history cannot be read
            seen.add(commit_id)
            commit = _cached_commit(repo, commit_id, commits)
            if commit is None:
                continue
            stack.extend(commit.parents)
            for path, oid in _bad_paths(repo, commit.tree, damaged, bad_below, bad_manifest):
                path = path or "/"  # the root tree itself
                affected, times = found.setdefault((path, oid), (AffectedFile(path, oid.hex()), {}))
                times[commit_id.hex()] = commit.time_ms
                for ref in names:
                    if commit_id == head_id and ref not in affected.refs:
                        affected.refs.append(ref)
                    if ref not in affected.history_refs:
                        affected.history_refs.append(ref)
    result = []
    for affected, times in found.values():
        affected.commits = sorted(times, key=lambda hex_id: times[hex_id], reverse=True)
        affected.refs.sort()
        affected.history_refs.sort()
        result.append(affected)
    return sorted(result, key=lambda a: a.path)


def _cached_commit(repo: Repository, commit_id: bytes, cache: dict[bytes, model.Commit | None]) -> model.Commit | None:
    if commit_id not in cache:
        try:
            obj = repo.store.get_object(commit_id)
        except CorruptionError:
            obj = None
        cache[commit_id] = obj if isinstance(obj, model.Commit) else None
    return cache[commit_id]


def _ref_states_or_none(repo: Repository):
    try:
        return repo.ref_states()
    except CorruptionError:
        return []  # already reported as a bad ref update


def _bad_paths(
    repo: Repository,
    tree_id: bytes,
    damaged: set[bytes],
    bad_below: dict[bytes, list[tuple[str, bytes]]],
    bad_manifest: dict[bytes, bool],
) -> list[tuple[str, bytes]]:
    """Return (path relative to the tree, object id) of each version below `tree_id` that needs a damaged object."""
    cached = bad_below.get(tree_id)
    if cached is not None:
        return cached
    if tree_id in damaged:
        bad_below[tree_id] = [("", tree_id)]
        return bad_below[tree_id]
    try:
        tree = repo.store.get_object(tree_id)
    except CorruptionError:
        tree = None
    result: list[tuple[str, bytes]] = []
    if isinstance(tree, model.Tree):
        for entry in tree.entries:
            name = os.fsdecode(entry.name)
            if entry.kind == ENTRY_DIR:
                for sub, oid in _bad_paths(repo, entry.target, damaged, bad_below, bad_manifest):
                    result.append((f"{name}/{sub}", oid))
            elif entry.kind == ENTRY_FILE and _manifest_is_bad(repo, entry.target, damaged, bad_manifest):
                result.append((name, entry.target))
    bad_below[tree_id] = result
    return result


def _manifest_is_bad(repo: Repository, manifest_id: bytes, damaged: set[bytes], bad_manifest: dict[bytes, bool]) -> bool:
    known = bad_manifest.get(manifest_id)
    if known is not None:
        return known
    if manifest_id in damaged:
        bad = True
    else:
        try:
            manifest = repo.store.get_object(manifest_id)
        except CorruptionError:
            manifest = None
        bad = isinstance(manifest, model.Manifest) and any(c.id in damaged for c in manifest.chunks)
    bad_manifest[manifest_id] = bad
    return bad


def _missing_reachable(repo: Repository, start: bytes) -> Iterator[tuple[bytes, str]]:
    """Yield (id, kind) of missing objects; a history-only clone lacks chunks by design."""
    for oid, kind in _reachable(repo, [start], tolerate_missing=True):
        if kind.startswith("missing "):
            missing_kind = kind.removeprefix("missing ")
            if not (missing_kind == "chunk" and repo.history_only):
                yield oid, missing_kind


def _reachable(repo: Repository, commits: list[bytes], *, tolerate_missing: bool = False):
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
        live = {oid for oid, _kind in _reachable(repo, gc_roots(repo))}
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

