"""Three-way merge of another commit into the working tree's commit, and the merge commit.

Theory of operation.

*Ours and theirs.* Ours is the commit the working tree is based on. That
is HEAD's commit, or, on a conflicted branch, whichever of its heads this
working tree was checked out at. Theirs is the named revision, or, without
one, the other head of the conflicted branch.

*Merge base.* The lowest common ancestors of ours and theirs in the commit
graph: common ancestors that are not an ancestor of another common
ancestor. After criss-cross merges there can be several. The merge then
uses the one with the latest commit time, and the greater commit id on a
tie, so every replica picks the same base. Without a common ancestor the base is
the empty tree, so every file from both sides is kept, and a path with
different content on both sides is a both-changed conflict.

*Per path* (files and symlinks; folders follow from what they contain,
and empty folders merge by presence):

* the same on both sides, or changed on one side only: that version;
* changed on both sides, text (valid UTF-8, no NUL in the first 8 KiB, at
  most 8 MiB, on every side): merged line by line
  (`p2pvc.worktree.merge3`), with conflict markers where edits overlap;
* changed on both sides otherwise (a checkpoint, a symlink, a file that
  became a symlink): ours stays in place and theirs is written beside it
  as `NAME.theirs-<12 hex of their commit>.EXT`
  (`merge3.conflict_copy_name`). A path whose name already marks it as
  such a copy is never copied again: ours is kept and the result notes it;
* removed on one side and changed on the other: the changed version is
  kept, and the result notes it. A merge never loses an edit;
* a file on one side where the other side has a folder: the file keeps the
  name its side gave it when that side is ours; otherwise the incoming
  entry gets the conflict-copy name (the whole folder, for a folder).

If any text conflict remains, the merged files are written to the working
tree with their markers, nothing is committed, and the pending merge is
stored (`p2pvc.ops.conflicts.PendingMerge`), and `continue_merge` commits it
once the user has edited the files. Otherwise the merge commit is written
with parents (ours, theirs), signed like any commit, and the ref update
supersedes both heads because the merge commit descends from both. A merge
therefore never makes a commit unreachable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from p2pvc.errors import ConflictError, CorruptionError, UserError
from p2pvc.objects import model
from p2pvc.objects.chunker import chunk_bytes
from p2pvc.objects.model import ENTRY_DIR, ENTRY_FILE
from p2pvc.ops.conflicts import (
    CLEARED_MERGE_META,
    PendingMerge,
    clear_pending_merge,
    pending_merge,
    require_no_pending_merge,
    save_pending_merge,
)

# The helpers below are private to worktree_ops. A merge commit captures the working tree
# the same way as a commit, so sharing them keeps the two paths identical.
from p2pvc.ops.worktree_ops import CommitResult, _capture, _check_commit_fields, _require_content, apply_plan, commit_tree
from p2pvc.progress import NULL_PROGRESS, Progress
from p2pvc.refs.records import BRANCH_PREFIX
from p2pvc.repo import Repository
from p2pvc.store.objectstore import WriteSession
from p2pvc.sync.state import SyncState
from p2pvc.worktree import checkout as co
from p2pvc.worktree import merge3
from p2pvc.worktree.changes import compare, state_of
from p2pvc.worktree.scan import scan
from p2pvc.worktree.snapshot import FlatState
from p2pvc.worktree.trees import build, flatten

Entry = tuple[int, bool, bytes, int]  # kind, executable, target, size
FOLDER: Entry = (ENTRY_DIR, False, b"", 0)  # build() fills in a folder's tree id and size

# Merge base -------------------------------------------------------------------------------


def merge_bases(repo: Repository, a: bytes, b: bytes) -> list[bytes]:
    """Return every lowest common ancestor of commits a and b (empty for unrelated histories).

    Commits whose objects are not stored (a history still being fetched)
    end the walk, as in `Repository.is_ancestor`.
    """
    common = _ancestors(repo, a) & _ancestors(repo, b)
    # Common ancestors form a closed set, so one that is a parent of another common
    # ancestor is an ancestor of it, and not a lowest one.
    parents_of_common = {p for c in common for p in repo.read_commit(c).commit.parents}
    return [c for c in common if c not in parents_of_common]


def merge_base(repo: Repository, a: bytes, b: bytes) -> bytes | None:
    """Return the merge base: the lowest common ancestor with the latest commit time, then the greatest id."""
    bases = merge_bases(repo, a, b)
    if not bases:
        return None
    return max(bases, key=lambda c: (repo.read_commit(c).commit.time_ms, c))


def _ancestors(repo: Repository, start: bytes) -> set[bytes]:
    # NOTE: this walks the whole history below `start`, which is fine for thousands of
    # commits. A repository with a very long history would need generation numbers here.
    seen = {start}
    stack = [start]
    while stack:
        oid = stack.pop()
        if not repo.store.has(oid):
            seen.discard(oid)
            continue
        for parent in repo.read_commit(oid).commit.parents:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


# Tree merge (pure) ------------------------------------------------------------------------


@dataclass(frozen=True)
class BothChanged:
    """A file or symlink that both sides changed differently since the base."""

    path: bytes
    base: Entry | None
    ours: Entry
    theirs: Entry
    executable: bool  # the merged executable bit, for a merged text file


@dataclass(frozen=True)
class Note:
    path: bytes
    text: str


@dataclass
class TreePlan:
    entries: FlatState  # files and symlinks of the result (ours at a both-changed path, until its content is merged)
    both_changed: list[BothChanged]
    notes: list[Note]


def _key(entry: Entry | None) -> tuple[int, bool, bytes] | None:
    return None if entry is None else entry[:3]


def _leaves(state: FlatState) -> FlatState:
    return {path: entry for path, entry in state.items() if entry[0] != ENTRY_DIR}


def plan_tree_merge(base: FlatState, ours: FlatState, theirs: FlatState) -> TreePlan:
    """Decide every file and symlink path that needs no content comparison, and list the rest as both-changed."""
    base_leaves, our_leaves, their_leaves = _leaves(base), _leaves(ours), _leaves(theirs)
    plan = TreePlan({}, [], [])
    for path in sorted(base_leaves.keys() | our_leaves.keys() | their_leaves.keys()):
        b, o, t = base_leaves.get(path), our_leaves.get(path), their_leaves.get(path)
        if _key(o) == _key(t) or _key(t) == _key(b):
            chosen = o
        elif _key(o) == _key(b):
            chosen = t
        elif o is None or t is None:
            chosen = o or t
            side = "our" if o is None else "their"
            plan.notes.append(Note(path, f"removed on {side} side and changed on the other: kept the changed version"))
        elif o[0] == t[0] == ENTRY_FILE and o[2] == t[2]:
            # Same content, different executable bits: merge the bit alone.
            chosen = (ENTRY_FILE, _merged_flag(b, o, t), o[2], o[3])
        else:
            plan.both_changed.append(BothChanged(path, b, o, t, _merged_flag(b, o, t)))
            chosen = o
        if chosen is not None:
            plan.entries[path] = chosen
    return plan


def _merged_flag(base: Entry | None, ours: Entry, theirs: Entry) -> bool:
    """Merge the executable bit three ways. Ours wins when both sides changed it."""
    if ours[1] == theirs[1] or base is None or ours[1] != base[1]:
        return ours[1]
    return theirs[1]


def merged_folders(base: FlatState, ours: FlatState, theirs: FlatState, entries: FlatState) -> set[bytes]:
    """Return the folders of the result: parents of its entries, and empty folders merged by presence."""
    folders: set[bytes] = set()
    for path in entries:
        folders.update(_parent_folders(path))
    for path in {p for state in (base, ours, theirs) for p, e in state.items() if e[0] == ENTRY_DIR}:
        present = [state.get(path, (0,))[0] == ENTRY_DIR for state in (base, ours, theirs)]
        b, o, t = present
        keep = o if o == t or t == b else t
        if keep and path not in entries and not any(parent in entries for parent in _parent_folders(path)):
            folders.add(path)
    return folders


def _parent_folders(path: bytes) -> list[bytes]:
    parts = path.split(b"/")
    return [b"/".join(parts[:i]) for i in range(1, len(parts))]


def copy_path(path: bytes, their_hex: str, occupied: FlatState) -> bytes:
    """Return the first free conflict-copy path for `path` (see `merge3.conflict_copy_name`)."""
    folder, slash, name = path.rpartition(b"/")
    attempt = 1
    while True:
        candidate = folder + slash + merge3.conflict_copy_name(name, their_hex, attempt)
        if candidate not in occupied and not any(p.startswith(candidate + b"/") for p in occupied):
            return candidate
        attempt += 1


def settle_collisions(entries: FlatState, ours: FlatState, their_hex: str) -> list[Note]:
    """Move entries out of the way where a file and a folder claim the same path.

    Ours keeps its name. The entry that came from their side moves to the
    conflict-copy name, and a folder moves with everything below it.
    """
    notes = []
    files = {path for path, entry in entries.items() if entry[0] != ENTRY_DIR}
    blocked = sorted({parent for path in files for parent in _parent_folders(path) if parent in files})
    for path in blocked:
        if path not in entries:
            continue  # moved with a folder above it
        below = [p for p in entries if p.startswith(path + b"/")]
        if _key(entries[path]) == _key(ours.get(path)):
            target = copy_path(path, their_hex, entries)
            for old in below:
                entries[target + old[len(path) :]] = entries.pop(old)
            notes.append(Note(path, f"a file here and a folder on their side: their folder is at {os.fsdecode(target)}"))
        else:
            target = copy_path(path, their_hex, entries)
            entries[target] = entries.pop(path)
            notes.append(Note(path, f"a folder here and a file on their side: their file is at {os.fsdecode(target)}"))
    return notes


# Content -----------------------------------------------------------------------------------


@dataclass
class ContentOutcome:
    merged: list[bytes] = field(default_factory=list)  # merged line by line, no conflict left
    conflicts: list[bytes] = field(default_factory=list)  # written with conflict markers
    copies: list[tuple[bytes, bytes]] = field(default_factory=list)  # (path, where their version went)
    notes: list[Note] = field(default_factory=list)


def _read_file(repo: Repository, entry: Entry | None) -> bytes | None:
    """Return a file's content if it is small enough to merge as text, else None."""
    if entry is None or entry[0] != ENTRY_FILE or entry[3] > merge3.MAX_TEXT_MERGE_BYTES:
        return None
    manifest = repo.read_manifest(entry[2])
    return b"".join(repo.store.get_chunk(c.id) for c in manifest.chunks)


