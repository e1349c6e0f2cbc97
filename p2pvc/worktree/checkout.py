"""Making the working tree match a tree: plan, then apply.

Safety rules, in the order they are enforced:

* Tree entry names were validated when the tree was decoded (no "/", "..",
  NUL or ".p2pvc"), so a path can only go down.
* Every file-system call is made relative to a directory descriptor opened
  with O_NOFOLLOW, component by component from the root, so nothing is ever
  read or written through a symlink, whatever the working tree contains.
* Uncommitted work is never overwritten or deleted unless forced: the plan
  lists every path whose working copy differs from HEAD and that the
  checkout would change.
* Each file is written to a temporary name, verified (every chunk against
  its id, the total against the manifest size), then renamed into place,
  so a crash leaves either the old or the new file under each name.
"""

from __future__ import annotations

import contextlib
import errno
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
import os
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from p2pvc.errors import ConflictError, CorruptionError, P2pvcError, StorageError
from p2pvc.objects import model
from p2pvc.objects.chunker import MAX_CHUNK
from p2pvc.objects.ids import chunk_id
from p2pvc.objects.model import ENTRY_DIR, ENTRY_FILE, ENTRY_SYMLINK
from p2pvc.store.objectstore import IndexEntry, ObjectStore
from p2pvc.store.pack import KIND_CHUNK
from p2pvc.worktree.ingest import FileStat
from p2pvc.worktree.snapshot import FlatState
from p2pvc.worktree.statcache import StatCache

# A run of zeros cuts into MAX_CHUNK-sized chunks; writing them as holes keeps sparse files sparse.
ZERO_CHUNK_ID = chunk_id(bytes(MAX_CHUNK))

Entry = tuple[int, bool, bytes, int]  # kind, executable, target, size


@dataclass
class Plan:
    writes: list[tuple[bytes, Entry]] = field(default_factory=list)  # parents before children
    removals: list[bytes] = field(default_factory=list)  # children before parents
    blocked: list[tuple[bytes, str]] = field(default_factory=list)

    @property
    def write_bytes(self) -> int:
        return sum(e[3] for _, e in self.writes if e[0] == ENTRY_FILE)


def _kept_below(folder: bytes, head: FlatState, work: FlatState, target: FlatState, force: bool) -> bytes | None:
    """Return a path below `folder` that the checkout would leave in place (untracked, or
    modified without force), so the folder cannot be replaced by a file; None if there is none."""
    prefix = folder + b"/"
    for path, entry in work.items():
        if not path.startswith(prefix) or entry[0] == ENTRY_DIR:
            continue
        if path not in head:
            return path
        if not force and not _same(entry, head[path]) and path not in target:
            return path
    return None


def _same(a: Entry | None, b: Entry | None) -> bool:
    if a is None or b is None:
        return a is b
    if a[0] == ENTRY_DIR or b[0] == ENTRY_DIR:
        return a[0] == b[0]
    return a[:3] == b[:3]


def plan(head: FlatState, work: FlatState, target: FlatState, *, force: bool, only: list[bytes] | None = None) -> Plan:
    """Work out what to write and remove so that `work` becomes `target`.

    `head` is what the working tree is supposed to contain; a working copy that
    differs from it is uncommitted work and blocks the checkout unless forced.
    With `only`, paths outside those prefixes are left alone (restore).
    """
    result = Plan()

    def in_scope(path: bytes) -> bool:
        return only is None or any(path == p or path.startswith(p + b"/") for p in only)

    def dirty(path: bytes) -> bool:
        return not _same(work.get(path), head.get(path))

    for path in sorted(target):
        if not in_scope(path):
            continue
        want, have = target[path], work.get(path)
        if _same(want, have):
            continue
        if path in head and _same(want, head[path]) and not force:
            continue  # the checkout does not change this path: keep the working copy, edited or not
        if have is not None and dirty(path) and not force:
            kind = "untracked" if path not in head else "modified"
            result.blocked.append((path, f"{kind} in the working tree and different in the checkout"))
            continue
        if have is not None and have[0] == ENTRY_DIR and want[0] != ENTRY_DIR:
            kept = _kept_below(path, head, work, target, force)
            if kept:
                result.blocked.append(
                    (path, f"a folder where the checkout puts a file, and {os.fsdecode(kept)} inside it would stay")
                )
                continue
        result.writes.append((path, want))
    for path in sorted(work, key=lambda p: (-p.count(b"/"), p)):
        if path in target or not in_scope(path):
            continue  # kept, or replaced by the write above
        if path not in head:
            continue  # untracked and not in the way of anything: keep
        if work[path][0] != ENTRY_DIR and dirty(path) and not force:
            result.blocked.append((path, "modified in the working tree and removed in the checkout"))
            continue
        result.removals.append(path)
    return result


