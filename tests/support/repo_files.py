"""Reading a repository through the library, to check what p2pvc processes left on disk."""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from p2pvc.objects import model
from p2pvc.ops.worktree_ops import commit_tree
from p2pvc.repo import REPO_DIR, Repository

MAIN = "refs/heads/main"


@contextlib.contextmanager
def open_repo(root: Path) -> Iterator[Repository]:
    repo = Repository(root)
    try:
        yield repo
    finally:
        repo.close()


def worktree_files(root: Path) -> dict[str, bytes]:
    """Return path -> content of every regular file in the working tree, outside `.p2pvc`."""
    files = {}
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d != REPO_DIR]
        for name in names:
            path = Path(folder, name)
            files[path.relative_to(root).as_posix()] = path.read_bytes()
    return files


def commit_files(root: Path, commit_id: bytes) -> dict[str, bytes]:
    """Return path -> content of every file in a commit, read and verified through the store."""
    files = {}
    with open_repo(root) as repo:
        for path, entry in commit_tree(repo, commit_id).items():
            if entry.kind != model.ENTRY_FILE:
                continue
            manifest = repo.read_manifest(entry.target)
            files[path.decode()] = b"".join(repo.store.get_chunk(c.id) for c in manifest.chunks)
    return files


def branch_target(root: Path, name: str = MAIN) -> bytes | None:
    with open_repo(root) as repo:
        state = repo.ref_state(name)
        return state.target if state else None


def commit_parents(root: Path, commit_id: bytes) -> tuple[bytes, ...]:
    with open_repo(root) as repo:
        return repo.read_commit(commit_id).commit.parents


def commit_message(root: Path, commit_id: bytes) -> str:
    with open_repo(root) as repo:
        return repo.read_commit(commit_id).commit.message


def is_stored(root: Path, oid: bytes) -> bool:
    with open_repo(root) as repo:
        return repo.store.has(oid)


def index_db(root: Path) -> sqlite3.Connection:
    """Open the repository database directly, to inspect or damage rows."""
    return sqlite3.connect(root / REPO_DIR / "index.sqlite", isolation_level=None)


def packs_dir(root: Path) -> Path:
    return root / REPO_DIR / "packs"


def indexed_pack_sizes(root: Path) -> dict[str, int]:
    """Return pack name -> size that the index records as durable."""
    conn = index_db(root)
    try:
        return {name: size for name, size in conn.execute("SELECT name, size FROM packs")}
    finally:
        conn.close()


def torn_tails(root: Path) -> dict[str, int]:
    """Return pack name -> bytes past its indexed size, for every pack with such a tail."""
    tails = {}
    for name, size in indexed_pack_sizes(root).items():
        extra = (packs_dir(root) / name).stat().st_size - size
        if extra:
            tails[name] = extra
    return tails


def unlisted_packs(root: Path) -> list[str]:
    """Return files in the packs folder that the index does not list."""
    listed = indexed_pack_sizes(root)
    return sorted(n for n in os.listdir(packs_dir(root)) if n not in listed)


def pack_entries(root: Path) -> list[tuple[bytes, int, str, int, int, int]]:
    """Return (id, kind, pack name, offset, stored size, codec) of every indexed record, in pack order."""
    conn = index_db(root)
    try:
        rows = conn.execute(
            "SELECT o.id, o.kind, p.name, o.offset, o.stored_size, o.codec "
            "FROM objects o JOIN packs p ON p.pack_id = o.pack_id ORDER BY p.pack_id, o.offset"
        ).fetchall()
    finally:
        conn.close()
    return [(bytes(r[0]), r[1], r[2], r[3], r[4], r[5]) for r in rows]


def write_random(path: Path, size: int, rng: random.Random) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(rng.randbytes(size))


def overwrite_random(path: Path, offset: int, size: int, rng: random.Random) -> None:
    """Overwrite `size` bytes at `offset` in place, keeping the rest of the file."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(rng.randbytes(size))