def _store_file(session: WriteSession, data: bytes) -> tuple[bytes, int]:
    """Store bytes as a file's chunks and manifest, and return (manifest id, size)."""
    refs = []
    for piece in chunk_bytes(data):
        cid, _new = session.put_chunk(piece)
        refs.append(model.ChunkRef(cid, len(piece)))
    return session.put_object(model.Manifest(len(data), tuple(refs))), len(data)


def _text_versions(repo: Repository, item: BothChanged) -> tuple[bytes, bytes, bytes] | None:
    """Return (base, ours, theirs) contents when all of them are text, else None."""
    if item.ours[0] != ENTRY_FILE or item.theirs[0] != ENTRY_FILE:
        return None
    ours = _read_file(repo, item.ours)
    theirs = _read_file(repo, item.theirs)
    if ours is None or theirs is None or not merge3.is_text(ours) or not merge3.is_text(theirs):
        return None
    base = b""
    if item.base is not None and item.base[0] == ENTRY_FILE:
        base_content = _read_file(repo, item.base)
        if base_content is None or not merge3.is_text(base_content):
            return None
        base = base_content
    return base, ours, theirs


def merge_contents(
    repo: Repository, session: WriteSession, plan: TreePlan, their_hex: str, their_label: str
) -> ContentOutcome:
    """Resolve every both-changed path: merge text, or keep ours and copy theirs beside it."""
    outcome = ContentOutcome()
    for item in plan.both_changed:
        versions = _text_versions(repo, item)
        if versions is not None:
            merged = merge3.merge_text(*versions, ours_label="HEAD", theirs_label=their_label)
            manifest_id, size = _store_file(session, merged.data)
            plan.entries[item.path] = (ENTRY_FILE, item.executable, manifest_id, size)
            (outcome.conflicts if merged.conflicts else outcome.merged).append(item.path)
            continue
        name = item.path.rpartition(b"/")[2]
        if merge3.is_conflict_copy(name):
            outcome.notes.append(
                Note(item.path, "changed on both sides and already a conflict copy: kept ours, theirs stays in their commit")
            )
            continue
        target = copy_path(item.path, their_hex, plan.entries)
        plan.entries[target] = item.theirs
        outcome.copies.append((item.path, target))
    return outcome


