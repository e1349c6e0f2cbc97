"""Converting between nested tree objects and flat path maps."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

from p2pvc.objects import model
from p2pvc.objects.model import ENTRY_DIR, Tree, TreeEntry

FlatTree = dict[bytes, TreeEntry]  # relative path -> entry; folders included


def flatten(read_tree: Callable[[bytes], Tree], tree_id: bytes | None, prefix: bytes = b"") -> FlatTree:
    flat: FlatTree = {}
    if tree_id is None:
        return flat
    stack = [(prefix, tree_id)]
    while stack:
        base, oid = stack.pop()
        for entry in read_tree(oid).entries:
            path = base + b"/" + entry.name if base else entry.name
            flat[path] = entry
            if entry.kind == ENTRY_DIR:
                stack.append((path, entry.target))
    return flat


def build(flat: dict[bytes, tuple[int, bool, bytes, int]], put_tree: Callable[[Tree], bytes]) -> bytes:
    """Store the trees for `flat` (path -> kind, executable, target, size) and return the root id.

    Folders must be listed too (so empty ones survive); their target and size are filled in here.
    """
    children: dict[bytes, list[bytes]] = defaultdict(list)
    for path in flat:
        parent, _, _ = path.rpartition(b"/")
        children[parent].append(path)
    resolved: dict[bytes, tuple[bytes, int]] = {}
    # Deepest folders first, so every child tree exists before its parent.
    folders = sorted(
        [p for p, (kind, *_rest) in flat.items() if kind == ENTRY_DIR] + [b""],
        key=lambda p: -p.count(b"/") if p else 1,
    )
    for folder in folders:
        entries = []
        total = 0
        for path in children.get(folder, []):
            kind, executable, target, size = flat[path]
            if kind == ENTRY_DIR:
                target, size = resolved[path]
            name = path.rpartition(b"/")[2]
            entries.append(TreeEntry(name, kind, executable, target, size))
            if kind != model.ENTRY_SYMLINK:
                total += size
        entries.sort(key=lambda e: e.name)
        resolved[folder] = (put_tree(Tree(tuple(entries))), total)
    return resolved[b""][0]


def select_paths(flat: FlatTree, paths: list[bytes]) -> FlatTree:
    """Return the entries of `flat` at or below any of `paths` (all of them when `paths` is empty)."""
    if not paths:
        return flat
    return {path: entry for path, entry in flat.items() if any(path == p or path.startswith(p + b"/") for p in paths)}
