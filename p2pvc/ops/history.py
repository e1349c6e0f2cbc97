"""Commands that read history: log, show, diff, refs."""

from __future__ import annotations

import re
from dataclasses import dataclass

from p2pvc.errors import UserError
from p2pvc.objects import model
from p2pvc.objects.model import ENTRY_FILE
from p2pvc.progress import NULL_PROGRESS, Progress
from p2pvc.refs.records import BRANCH_PREFIX, TAG_PREFIX, is_valid_short_name
from p2pvc.repo import CommitInfo, Repository
from p2pvc.worktree.changes import Change, compare, state_of
from p2pvc.worktree.ingest import Ingester
from p2pvc.worktree.scan import scan
from p2pvc.worktree.snapshot import bytes_to_read, capture
from p2pvc.worktree.statcache import StatCache
from p2pvc.worktree.trees import FlatTree, flatten


def log(
    repo: Repository,
    revs: list[str] | None = None,
    *,
    limit: int | None = None,
    meta_filters: dict[str, str] | None = None,
) -> list[CommitInfo]:
    result: list[CommitInfo] = []
    if limit is not None and limit <= 0:
        return result
    with repo.lock():  # gc must not move records while they are read
        starts = [repo.resolve(r) for r in (revs or ["HEAD"])]
        for info in repo.walk_commits(starts):
            if meta_filters:
                metadata = dict(info.commit.metadata)
                if any(metadata.get(k) != v for k, v in meta_filters.items()):
                    continue
            result.append(info)
            if limit is not None and len(result) >= limit:
                break
    return result


def ref_names_by_commit(repo: Repository) -> dict[bytes, list[str]]:
    names: dict[bytes, list[str]] = {}
    for state in repo.ref_states():
        if state.target is not None:
            names.setdefault(state.target, []).append(state.name)
    return names


@dataclass
class DiffEntry:
    change: Change
    new_bytes: int  # bytes of the new version's chunks that the old side does not have


@dataclass
class Diff:
    old_label: str
    new_label: str
    entries: list[DiffEntry]

    @property
    def new_bytes(self) -> int:
        return sum(e.new_bytes for e in self.entries)


def diff(repo: Repository, old: str | None, new: str | None, progress: Progress = NULL_PROGRESS) -> Diff:
    """Compare two revisions, or a revision (default HEAD) and the working tree when `new` is None."""
    with repo.lock():  # gc must not move records while they are read
        return _diff(repo, old, new, progress)


def _diff(repo: Repository, old: str | None, new: str | None, progress: Progress) -> Diff:
    if old is None and new is not None:
        # Only NEW: compare against an empty tree (what a root commit added).
        return _diff_states(repo, {}, set(), "empty tree", new, state_of(_tree_of(repo, new)), {})
    old_rev = old or "HEAD"
    if old is None and new is None and repo.worktree_base() not in (None, repo.head()[1]):
        # A peer moved the branch: uncommitted changes are relative to the checked-out commit.
        base = repo.worktree_base()
        assert base is not None
        old_rev = base.hex()
    old_flat = _tree_of(repo, old_rev)
    old_chunks = _chunk_ids(repo, old_flat)
    if new is not None:
        new_flat = _tree_of(repo, new)
        new_state = state_of(new_flat)
        manifests: dict[bytes, model.Manifest] = {}
    else:
        scanned = scan(repo.worktree)
        cache = StatCache(repo.db)
        progress.start("hashing", bytes_to_read(scanned, cache))
        try:
            with Ingester(None, progress=progress.advance) as ingester:
                captured = capture(repo.worktree, scanned, old_flat, repo.store, cache, ingester, None)
        finally:
            progress.finish()
        new_state = captured.flat
        manifests = captured.manifests
    return _diff_states(repo, old_flat, old_chunks, old_rev, new or "working tree", new_state, manifests)


def _diff_states(repo, old_flat, old_chunks, old_label, new_label, new_state, manifests) -> Diff:
    entries = []
    counted: set[bytes] = set()  # a chunk new in several files counts once, in the first
    for change in compare(state_of(old_flat), new_state):
        new_bytes = 0
        if change.new is not None and change.new[0] == ENTRY_FILE:
            manifest = manifests.get(change.path) or repo.read_manifest(change.new[2])
            for chunk in manifest.chunks:
                if chunk.id not in old_chunks and chunk.id not in counted:
                    counted.add(chunk.id)
                    new_bytes += chunk.size
        entries.append(DiffEntry(change, new_bytes))
    return Diff(old_label, new_label, entries)