# The merge ------------------------------------------------------------------------------------


@dataclass
class MergeResult:
    status: str  # "up-to-date", "fast-forward", "merged" or "conflicts"
    ref: str | None  # the branch HEAD follows, or None when detached
    ours: bytes
    theirs: bytes
    base: bytes | None = None
    commit: bytes | None = None  # the merge commit, or HEAD's new commit after a fast-forward
    merged: list[bytes] = field(default_factory=list)
    conflicts: list[bytes] = field(default_factory=list)
    copies: list[tuple[bytes, bytes]] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    was_conflicted: bool = False  # the branch had divergent heads before the merge
    still_conflicted: bool = False  # it still has (another head was not part of this merge)
    applied: co.ApplyResult | None = None


def merge(repo: Repository, rev: str | None, *, message: str | None = None, progress: Progress = NULL_PROGRESS) -> MergeResult:
    """Merge `rev` (default: the other head of the conflicted branch) into the working tree's commit."""
    _check_commit_fields(message or "", {})
    repo.require_member()
    require_no_pending_merge(repo)
    with repo.lock():
        ref, winner = repo.head()
        ours = our_commit(repo, ref, winner)
        theirs, label = _their_commit(repo, rev, ref, ours)
        state_before = repo.ref_state(ref) if ref else None
        result = MergeResult("up-to-date", ref, ours, theirs, was_conflicted=bool(state_before and state_before.conflicted))
        if repo.is_ancestor(theirs, ours):
            result.still_conflicted = result.was_conflicted
            return result
        _require_content(repo, ours, "HEAD")
        _require_content(repo, theirs, label)
        ours_state = state_of(commit_tree(repo, ours))
        work = _clean_work_state(repo, ours_state, progress)
        if repo.is_ancestor(ours, theirs):
            result.status = "fast-forward"
            result.commit = theirs
            target_state = state_of(commit_tree(repo, theirs))
            result.applied = _publish(repo, ref, winner, theirs, ours_state, work, target_state, progress)
        else:
            _three_way(repo, result, label, ours_state, work, message, winner, progress)
    if ref is not None:
        after = repo.ref_state(ref)
        result.still_conflicted = bool(after and after.conflicted)
    return result