class _SafeTree:
    """Directory descriptors for paths below a root, opened without following symlinks.

    At most `MAX_OPEN_DIRS` stay open (least recently used are closed), so a tree
    with many folders cannot run out of file descriptors. Writes go in sorted path
    order, so the folders in use are the most recent ones.
    """

    MAX_OPEN_DIRS = 64

    def __init__(self, root: Path) -> None:
        self.root = root
        self._root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        self._fds: OrderedDict[bytes, int] = OrderedDict()

    def parent(self, path: bytes, create: bool) -> tuple[int, bytes]:
        parent, _, name = path.rpartition(b"/")
        return self.dir(parent, create), name

    def dir(self, path: bytes, create: bool) -> int:
        if not path:
            return self._root_fd
        fd = self._fds.get(path)
        if fd is not None:
            self._fds.move_to_end(path)
            return fd
        parent_fd, name = self.parent(path, create)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd)
        except FileNotFoundError:
            if not create:
                raise
            os.mkdir(name, 0o777, dir_fd=parent_fd)
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise ConflictError(
                    f"{os.fsdecode(path)} is a symlink or file where a folder belongs; p2pvc never writes through it",
                    hint="move it away (or use --force to replace it), then run the command again",
                ) from exc
            raise
        self._fds[path] = fd
        while len(self._fds) > self.MAX_OPEN_DIRS:
            _old_path, old_fd = self._fds.popitem(last=False)
            os.close(old_fd)
        return fd

    def forget(self, path: bytes) -> None:
        for key in [k for k in self._fds if k == path or k.startswith(path + b"/")]:
            os.close(self._fds.pop(key))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        os.close(self._root_fd)


@dataclass
class ApplyResult:
    files_written: int = 0
    bytes_written: int = 0
    removed: int = 0
    kept_folders: list[bytes] = field(default_factory=list)  # not empty: untracked files inside


def apply(
    root: Path,
    the_plan: Plan,
    store: ObjectStore,
    cache: StatCache | None,
    progress: Callable[[int], None] | None = None,
) -> ApplyResult:
    if the_plan.blocked:
        first, reason = the_plan.blocked[0]
        raise ConflictError(
            f"checkout would overwrite uncommitted or untracked work in {len(the_plan.blocked)} path(s), "
            f"first: {os.fsdecode(first)} ({reason})",
            hint="commit it, move it away, or use --force to discard it",
        )
    result = ApplyResult()
    umask = _umask()
    tree = _SafeTree(root)
    pool = ThreadPoolExecutor(max_workers=CHECKOUT_WORKERS, thread_name_prefix="p2pvc-checkout")
    try:
        for path in the_plan.removals:
            _remove(tree, path, result)
        for path, entry in the_plan.writes:
            _write(tree, path, entry, store, cache, umask, result, progress, pool)
    except OSError as exc:
        error = StorageError(f"checkout failed at {exc.filename or root}: {exc.strerror}")
        raise _note_partial(error, result) from exc
    except P2pvcError as exc:
        raise _note_partial(exc, result)
    finally:
        pool.shutdown(wait=True)
        tree.close()
    return result


