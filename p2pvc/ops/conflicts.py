"""Conflicted refs: listing them, resolving one by taking a side, and the pending-merge state.

A ref is conflicted when its current heads (the signed updates no later
update retired, see `p2pvc.refs.state`) point to more than one target:
two replicas moved it concurrently to commits that do not descend from each
other. While it stays so, every head stays listed and gc keeps what each
head reaches. There are two ways out:

* `resolve_ref` writes an update to one chosen commit that supersedes every
  current head. The commits only the other heads reached are no longer
  reachable from the ref (the result names them, so the user can keep them
  with a branch).
* `p2pvc merge` (`p2pvc.ops.merge`) writes a merge commit that descends from
  both heads, so the update retires both by ancestry.

A merge that stops with text conflicts leaves its state in the `meta`
table until it is committed or aborted: `merge_head` contains their commit
id, which the merge commit records as its second parent, and
`merge_state` holds the rest (see `PendingMerge`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgpack

from p2pvc.errors import ConflictError, CorruptionError, UserError
from p2pvc.objects import model
from p2pvc.objects.ids import ID_SIZE
from p2pvc.refs.records import BRANCH_PREFIX, TAG_PREFIX, RefUpdate
from p2pvc.refs.state import RefState
from p2pvc.repo import Repository
from p2pvc.worktree.changes import Change, compare, state_of
from p2pvc.worktree.trees import FlatTree, flatten

MERGE_HEAD_KEY = "merge_head"
MERGE_STATE_KEY = "merge_state"
MERGE_STATE_VERSION = 1


# Finding refs ------------------------------------------------------------------------


def find_ref(repo: Repository, name: str) -> str:
    """Return the full name of the ref `name` names: a full name, a branch or a tag.

    A short name that is both a branch and a tag means the conflicted one
    when only one of them is conflicted, and is ambiguous otherwise.
    """
    if name.startswith("refs/"):
        if repo.ref_state(name) is None:
            raise UserError(f"ref {name} does not exist", hint="p2pvc conflicts lists the conflicted refs")
        return name
    found = [full for full in (BRANCH_PREFIX + name, TAG_PREFIX + name) if repo.ref_state(full) is not None]
    if not found:
        raise UserError(f"no branch or tag named {name!r}", hint="p2pvc conflicts lists the conflicted refs")
    if len(found) > 1:
        conflicted = [full for full in found if _state(repo, full).conflicted]
        if len(conflicted) != 1:
            raise UserError(f"{name!r} is both a branch and a tag", hint=f"write {found[0]} or {found[1]}")
        return conflicted[0]
    return found[0]


def _state(repo: Repository, name: str) -> RefState:
    state = repo.ref_state(name)
    assert state is not None
    return state


# Listing --------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadInfo:
    update: RefUpdate
    winner: bool  # the last writer: the value the ref has while it stays conflicted
    commit: model.Commit | None  # None for a deletion, or when the commit is not stored


@dataclass(frozen=True)
class HeadDifference:
    """Difference between another head's tree and the winner's tree."""

    old: bytes | None  # the winner's target
    new: bytes | None  # the other head's target
    changes: list[Change]
    complete: bool  # False when a tree was missing (a history that is still being fetched)


@dataclass(frozen=True)
class RefConflict:
    name: str
    heads: list[HeadInfo]
    merge_base: bytes | None  # of the first two commit heads, or None without a common ancestor
    differences: list[HeadDifference]


def list_conflicts(repo: Repository) -> list[RefConflict]:
    """Describe every conflicted ref: its heads, who wrote them, and how their trees differ."""
    from p2pvc.ops.merge import merge_base  # merge imports this module: import at call time

    result = []
    for state in repo.ref_states():
        if not state.conflicted:
            continue
        heads = [HeadInfo(h, h.id == state.winner.id, _commit_or_none(repo, h.target)) for h in state.heads]
        commits = [h.update.target for h in heads if h.commit is not None]
        base = merge_base(repo, commits[0], commits[1]) if len(commits) >= 2 else None
        differences = []
        seen = {state.target}
        for head in heads:
            if head.update.target in seen:
                continue
            seen.add(head.update.target)
            differences.append(_difference(repo, state.target, head.update.target))
        result.append(RefConflict(state.name, heads, base, differences))
    return result


def _commit_or_none(repo: Repository, target: bytes | None) -> model.Commit | None:
    if target is None or not repo.store.has(target):
        return None
    return repo.read_commit(target).commit


def _difference(repo: Repository, old: bytes | None, new: bytes | None) -> HeadDifference:
    try:
        old_flat = _tree_of(repo, old)
        new_flat = _tree_of(repo, new)
    except CorruptionError:
        return HeadDifference(old, new, [], complete=False)
    return HeadDifference(old, new, compare(state_of(old_flat), state_of(new_flat)), complete=True)


def _tree_of(repo: Repository, commit_id: bytes | None) -> FlatTree:
    if commit_id is None:
        return {}
    return flatten(repo.read_tree, repo.read_commit(commit_id).commit.tree)


# Resolving by taking a side --------------------------------------------------------------


@dataclass(frozen=True)
class ResolveResult:
    name: str
    target: bytes
    superseded: list[RefUpdate]  # the heads the new update retired
    unreachable: list[bytes] = field(default_factory=list)  # head commits the ref no longer reaches


def resolve_ref(repo: Repository, ref: str, rev: str) -> ResolveResult:
    """Point a conflicted ref at `rev` with an update that supersedes every current head.

    `rev` must be one of the heads' commits or descend from at least one of
    them, so the resolution always continues the ref's history.
    """
    repo.require_member()
    name = find_ref(repo, ref)
    state = _state(repo, name)
    if not state.conflicted:
        raise UserError(f"{name} is not conflicted", hint="p2pvc conflicts lists the conflicted refs")
    target = repo.resolve(rev)
    head_targets = [h.target for h in state.heads if h.target is not None]
    if not any(repo.is_ancestor(head, target) for head in head_targets):
        raise UserError(
            f"{rev} ({target.hex()[:12]}) is neither a head of {name} nor a descendant of one",
            hint="take one of the heads that p2pvc conflicts lists, or merge them with p2pvc merge",
        )
    unreachable = [head for head in dict.fromkeys(head_targets) if not repo.is_ancestor(head, target)]
    # NOTE: `expected` checks the winner only. A head that arrives from a peer between the
    # state read above and the write is superseded too, without the user having seen it.
    repo.set_ref(name, target, expected=state.target, supersede_all=True)
    return ResolveResult(name, target, list(state.heads), unreachable)


# Pending merge -------------------------------------------------------------------------


@dataclass(frozen=True)
class PendingMerge:
    """A merge that stopped with conflicts and waits for the user's edits and commit."""

    ours: bytes  # the commit the working tree was at: the first parent
    theirs: bytes  # the merged commit: the second parent
    tree: bytes  # the tree written to the working tree, conflict markers included
    label: str  # how the user named their side, for the markers and messages
    conflicts: tuple[bytes, ...]  # paths written with conflict markers