def our_commit(repo: Repository, ref: str | None, winner: bytes | None) -> bytes:
    """Return the commit the working tree is based on, if a merge may build on it."""
    if winner is None:
        raise UserError(f"HEAD ({ref}) has no commits yet", hint="commit first, or check out the revision instead")
    base = repo.worktree_base()
    if base == winner:
        return winner
    state = repo.ref_state(ref) if ref else None
    if base is not None and state is not None and base in {h.target for h in state.heads}:
        return base  # the working tree is at the head that lost the last-writer race of a conflict
    short = (ref or "HEAD").removeprefix(BRANCH_PREFIX)
    raise ConflictError(
        f"{short} moved to {winner.hex()[:12]} (from a peer) after this working tree was checked out "
        f"at {base.hex()[:12] if base else 'nothing'}",
        hint=f"run p2pvc checkout {short} to bring it in, then merge",
    )


def _their_commit(repo: Repository, rev: str | None, ref: str | None, ours: bytes) -> tuple[bytes, str]:
    if rev is not None:
        return repo.resolve(rev), rev
    state = repo.ref_state(ref) if ref else None
    if state is None or not state.conflicted:
        raise UserError("name the revision to merge", hint="run p2pvc merge BRANCH_OR_COMMIT (p2pvc conflicts lists divergent heads)")
    others = list(dict.fromkeys(h.target for h in state.heads if h.target not in (ours, None)))
    if any(h.target is None for h in state.heads):
        raise UserError(
            f"{state.name} was deleted on one side and changed on the other",
            hint=f"keep it with p2pvc resolve {state.name} --take {ours.hex()[:12]}, or delete it with p2pvc branch -d",
        )
    if len(others) != 1:
        listed = ", ".join(o.hex()[:12] for o in others)
        raise UserError(f"{state.name} has {len(others)} other heads: {listed}", hint="merge them one at a time: p2pvc merge COMMIT")
    return others[0], others[0].hex()[:12]