def _note_partial(error: P2pvcError, result: ApplyResult) -> P2pvcError:
    """Tell the user when a failed apply had already changed the tree; sets `error.partial_paths`."""
    changed = result.removed + result.files_written
    error.partial_paths = changed  # type: ignore[attr-defined]
    if changed:
        note = f"the working tree is partly changed ({changed} path(s) already removed or written)"
        error.hint = f"{note}; {error.hint}" if error.hint else note
    return error


def _remove(tree: _SafeTree, path: bytes, result: ApplyResult) -> None:
    try:
        parent_fd, name = tree.parent(path, create=False)
    except FileNotFoundError:
        return
    try:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        tree.forget(path)
        try:
            os.rmdir(name, dir_fd=parent_fd)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            result.kept_folders.append(path)
            return
    else:
        os.unlink(name, dir_fd=parent_fd)
    result.removed += 1


def _clear(parent_fd: int, name: bytes, tree: _SafeTree, path: bytes) -> None:
    """Remove what is at `name` when it is in the way; only empty folders can be removed."""
    try:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        tree.forget(path)
        try:
            os.rmdir(name, dir_fd=parent_fd)
        except OSError as exc:
            raise ConflictError(
                f"{os.fsdecode(path)} is a folder with untracked files where the checkout puts a file",
                hint="move the folder away, then run the command again",
            ) from exc
    else:
        os.unlink(name, dir_fd=parent_fd)


def _write(tree, path, entry: Entry, store, cache, umask, result: ApplyResult, progress, pool) -> None:
    kind, executable, target, size = entry
    if kind == ENTRY_DIR:
        parent_fd, name = tree.parent(path, create=True)
        try:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                return
            _clear(parent_fd, name, tree, path)
        except FileNotFoundError:
            pass
        tree.dir(path, create=True)
        return
    parent_fd, name = tree.parent(path, create=True)
    tmp = b".p2pvc-tmp-" + secrets.token_hex(6).encode() + b"-" + name[:100]
    if kind == ENTRY_SYMLINK:
        os.symlink(target, tmp, dir_fd=parent_fd)
    else:
        mode = (0o777 if executable else 0o666) & ~umask
        manifest = store.get_object(target, model.KIND_MANIFEST)
        assert isinstance(manifest, model.Manifest)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode, dir_fd=parent_fd)
        try:
            written = _write_content(fd, manifest, store, pool, progress)
            if written != manifest.size:
                raise CorruptionError(
                    f"restored {os.fsdecode(path)} has the wrong size", expected=str(manifest.size), actual=str(written)
                )
            os.fchmod(fd, mode)
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp, dir_fd=parent_fd)
            raise
        os.close(fd)
    try:
        _clear(parent_fd, name, tree, path)
        os.rename(tmp, name, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=parent_fd)
        raise
    if kind == ENTRY_FILE:
        # Stat after the rename, because a rename changes the ctime on ext4 and the cache
        # row must match what the next status reads.
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        result.files_written += 1
        result.bytes_written += size
        if cache is not None:
            cache.record(path, FileStat.of(st), target)


CHECKOUT_WORKERS = 2
CHECKOUT_BATCH_BYTES = 2 * 1024 * 1024  # raw bytes per worker task: one pwritev each
CHECKOUT_IN_FLIGHT = 4  # tasks queued per worker; a failure stops the rest soon
INLINE_MAX = 1024 * 1024  # bytes; smaller files are written on the calling thread


def _is_hole(ref: model.ChunkRef) -> bool:
    return ref.id == ZERO_CHUNK_ID and ref.size == MAX_CHUNK


