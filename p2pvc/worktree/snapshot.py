"""Capturing the working tree as content ids, reading only files whose stat changed."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from p2pvc.errors import ConflictError
from p2pvc.objects import model
from p2pvc.objects.model import ENTRY_DIR, ENTRY_FILE, ENTRY_SYMLINK, Manifest
from p2pvc.store.objectstore import ObjectStore, WriteSession
from p2pvc.worktree.ingest import FileChangedError, Ingester
from p2pvc.worktree.scan import ScanResult
from p2pvc.worktree.statcache import StatCache
from p2pvc.worktree.trees import FlatTree

log = logging.getLogger(__name__)

MAX_READ_ATTEMPTS = 3  # reads of a file that keeps changing before giving up

# path -> (kind, executable, target, size); target is a manifest id, tree id or link target
FlatState = dict[bytes, tuple[int, bool, bytes, int]]


@dataclass
class Capture:
    flat: FlatState
    manifests: dict[bytes, Manifest] = field(default_factory=dict)  # files read this time
    new_bytes: int = 0  # raw bytes of chunks that were not in the store
    files_read: int = 0
    bytes_read: int = 0
    tree_id: bytes | None = None  # root tree, when the capture stored content


def bytes_to_read(scan: ScanResult, cache: StatCache) -> int:
    """Return how many bytes a capture will read, for progress display."""
    total = 0
    for path, entry in scan.entries.items():
        if entry.kind == ENTRY_FILE and cache.lookup(path, entry.stat) is None:
            total += entry.size
    return total


def capture(
    root: Path,
    scan: ScanResult,
    previous: FlatTree,
    store: ObjectStore,
    cache: StatCache,
    ingester: Ingester,
    session: WriteSession | None,
    on_file: Callable[[bytes], None] | None = None,
) -> Capture:
    """Return the content ids of every scanned path.

    With a session, new chunks and manifests are stored and the stat cache is
    updated; without one (status, diff) nothing is written.
    """
    result = Capture({})
    for path, entry in scan.entries.items():
        if entry.kind == ENTRY_DIR:
            result.flat[path] = (ENTRY_DIR, False, b"", 0)
            continue
        if entry.kind == ENTRY_SYMLINK:
            result.flat[path] = (ENTRY_SYMLINK, False, entry.link_target, len(entry.link_target))
            continue
        cached = cache.lookup(path, entry.stat)
        if cached is not None and store.has(cached):
            result.flat[path] = (ENTRY_FILE, entry.executable, cached, entry.size)
            continue
        if on_file is not None:
            on_file(path)
        manifest, stat = _read_file(root, path, previous, store, ingester, result)
        if session is not None:
            manifest_id = session.put_object(manifest)
            cache.record(path, stat, manifest_id)
        else:
            manifest_id = model.hash_object(manifest)[0]
            if store.has(manifest_id) and _chunks_stored(store, manifest):
                # Content already stored (a racy row refreshed, or a file reverted): remember it,
                # so the next status does not read the file again. A row for content with a chunk
                # missing (dropped by fsck --repair) would stop add and commit from storing it again.
                cache.record(path, stat, manifest_id)
        result.manifests[path] = manifest
        result.flat[path] = (ENTRY_FILE, entry.executable, manifest_id, manifest.size)
    return result


def _chunks_stored(store: ObjectStore, manifest: Manifest) -> bool:
    ids = list({c.id for c in manifest.chunks})
    return len(store.has_many(ids)) == len(ids)


def _read_file(root: Path, path: bytes, previous: FlatTree, store: ObjectStore, ingester: Ingester, result: Capture):
    prior = _previous_manifest(path, previous, store)
    for attempt in range(1, MAX_READ_ATTEMPTS + 1):
        try:
            ingested, stat = ingester.ingest(os.path.join(os.fsencode(root), path), prior)
        except FileChangedError:
            log.info("%s changed while being read (attempt %d)", os.fsdecode(path), attempt)
            continue
        result.files_read += 1
        result.bytes_read += ingested.manifest.size
        result.new_bytes += ingested.new_bytes
        return ingested.manifest, stat
    raise ConflictError(
        f"{os.fsdecode(path)} kept changing while it was being read ({MAX_READ_ATTEMPTS} attempts)",
        hint="wait until whatever writes it has finished, or add it to .p2pvcignore, then run the command again",
    )


def _previous_manifest(path: bytes, previous: FlatTree, store: ObjectStore) -> Manifest | None:
    """Return the manifest of the committed version of `path`, to reuse its chunk boundaries."""
    entry = previous.get(path)
    if entry is None or entry.kind != ENTRY_FILE or not store.has(entry.target):
        return None
    manifest = store.get_object(entry.target, model.KIND_MANIFEST)
    assert isinstance(manifest, Manifest)
    return manifest