def _clean_work_state(repo: Repository, ours_state: FlatState, progress: Progress) -> FlatState:
    """Return the working tree's state, and raise ConflictError if it differs from ours, because a merge writes over it."""
    scanned = scan(repo.worktree)
    work = _capture(repo, scanned, {}, store_content=False, progress=progress, label="checking").flat
    changes = compare(ours_state, work)
    if changes:
        raise ConflictError(
            f"the working tree has uncommitted changes in {len(changes)} path(s), first: "
            f"{os.fsdecode(changes[0].path)}",
            hint="commit them first (p2pvc commit -m MSG), then merge",
        )
    return work


def _three_way(
    repo: Repository,
    result: MergeResult,
    label: str,
    ours_state: FlatState,
    work: FlatState,
    message: str | None,
    winner: bytes | None,
    progress: Progress,
) -> None:
    their_hex = result.theirs.hex()
    result.base = merge_base(repo, result.ours, result.theirs)
    base_state = state_of(commit_tree(repo, result.base)) if result.base else {}
    their_state = state_of(commit_tree(repo, result.theirs))
    plan = plan_tree_merge(base_state, ours_state, their_state)
    with repo.store.session() as session:
        outcome = merge_contents(repo, session, plan, their_hex, label)
        notes = plan.notes + outcome.notes + settle_collisions(plan.entries, ours_state, their_hex)
        final = dict(plan.entries)
        for folder in merged_folders(base_state, ours_state, their_state, final):
            final[folder] = FOLDER
        tree_id = build(final, session.put_object)
    result.merged, result.conflicts, result.copies, result.notes = outcome.merged, outcome.conflicts, outcome.copies, notes
    if outcome.conflicts:
        result.status = "conflicts"
        the_plan = co.plan(ours_state, work, final, force=False)
        _require_unblocked(the_plan)
        # Recorded before any file changes, so an interrupted write can still be aborted or continued.
        save_pending_merge(repo, PendingMerge(result.ours, result.theirs, tree_id, label, tuple(outcome.conflicts)))
        result.applied = apply_plan(repo, the_plan, progress)
        return
    where = (result.ref or "HEAD").removeprefix(BRANCH_PREFIX)
    commit_id = _write_commit(repo, tree_id, (result.ours, result.theirs), message or f"Merge {label} into {where}", {})
    result.status = "merged"
    result.commit = commit_id
    result.applied = _publish(repo, result.ref, winner, commit_id, ours_state, work, final, progress)


def _write_commit(repo: Repository, tree_id: bytes, parents: tuple[bytes, ...], message: str, metadata: dict[str, str]) -> bytes:
    unsigned = model.Commit(
        tree=tree_id,
        parents=parents,
        author=repo.identity.public_key,
        time_ms=repo.clock(),
        message=message,
        metadata=tuple(sorted(metadata.items())),
    )
    with repo.store.session() as session:
        commit_id = session.put_object(repo.sign_commit(unsigned))
    sync_state = SyncState(repo.db)
    if all(sync_state.is_complete(p) for p in parents):
        sync_state.mark_complete([commit_id])  # its own tree is stored, and both parents are complete
    return commit_id


def _publish(
    repo: Repository,
    ref: str | None,
    winner: bytes | None,
    target: bytes,
    ours_state: FlatState,
    work: FlatState,
    target_state: FlatState,
    progress: Progress,
) -> co.ApplyResult:
    """Move HEAD's ref (or a detached HEAD) to `target` and make the working tree match it."""
    # Plan before the ref moves, so an untracked file in the way stops the merge with nothing written.
    the_plan = co.plan(ours_state, work, target_state, force=False)
    _require_unblocked(the_plan)
    if ref is not None:
        # The new commit descends from every head it merged, so the update supersedes exactly
        # those by ancestry. supersede_all would also retire a head that a peer delivered after
        # this merge read the ref, and that commit would become unreachable.
        repo.set_ref(ref, target, expected=winner)
    else:
        repo.set_head(target)
    # The base moves only after the files are written. After a crash in between, the next
    # commit is refused (the branch moved) instead of recording the old files over the merge.
    applied = apply_plan(repo, the_plan, progress)
    repo.set_worktree_base(target)
    return applied