def _tree_of(repo: Repository, rev: str) -> FlatTree:
    ref, head = repo.head()
    if rev in ("HEAD", "@") and head is None:
        return {}
    return flatten(repo.read_tree, repo.read_commit(repo.resolve(rev)).commit.tree)


def _chunk_ids(repo: Repository, flat: FlatTree) -> set[bytes]:
    ids: set[bytes] = set()
    for entry in flat.values():
        if entry.kind == ENTRY_FILE:
            ids.update(c.id for c in repo.read_manifest(entry.target).chunks)
    return ids


# Branches and tags ------------------------------------------------------------


def _checked_short_name(kind: str, name: str) -> str:
    if not is_valid_short_name(name):
        raise UserError(
            f"invalid {kind} name {name!r}",
            hint="use letters, digits and . _ - + @ =, with / between parts, not starting with . or -, and not HEAD or @",
        )
    if name.startswith("refs/"):
        # `refs/tags/v1` as a branch would be refs/heads/refs/tags/v1, which revisions never reach.
        raise UserError(
            f"invalid {kind} name {name!r}: give the short name, without refs/",
            hint=f"for example: p2pvc {kind} {name.split('/')[-1]}",
        )
    if re.fullmatch(r"[0-9a-fA-F]{4,64}", name):
        # A revision that names a ref never reaches the commit ids it looks like.
        raise UserError(
            f"invalid {kind} name {name!r}: it looks like an abbreviated commit id",
            hint="add a letter that is not a hex digit, for example v" + name,
        )
    return name


def _check_name_free(repo: Repository, name: str, other_prefix: str, other_kind: str) -> None:
    """Reject a new branch or tag that has the name of an existing tag or branch.

    Revisions look a short name up as a branch first, so a branch named like a
    tag would hide the tag, and `checkout v1.0.0` would stop rolling back.
    """
    state = repo.ref_state(other_prefix + name)
    if state is not None and not state.deleted:
        raise UserError(f"{name} is already a {other_kind}", hint="choose a name that no branch or tag has")


def create_branch(repo: Repository, name: str, rev: str = "HEAD") -> bytes:
    full = BRANCH_PREFIX + _checked_short_name("branch", name)
    state = repo.ref_state(full)
    if state is not None and not state.deleted:
        raise UserError(f"branch {name} already exists", hint=f"switch to it with: p2pvc switch {name}")
    _check_name_free(repo, name, TAG_PREFIX, "tag")
    target = repo.resolve(rev)
    repo.set_ref(full, target, expected=None)
    return target


def delete_branch(repo: Repository, name: str, *, force: bool = False) -> bytes | None:
    """Delete a branch; return the commit it pointed at.

    Without `force`, refuses when no other ref reaches that commit, since gc
    would then remove the branch's commits for good.
    """
    full = BRANCH_PREFIX + name
    state = repo.ref_state(full)
    if state is None or state.deleted:
        raise UserError(f"branch {name} does not exist")
    if repo.head()[0] == full:
        raise UserError(f"cannot delete branch {name}: it is checked out", hint="switch to another branch first")
    target = state.target
    if target is not None and not force:
        others = [s.target for s in repo.ref_states() if s.name != full and s.target is not None]
        if not any(repo.is_ancestor(target, other) for other in others):
            raise UserError(
                f"branch {name} ({target.hex()[:12]}) is not reached by any other branch or tag; "
                "after deleting it, gc would remove its commits",
                hint=f"merge it first, tag it, or delete anyway with: p2pvc branch -d --force {name}",
            )
    repo.set_ref(full, None, expected=target)
    return target


def create_tag(repo: Repository, name: str, rev: str = "HEAD") -> bytes:
    full = TAG_PREFIX + _checked_short_name("tag", name)
    state = repo.ref_state(full)
    if state is not None and not state.deleted:
        raise UserError(f"tag {name} already exists and tags never move", hint="choose a new tag name")
    _check_name_free(repo, name, BRANCH_PREFIX, "branch")
    target = repo.resolve(rev)
    repo.set_ref(full, target, expected=None)
    return target
