"""Walking the working tree.

Symlink policy: a symlink is recorded as a link with its target text,
verbatim, and is never followed: the scan uses lstat, never descends into a
linked folder, and checkout recreates the link without reading or writing
through it. Whatever a link points at, inside the tree or outside, p2pvc
never reads or writes there.

Paths are bytes relative to the root, with b"/" separators, because file
names on Linux are bytes and need not be valid UTF-8. Ignore rules see
them decoded with the file-system encoding (surrogateescape).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from p2pvc.objects.model import ENTRY_DIR, ENTRY_FILE, ENTRY_SYMLINK
from p2pvc.worktree.ignore import IgnoreFile, IgnoreStack
from p2pvc.worktree.ingest import FileStat

IGNORE_FILE = ".p2pvcignore"
REPO_DIR_NAME = b".p2pvc"


@dataclass(frozen=True, slots=True)
class WorkEntry:
    kind: int
    executable: bool
    size: int
    stat: FileStat | None  # files only
    link_target: bytes = b""  # symlinks only


@dataclass
class ScanResult:
    entries: dict[bytes, WorkEntry]  # every file, symlink and folder, by relative path
    skipped: list[tuple[bytes, str]] = field(default_factory=list)  # (path, reason)


def scan(root: Path, only: list[bytes] | None = None) -> ScanResult:
    """Scan the tree below root, minus ignored paths and the repository folder.

    `only` limits the scan to these relative paths (files or folders) and their parents.
    """
    if only is not None and b"" in only:
        only = None  # the root itself: everything
    result = ScanResult({})
    # An explicit stack instead of recursion, so a very deep tree cannot exhaust Python's recursion limit.
    pending: list[tuple[bytes, IgnoreStack]] = [(b"", IgnoreStack())]
    root_bytes = os.fsencode(root)
    while pending:
        rel_dir, rules = pending.pop()
        children = _scan_dir(root_bytes, rel_dir, rules, result, only)
        pending.extend(reversed(children))  # reversed: folders are visited in sorted order
    return result


def _in_scope(rel: bytes, only: list[bytes] | None) -> bool:
    if only is None:
        return True
    return any(rel == p or rel.startswith(p + b"/") or p.startswith(rel + b"/") for p in only)


def _scan_dir(
    root: bytes, rel_dir: bytes, stack: IgnoreStack, result: ScanResult, only: list[bytes] | None
) -> list[tuple[bytes, IgnoreStack]]:
    """Record the entries of one folder; return its subfolders to scan, with their ignore rules."""
    subfolders: list[tuple[bytes, IgnoreStack]] = []
    abs_dir = os.path.join(root, rel_dir) if rel_dir else root
    ignore_path = os.path.join(abs_dir, IGNORE_FILE.encode())
    if os.path.isfile(ignore_path) and not os.path.islink(ignore_path):
        try:
            text = Path(os.fsdecode(ignore_path)).read_text(encoding="utf-8", errors="surrogateescape")
        except OSError as exc:
            result.skipped.append((rel_dir, f"cannot read {IGNORE_FILE}: {exc.strerror}"))
        else:
            stack = stack.push(IgnoreFile.parse(text, os.fsdecode(rel_dir)))
    try:
        with os.scandir(abs_dir) as it:
            items = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        result.skipped.append((rel_dir, f"cannot list folder: {exc.strerror}"))
        return subfolders
    for item in items:
        name = os.fsencode(item.name)
        if name == REPO_DIR_NAME:
            continue
        rel = rel_dir + b"/" + name if rel_dir else name
        if not _in_scope(rel, only):
            continue
        try:
            st = item.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue  # deleted during the scan
        except OSError as exc:
            result.skipped.append((rel, f"cannot stat: {exc.strerror}"))
            continue
        mode = st.st_mode
        is_dir = stat.S_ISDIR(mode)
        if stack.is_ignored(os.fsdecode(rel), is_dir):
            continue
        if is_dir:
            result.entries[rel] = WorkEntry(ENTRY_DIR, False, 0, None)
            subfolders.append((rel, stack))
        elif stat.S_ISREG(mode):
            executable = bool(mode & stat.S_IXUSR)
            result.entries[rel] = WorkEntry(ENTRY_FILE, executable, st.st_size, FileStat.of(st))
        elif stat.S_ISLNK(mode):
            try:
                target = os.readlink(os.path.join(root, rel))
            except OSError as exc:
                result.skipped.append((rel, f"cannot read link: {exc.strerror}"))
                continue
            result.entries[rel] = WorkEntry(ENTRY_SYMLINK, False, len(target), None, target)
        else:
            result.skipped.append((rel, "not a regular file, folder or symlink"))
    return subfolders
