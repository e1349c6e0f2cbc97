"""fsck: rehash every stored record, name what is damaged or missing, and optionally drop it.

A repair only drops the index rows of corrupt records and the caches that
trust them, so that sync, fetch or add can store good copies again. It
never deletes pack bytes: gc reclaims them later.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from p2pvc.errors import CorruptionError
from p2pvc.identity.keys import verify
from p2pvc.objects import model
from p2pvc.objects.model import ENTRY_DIR, ENTRY_FILE
from p2pvc.ops.maintenance import reachable
from p2pvc.progress import NULL_PROGRESS, Progress
from p2pvc.refs.records import decode_ref_update
from p2pvc.repo import Repository
from p2pvc.store.pack import KIND_CHUNK
from p2pvc.sync.state import SyncState
from p2pvc.worktree.statcache import StatCache


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
        # A pull skips the history of a commit marked complete, so no mark may outlive a
        # dropped object. The next pull walks the history once and marks the commits again.
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
    # One walk per head, so that each version learns which refs have it in their history.
    # The caches above keep each commit, tree and manifest to one read.
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
    for oid, kind in reachable(repo, [start], tolerate_missing=True):
        if kind.startswith("missing "):
            missing_kind = kind.removeprefix("missing ")
            if not (missing_kind == "chunk" and repo.history_only):
                yield oid, missing_kind