def _require_unblocked(the_plan: co.Plan) -> None:
    if the_plan.blocked:
        path, reason = the_plan.blocked[0]
        raise ConflictError(
            f"the merge would overwrite {len(the_plan.blocked)} path(s) in the working tree, first: "
            f"{os.fsdecode(path)} ({reason})",
            hint="move those files away, then merge again",
        )


# Finishing or dropping a merge that stopped with conflicts ----------------------------------


def continue_merge(
    repo: Repository, message: str | None = None, metadata: dict[str, str] | None = None, *, progress: Progress = NULL_PROGRESS
) -> CommitResult:
    """Commit the working tree as the merge commit of the pending merge (parents: ours, theirs)."""
    pending = pending_merge(repo)
    if pending is None:
        raise UserError("no merge is in progress", hint="start one with p2pvc merge REV")
    metadata = dict(metadata or {})
    _check_commit_fields(message or "", metadata)
    repo.require_member()
    with repo.lock():
        ref, winner = repo.head()
        current = our_commit(repo, ref, winner)
        if current != pending.ours:
            raise ConflictError(
                f"the working tree moved to {current.hex()[:12]} since the merge started at {pending.ours.hex()[:12]}",
                hint="p2pvc merge --abort, then merge again",
            )
        ours_flat = commit_tree(repo, pending.ours)
        captured = _capture(repo, scan(repo.worktree), ours_flat, store_content=True, progress=progress, label="storing")
        unresolved = [p for p in pending.conflicts if _has_markers(repo, captured.flat.get(p))]
        if unresolved:
            raise ConflictError(
                f"{len(unresolved)} file(s) still contain conflict markers, first: {os.fsdecode(unresolved[0])}",
                hint="edit them to keep the lines you want and delete the <<<<<<< ======= >>>>>>> lines, then commit again",
            )
        where = (ref or "HEAD").removeprefix(BRANCH_PREFIX)
        assert captured.tree_id is not None
        commit_id = _write_commit(
            repo, captured.tree_id, (pending.ours, pending.theirs), message or f"Merge {pending.label} into {where}", metadata
        )
        # The working tree already contains the merge commit's content, so the branch, the
        # working tree's base and the end of the pending merge move in one transaction.
        if ref is not None:
            repo.refs.set(
                repo.identity,
                ref,
                commit_id,
                expected=winner,
                is_ancestor=repo.is_ancestor,
                meta={"worktree": commit_id, **CLEARED_MERGE_META},
            )
        else:
            repo.set_head(commit_id, worktree_base=commit_id)
            clear_pending_merge(repo)
    files = [s for s in captured.flat.values() if s[0] == ENTRY_FILE]
    return CommitResult(
        id=commit_id,
        ref=ref,
        parents=(pending.ours, pending.theirs),
        files=len(files),
        logical_bytes=sum(s[3] for s in files),
        new_bytes=captured.new_bytes,
        files_read=captured.files_read,
        changes=compare(state_of(ours_flat), captured.flat),
    )


def _has_markers(repo: Repository, entry: Entry | None) -> bool:
    content = _read_file(repo, entry)
    return content is not None and merge3.has_conflict_markers(content)


def abort_merge(repo: Repository, *, progress: Progress = NULL_PROGRESS) -> co.ApplyResult:
    """Drop the pending merge and put the working tree back to ours, discarding edits made for it."""
    pending = pending_merge(repo)
    if pending is None:
        raise UserError("no merge is in progress")
    with repo.lock():
        if repo.worktree_base() != pending.ours:
            # A commit was made since the merge stopped, by a p2pvc that does not know about
            # pending merges. The working tree belongs to that commit now, so leave it alone.
            clear_pending_merge(repo)
            return co.ApplyResult()
        ours_state = state_of(commit_tree(repo, pending.ours))
        try:
            written = state_of(flatten(repo.read_tree, pending.tree))
        except CorruptionError:
            # If gc removed the merge's tree, treat every path either side has as written by the merge.
            written = {**state_of(commit_tree(repo, pending.theirs)), **ours_state}
        work = _capture(repo, scan(repo.worktree), {}, store_content=False, progress=progress, label="checking").flat
        applied = apply_plan(repo, co.plan(written, work, ours_state, force=True), progress)
        clear_pending_merge(repo)
        repo.set_worktree_base(pending.ours)
    return applied
