"""Commands that read or change the working tree: commit, add, status, checkout, restore."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from p2pvc.errors import ConflictError, CorruptionError, P2pvcError, UserError
from p2pvc.objects import model
from p2pvc.progress import NULL_PROGRESS, Progress
from p2pvc.refs.records import BRANCH_PREFIX
from p2pvc.ops.conflicts import pending_merge
from p2pvc.repo import Repository
from p2pvc.sync.state import SyncState
from p2pvc.worktree import checkout as co
from p2pvc.worktree.changes import Change, compare, state_of
from p2pvc.worktree.ingest import Ingester
from p2pvc.worktree.scan import ScanResult, scan
from p2pvc.worktree.snapshot import Capture, bytes_to_read, capture
from p2pvc.worktree.statcache import StatCache
from p2pvc.worktree.trees import FlatTree, build, flatten, select_paths


def head_tree(repo: Repository) -> tuple[str | None, bytes | None, FlatTree]:
    ref, head_id = repo.head()
    if head_id is None:
        return ref, None, {}
    tree = repo.read_commit(head_id).commit.tree
    return ref, head_id, flatten(repo.read_tree, tree)


def base_tree(repo: Repository) -> tuple[bytes | None, FlatTree]:
    """Return the commit the working tree is based on, and its tree."""
    base = repo.worktree_base()
    if base is None or not repo.store.has(base):
        return None, {}
    return base, commit_tree(repo, base)


def commit_tree(repo: Repository, commit_id: bytes) -> FlatTree:
    return flatten(repo.read_tree, repo.read_commit(commit_id).commit.tree)


def _capture(
    repo: Repository,
    result: ScanResult,
    previous: FlatTree,
    *,
    store_content: bool,
    progress: Progress,
    label: str,
) -> Capture:
    cache = StatCache(repo.db)
    total = bytes_to_read(result, cache)
    progress.start(label, total)
    try:
        with repo.store.session() as session, Ingester(session if store_content else None, progress=progress.advance) as ingester:
            captured = capture(
                repo.worktree, result, previous, repo.store, cache, ingester, session if store_content else None
            )
            if store_content:
                captured.tree_id = build(captured.flat, session.put_object)
        if store_content:
            # Index rows are durable now (the session committed on exit), so the cache may name them.
            cache.save(keep={p for p, e in result.entries.items() if e.kind == model.ENTRY_FILE})
        else:
            cache.save()  # rows refreshed for files whose content is already stored
    finally:
        progress.finish()
    return captured


@dataclass
class CommitResult:
    id: bytes
    ref: str | None
    parents: tuple[bytes, ...]
    files: int
    logical_bytes: int
    new_bytes: int  # raw bytes of chunks this commit added to the store
    files_read: int
    changes: list[Change]


def commit(
    repo: Repository,
    message: str,
    metadata: dict[str, str] | None = None,
    *,
    allow_empty: bool = False,
    progress: Progress = NULL_PROGRESS,
) -> CommitResult:
    if pending_merge(repo) is not None:
        from p2pvc.ops.merge import continue_merge  # p2pvc.ops.merge imports this module

        return continue_merge(repo, message, metadata, progress=progress)
    if not message.strip():
        raise UserError("the commit message is empty", hint='say what changed with -m "..."')
    metadata = dict(metadata or {})
    _check_commit_fields(message, metadata)
    repo.require_member()
    with repo.lock():
        ref, head_id, head_flat = head_tree(repo)
        base = repo.worktree_base()
        if head_id is not None and base != head_id:
            short = (ref or "HEAD").removeprefix("refs/heads/")
            raise ConflictError(
                f"{short} moved to {head_id.hex()[:12]} (from a peer) after this working tree was checked out "
                f"at {base.hex()[:12] if base else 'nothing'}; committing now would undo that change",
                hint=f"run p2pvc checkout {short} to bring it in (uncommitted changes to other files are kept), then commit",
            )
        scanned = scan(repo.worktree)
        captured = _capture(repo, scanned, head_flat, store_content=True, progress=progress, label="storing")
        changes = compare(state_of(head_flat), captured.flat)
        if head_id is not None and not changes and not allow_empty:
            raise UserError("nothing to commit: the working tree matches HEAD", hint="use --allow-empty to commit anyway")
        unsigned = model.Commit(
            tree=captured.tree_id,
            parents=(head_id,) if head_id else (),
            author=repo.identity.public_key,
            time_ms=repo.clock(),
            message=message,
            metadata=tuple(sorted(metadata.items())),
        )
        signed = repo.sign_commit(unsigned)
        with repo.store.session() as session:
            commit_id = session.put_object(signed)
        SyncState(repo.db).mark_complete([commit_id])  # built from stored objects: nothing to fetch
        # Objects first, ref last: the ref never names anything that is not durable.
        # The branch and the working tree's base move in one transaction: a crash between
        # two writes would leave the next commit refused as if a peer had moved the branch.
        if ref is not None:
            repo.set_ref(ref, commit_id, expected=head_id, worktree_base=commit_id)
        else:
            repo.set_head(commit_id, worktree_base=commit_id)
    files = [s for s in captured.flat.values() if s[0] == model.ENTRY_FILE]
    return CommitResult(
        id=commit_id,
        ref=ref,
        parents=signed.parents,
        files=len(files),
        logical_bytes=sum(s[3] for s in files),
        new_bytes=captured.new_bytes,
        files_read=captured.files_read,
        changes=changes,
    )


def _check_commit_fields(message: str, metadata: dict[str, str]) -> None:
    """Reject a message or metadata that the commit format cannot hold, before anything is stored."""
    size = len(message.encode("utf-8", "surrogatepass"))
    if size > model.MAX_MESSAGE_BYTES:
        raise UserError(f"commit message of {size} bytes is longer than the limit of {model.MAX_MESSAGE_BYTES}")
    if len(metadata) > model.MAX_METADATA_ITEMS:
        raise UserError(f"{len(metadata)} metadata items exceed the limit of {model.MAX_METADATA_ITEMS}")
    for key, value in metadata.items():
        try:
            model.check_metadata_item(key, value)
        except CorruptionError as exc:
            raise UserError(
                f"invalid --meta {key}={value[:40]}: {exc.message}",
                hint=f"keys are 1 to {model.MAX_METADATA_KEY_BYTES} bytes without '=', values at most "
                f"{model.MAX_METADATA_VALUE_BYTES} bytes",
            ) from exc


@dataclass
class AddResult:
    files: int
    files_read: int
    new_bytes: int


def add(repo: Repository, paths: list[str], progress: Progress = NULL_PROGRESS) -> AddResult:
    """Store the content of `paths` now, so the next commit only records it."""
    rel = [relative_path(repo, p) for p in paths]
    with repo.lock():
        _ref, _head, head_flat = head_tree(repo)
        scanned = scan(repo.worktree, only=rel)
        missing = [p for p in rel if p and p not in scanned.entries]  # b"" is the root, always there
        if missing:
            raise UserError(f"path not found or ignored: {os.fsdecode(missing[0])}")
        captured = _capture(repo, scanned, head_flat, store_content=True, progress=progress, label="storing")
    files = sum(1 for e in scanned.entries.values() if e.kind == model.ENTRY_FILE)
    return AddResult(files, captured.files_read, captured.new_bytes)


@dataclass
class Status:
    ref: str | None
    head: bytes | None
    changes: list[Change]
    skipped: list[tuple[bytes, str]] = field(default_factory=list)
    conflicted_refs: list[str] = field(default_factory=list)
    base: bytes | None = None  # the commit the working tree is based on; differs from head after a peer moved it


def status(repo: Repository, progress: Progress = NULL_PROGRESS) -> Status:
    with repo.lock():
        ref, head_id = repo.head()
        base, base_flat = base_tree(repo)
        scanned = scan(repo.worktree)
        captured = _capture(repo, scanned, base_flat, store_content=False, progress=progress, label="hashing")
    changes = compare(state_of(base_flat), captured.flat)
    conflicted = [s.name for s in repo.ref_states() if s.conflicted]
    return Status(ref, head_id, changes, scanned.skipped, conflicted, base)


@dataclass
class CheckoutResult:
    commit: bytes
    ref: str | None  # branch now followed by HEAD, None when detached
    applied: co.ApplyResult
    left_behind: bytes | None = None  # the detached commit HEAD left, when no ref reaches it any more


def checkout(repo: Repository, rev: str, *, force: bool = False, progress: Progress = NULL_PROGRESS) -> CheckoutResult:
    target_id = repo.resolve(rev)
    branch = _branch_named(repo, rev)
    _require_content(repo, target_id, rev)
    with repo.lock():
        _base, base_flat = base_tree(repo)
        target_flat = commit_tree(repo, target_id)
        scanned = scan(repo.worktree)
        work = _capture(repo, scanned, base_flat, store_content=False, progress=progress, label="checking")
        the_plan = co.plan(state_of(base_flat), work.flat, state_of(target_flat), force=force)
        try:
            applied = apply_plan(repo, the_plan, progress)
        except P2pvcError as exc:
            back = _current_revision(repo)
            if getattr(exc, "partial_paths", 0) and back is not None:
                exc.hint = f"{exc.hint}. HEAD still names {back}: `p2pvc checkout --force {back}` goes back to it"
            raise
        left_behind = _unreferenced_detached_head(repo, target_id)
        repo.set_head(branch if branch else target_id, worktree_base=target_id)
    return CheckoutResult(target_id, branch, applied, left_behind)


def _unreferenced_detached_head(repo: Repository, target_id: bytes) -> bytes | None:
    """Return HEAD's commit if HEAD is detached and neither a ref nor `target_id` reaches it, else None.

    Such a commit (made on a detached HEAD) is removed by the next gc once HEAD moves away.
    """
    ref, head_id = repo.head()
    if ref is not None or head_id is None:
        return None
    tips = [target_id, *(h.target for s in repo.ref_states() for h in s.heads if h.target is not None)]
    if any(repo.is_ancestor(head_id, tip) for tip in tips):
        return None
    return head_id


def restore(repo: Repository, paths: list[str], source: str = "HEAD", progress: Progress = NULL_PROGRESS) -> co.ApplyResult:
    """Overwrite `paths` in the working tree with their version in `source`."""
    source_id = repo.resolve(source)
    rel = [relative_path(repo, p) for p in paths]
    with repo.lock():
        _base, head_flat = base_tree(repo)
        source_flat = commit_tree(repo, source_id)
        for path in rel:
            if path and path not in source_flat:
                raise UserError(f"{os.fsdecode(path)} does not exist in {source}")
        scanned = scan(repo.worktree, only=[p for p in rel if p] or None)
        work = _capture(repo, scanned, head_flat, store_content=False, progress=progress, label="checking")
        the_plan = co.plan(state_of(head_flat), work.flat, state_of(source_flat), force=True, only=[p for p in rel if p] or None)
        # Restore only brings back the source version: it removes nothing.
        the_plan.removals = []
        applied = apply_plan(repo, the_plan, progress)
    return applied


def export(
    repo: Repository, commit_id: bytes, paths: list[bytes], dest: "os.PathLike[str]", progress: Progress = NULL_PROGRESS
) -> co.ApplyResult:
    """Write the files of a commit (only `paths`, when given) into `dest`, outside the working tree.

    Files already in `dest` under the same names are replaced; nothing else there is touched.
    Each file is verified as in a checkout.
    """
    from pathlib import Path

    dest = Path(dest)
    if dest.resolve() == Path(repo.worktree).resolve():
        raise UserError("the folder to check out into is this repository's working tree", hint="use p2pvc checkout")
    target = state_of(select_paths(commit_tree(repo, commit_id), paths))
    dest.mkdir(parents=True, exist_ok=True)
    the_plan = co.plan({}, {}, target, force=True)
    progress.start("writing", the_plan.write_bytes)
    try:
        return co.apply(dest, the_plan, repo.store, None, progress.advance)
    finally:
        progress.finish()


def apply_plan(repo: Repository, the_plan: co.Plan, progress: Progress = NULL_PROGRESS) -> co.ApplyResult:
    """Write a checkout plan into the working tree, with a progress bar, and save the stat cache rows it made."""
    cache = StatCache(repo.db)
    progress.start("writing", the_plan.write_bytes)
    try:
        applied = co.apply(repo.worktree, the_plan, repo.store, cache, progress.advance)
    finally:
        progress.finish()
    cache.save()
    return applied


def _require_content(repo: Repository, commit_id: bytes, rev: str) -> None:
    """In a history-only clone, fail before touching files if the revision's content is not here."""
    if not repo.history_only:
        return
    for entry in commit_tree(repo, commit_id).values():
        if entry.kind == model.ENTRY_FILE:
            manifest = repo.read_manifest(entry.target)
            if any(not repo.store.has(c.id) for c in manifest.chunks):
                raise UserError(
                    f"the content of {rev} has not been fetched: this is a history-only clone",
                    hint="run p2pvc sync --content to fetch file content from your peers",
                )


