"""A node's repository read and changed through the library, bypassing the command line.

The changes skip p2pvc's checks on purpose: a misbehaving peer is a copy
of a good repository whose store or database was changed behind p2pvc's
back, and which then serves that content.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator
from dataclasses import replace
from pathlib import Path

from p2pvc.identity.keys import Identity, load_or_create
from p2pvc.objects import model
from p2pvc.objects.compress import CODEC_RAW
from p2pvc.refs.records import RefUpdate
from p2pvc.repo import Repository
from p2pvc.store.pack import KIND_CHUNK, RECORD_HEADER
from p2pvc.sync.state import SyncState
from p2pvc.worktree.trees import flatten


@contextlib.contextmanager
def open_repo(root: Path, home: Path) -> Iterator[Repository]:
    """Open the repository at `root` in this process, signing with the key in `home`."""
    repo = Repository(root, identity=load_or_create(home))
    try:
        yield repo
    finally:
        repo.close()


def repository_id(root: Path, home: Path) -> bytes:
    with open_repo(root, home) as repo:
        return repo.id


def chunk_ids(root: Path, home: Path) -> list[bytes]:
    """Return the id of every chunk stored in the repository, in pack order."""
    with open_repo(root, home) as repo:
        return [e.id for e in repo.store.iter_entries() if e.kind == KIND_CHUNK]


def flip_chunk_byte(root: Path, home: Path, skip: Collection[bytes] = ()) -> bytes:
    """Flip one byte in the middle of the stored data of an uncompressed chunk, and return the chunk id.

    Chunks in `skip` (those the receiving node already has, so it would never
    request them) are left alone. Only the pack file changes, so the index
    still lists the chunk, and a node serving this repository sends the
    damaged bytes under the chunk's id.
    """
    with open_repo(root, home) as repo:
        entries = [
            e
            for e in repo.store.iter_entries()
            if e.kind == KIND_CHUNK and e.codec == CODEC_RAW and e.id not in skip
        ]
        assert entries, f"{root} has no uncompressed chunk to damage outside the {len(skip)} skipped ones"
        entry = max(entries, key=lambda e: e.stored_size)
        path = repo.store.packs_dir / entry.pack_name
    position = entry.offset + RECORD_HEADER.size + entry.stored_size // 2
    with open(path, "r+b") as pack:
        pack.seek(position)
        byte = pack.read(1)
        pack.seek(position)
        pack.write(bytes([byte[0] ^ 0xFF]))
    return entry.id


def flip_every_chunk_byte(root: Path, home: Path) -> int:
    """Flip one byte in the middle of the stored data of every uncompressed chunk, and return how many changed.

    A node serving the result sends a damaged copy of each of those chunks,
    while its index, commits and manifests stay intact.
    """
    with open_repo(root, home) as repo:
        entries = [e for e in repo.store.iter_entries() if e.kind == KIND_CHUNK and e.codec == CODEC_RAW]
        packs_dir = repo.store.packs_dir
    by_pack: dict[str, list] = {}
    for entry in entries:
        by_pack.setdefault(entry.pack_name, []).append(entry)
    for pack_name, pack_entries in by_pack.items():
        with open(packs_dir / pack_name, "r+b") as pack:
            for entry in pack_entries:
                position = entry.offset + RECORD_HEADER.size + entry.stored_size // 2
                pack.seek(position)
                byte = pack.read(1)
                pack.seek(position)
                pack.write(bytes([byte[0] ^ 0xFF]))
    return len(entries)


def file_chunk_ids(root: Path, home: Path, rev: str, path: str) -> set[bytes]:
    """Return the ids of the chunks of the file at `path` (relative, with / separators) in revision `rev`."""
    with open_repo(root, home) as repo:
        tree = repo.read_commit(repo.resolve(rev)).commit.tree
        entry = flatten(repo.read_tree, tree)[path.encode()]
        assert entry.kind == model.ENTRY_FILE, f"{path} is not a file in {rev}"
        return {chunk.id for chunk in repo.read_manifest(entry.target).chunks}


def insert_ref_update(repo: Repository, name: str, target: bytes, *, author: bytes, signer: Identity) -> RefUpdate:
    """Store an update of `name` that claims `author` and is signed by `signer`, skipping every check.

    If `signer` does not hold `author`'s key, the signature does not verify.
    If `author` is not a member, the update is signed by a non-member.
    """
    with repo.db.write() as conn:
        current = repo.refs.state(name, repo.is_ancestor, conn)
        update = RefUpdate(
            repo=repo.id,
            name=name,
            target=target,
            clock=repo.refs.next_timestamp(conn),
            author=author,
            supersedes=tuple(h.id for h in current.heads) if current else (),
        )
        update = replace(update, signature=signer.sign(update.signing_payload()))
        repo.refs._insert(conn, update)
    return update


def store_commit(repo: Repository, parent: bytes, message: str, *, forge_signature: bool = False) -> bytes:
    """Store a commit on top of `parent` with the parent's tree, signed by the repository's identity.

    With `forge_signature`, one byte of the signature is flipped, so it no
    longer verifies. Returns the commit id. The ref is not changed.
    """
    parent_commit = repo.read_commit(parent).commit
    unsigned = model.Commit(
        tree=parent_commit.tree,
        parents=(parent,),
        author=repo.identity.public_key,
        time_ms=repo.clock(),
        message=message,
    )
    signed = repo.sign_commit(unsigned)
    if forge_signature:
        signature = bytearray(signed.signature)
        signature[0] ^= 0x01
        signed = replace(signed, signature=bytes(signature))
    with repo.store.session() as session:
        commit_id = session.put_object(signed)
    SyncState(repo.db).mark_complete([commit_id])
    return commit_id