def _plan_batches(manifest: model.Manifest, store: ObjectStore) -> list[list[tuple[IndexEntry, int]]]:
    """Group the file's chunks into runs of consecutive (entry, file offset) pairs, split at holes.

    Looks every chunk up in the index first, with one query per 500 ids, and raises
    CorruptionError for a chunk that is missing, is not a chunk or has another size.
    """
    entries = store.entries(ref.id for ref in manifest.chunks if not _is_hole(ref))
    batches: list[list[tuple[IndexEntry, int]]] = []
    batch: list[tuple[IndexEntry, int]] = []
    batch_bytes = 0
    offset = 0
    for ref in manifest.chunks:
        if _is_hole(ref):
            if batch:
                batches.append(batch)
                batch, batch_bytes = [], 0
            offset += ref.size
            continue
        entry = entries.get(ref.id)
        if entry is None:
            raise CorruptionError(f"chunk {ref.id.hex()} is missing from the store", expected=ref.id.hex())
        if entry.kind != KIND_CHUNK:
            raise CorruptionError(f"{ref.id.hex()} is a {model.KIND_NAMES.get(entry.kind, entry.kind)}, not a chunk")
        if entry.raw_size != ref.size:
            raise CorruptionError(
                f"chunk {ref.id.hex()} has another size in the store than in its manifest",
                expected=str(ref.size),
                actual=str(entry.raw_size),
            )
        batch.append((entry, offset))
        batch_bytes += ref.size
        offset += ref.size
        if batch_bytes >= CHECKOUT_BATCH_BYTES:
            batches.append(batch)
            batch, batch_bytes = [], 0
    if batch:
        batches.append(batch)
    return batches


def _write_batch(fd: int, store: ObjectStore, batch: list[tuple[IndexEntry, int]]) -> int:
    """Read, decode and verify a run of consecutive chunks, then write them with one pwritev; return the byte count."""
    parts = [store.read_entry_view(entry) for entry, _offset in batch]
    offset = batch[0][1]
    total = sum(len(p) for p in parts)
    _pwrite_all(fd, parts, offset)
    return total


def _pwrite_all(fd: int, parts: list[bytes | memoryview], offset: int) -> None:
    """Write parts contiguously from `offset`, resuming after short writes."""
    views = [memoryview(p) for p in parts]
    while views:
        n = os.pwritev(fd, views[:512], offset)  # IOV_MAX is 1024 on Linux
        if n == 0:
            raise OSError(errno.EIO, "pwritev wrote nothing")
        offset += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if n:
            views[0] = views[0][n:]


def _write_content(fd: int, manifest: model.Manifest, store: ObjectStore, pool: ThreadPoolExecutor, progress) -> int:
    """Write every chunk at its offset, each verified against its id by the store; return the bytes covered.

    Worker threads read, decompress, verify and write whole batches (pread, zstd,
    blake3 and pwritev release the GIL), so this thread only queues batches and
    reports progress. Runs of zeros of MAX_CHUNK bytes stay holes. Before it
    returns or raises, no task writes to `fd` any more.
    """
    batches = _plan_batches(manifest, store)
    written = manifest.size - sum(entry.raw_size for batch in batches for entry, _ in batch)  # holes
    if progress is not None and written:
        progress(written)
    if manifest.size <= INLINE_MAX:
        for batch in batches:
            count = _write_batch(fd, store, batch)
            written += count
            if progress is not None:
                progress(count)
    else:
        pending: deque[Future] = deque()
        try:
            for batch in batches:
                pending.append(pool.submit(_write_batch, fd, store, batch))
                while len(pending) > CHECKOUT_IN_FLIGHT * CHECKOUT_WORKERS:
                    count = pending.popleft().result()
                    written += count
                    if progress is not None:
                        progress(count)
            while pending:
                count = pending.popleft().result()
                written += count
                if progress is not None:
                    progress(count)
        finally:
            for future in pending:
                future.cancel()
            wait(pending)  # the caller closes `fd` next: no task may write to a reused descriptor
    # Sets the size where the file ends in a hole, and is a no-op otherwise.
    os.ftruncate(fd, manifest.size)
    return written


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