def _current_revision(repo: Repository) -> str | None:
    """Return what a user types to name HEAD's commit: its branch, or the abbreviated id when detached."""
    ref, head_id = repo.head()
    if ref is not None and head_id is not None:
        return ref.removeprefix(BRANCH_PREFIX)
    if head_id is not None:
        return head_id.hex()[:12]
    return None


def _branch_named(repo: Repository, rev: str) -> str | None:
    for name in (rev, BRANCH_PREFIX + rev):
        if name.startswith(BRANCH_PREFIX):
            state = repo.ref_state(name)
            if state is not None and state.target is not None:
                return name
    return None


def _relative_to(absolute: str, root: str) -> str | None:
    """Return `absolute` relative to the resolved `root`, or None if it is outside.

    Walks up from the path to the first ancestor that resolves to the root, so a
    working tree reached through a symlinked folder works, while the part inside
    the tree stays lexical: a tracked symlink names itself, never its target.
    """
    folder = absolute
    while True:
        if os.path.realpath(folder) == root:
            return os.path.relpath(absolute, folder)
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent


def relative_path(repo: Repository, path: str) -> bytes:
    """Turn a user-given path into a worktree-relative one; "" is the root."""
    absolute = os.path.abspath(path)
    root = os.path.realpath(repo.worktree)
    found = _relative_to(absolute, root)
    if found is None:
        raise UserError(f"{path} is outside the working tree {root}")
    rel = found
    if rel == ".":
        return b""
    if rel.startswith(".."):
        raise UserError(f"{path} is outside the working tree {root}")
    parts = rel.split(os.sep)
    if parts[0] == ".p2pvc":
        raise UserError(f"{path} is inside the repository folder")
    return os.fsencode("/".join(parts))