def pending_merge(repo: Repository) -> PendingMerge | None:
    """Return the merge waiting for a commit, or None."""
    theirs = repo.db.get_meta(MERGE_HEAD_KEY)
    if not theirs:
        return None  # absent, or emptied by the transaction that committed the merge
    state = repo.db.get_meta(MERGE_STATE_KEY)
    try:
        version, ours, tree, label, conflicts = msgpack.unpackb(state or b"", raw=False)
        valid = (
            version == MERGE_STATE_VERSION
            and len(theirs) == ID_SIZE
            and isinstance(ours, bytes) and len(ours) == ID_SIZE
            and isinstance(tree, bytes) and len(tree) == ID_SIZE
            and isinstance(label, str)
            and isinstance(conflicts, list) and all(isinstance(p, bytes) for p in conflicts)
        )
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        valid = False
    if not valid:
        raise CorruptionError(
            "the state of the merge in progress is damaged",
            hint="run p2pvc merge --abort to drop it (the working tree keeps its files)",
        )
    return PendingMerge(ours, theirs, tree, label, tuple(conflicts))


def save_pending_merge(repo: Repository, pending: PendingMerge) -> None:
    state = msgpack.packb(
        [MERGE_STATE_VERSION, pending.ours, pending.tree, pending.label, list(pending.conflicts)], use_bin_type=True
    )
    with repo.db.write() as conn:
        repo.db.set_meta(conn, MERGE_HEAD_KEY, pending.theirs)
        repo.db.set_meta(conn, MERGE_STATE_KEY, state)


# Written with the merge commit's ref update, in its transaction: empty values mean no merge.
CLEARED_MERGE_META = {MERGE_HEAD_KEY: b"", MERGE_STATE_KEY: b""}


def clear_pending_merge(repo: Repository) -> None:
    with repo.db.write() as conn:
        conn.execute("DELETE FROM meta WHERE key IN (?, ?)", (MERGE_HEAD_KEY, MERGE_STATE_KEY))


def require_no_pending_merge(repo: Repository) -> None:
    """Fail when a merge waits for its commit, so no other merge or resolution mixes into it."""
    if repo.db.get_meta(MERGE_HEAD_KEY):
        raise ConflictError(
            "a merge is in progress: its conflicts are not committed yet",
            hint="edit the conflicted files, then run p2pvc commit -m MSG or p2pvc merge --continue. "
            "p2pvc merge --abort drops the merge",
        )

