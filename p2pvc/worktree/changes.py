"""Comparing two states of a tree path by path."""

from __future__ import annotations

from dataclasses import dataclass

from p2pvc.objects.model import ENTRY_DIR
from p2pvc.worktree.snapshot import FlatState
from p2pvc.worktree.trees import FlatTree

ADDED = "added"
REMOVED = "removed"
MODIFIED = "modified"


@dataclass(frozen=True)
class Change:
    path: bytes
    status: str  # ADDED, REMOVED or MODIFIED
    old: tuple[int, bool, bytes, int] | None  # kind, executable, target, size
    new: tuple[int, bool, bytes, int] | None


def state_of(flat: FlatTree) -> FlatState:
    return {path: (e.kind, e.executable, e.target, e.size) for path, e in flat.items()}


def compare(old: FlatState, new: FlatState) -> list[Change]:
    """List changed files and symlinks, plus folders that are empty on the side that has them.

    A folder's own entry is not compared (its id only summarises what is below it).
    """
    changes = []
    old_parents = _parents(old)
    new_parents = _parents(new)
    for path in sorted(old.keys() | new.keys()):
        a, b = old.get(path), new.get(path)
        a_dir = a is not None and a[0] == ENTRY_DIR
        b_dir = b is not None and b[0] == ENTRY_DIR
        if a_dir and b_dir:
            continue
        if a_dir and path in old_parents:
            a = None  # a non-empty folder is shown through its contents
        if b_dir and path in new_parents:
            b = None
        if a is None and b is None:
            continue
        if a is None:
            changes.append(Change(path, ADDED, None, b))
        elif b is None:
            changes.append(Change(path, REMOVED, a, None))
        elif a[:3] != b[:3]:
            changes.append(Change(path, MODIFIED, a, b))
    return changes


def _parents(state: FlatState) -> set[bytes]:
    parents = set()
    for path in state:
        while b"/" in path:
            path = path.rpartition(b"/")[0]
            if path in parents:
                break
            parents.add(path)
    return parents
