"""Turning a file into a manifest: read, chunk, hash, and optionally store.

Theory of operation. A reader thread fills `PIECE_SIZE` blocks. The main
thread walks them with a position `pos` that is always a chunk boundary of
the sequential FastCDC chunking of the whole file, and emits one chunk at a
time. Two ways to find the next chunk:

* Reuse: if the previous version of the file (its manifest) had a chunk
  starting at `pos`, hash the same span of the new bytes. If the hash
  matches, that is the next chunk and no cut is needed. This is exact: a
  FastCDC cut depends only on the bytes from the chunk start up to the cut
  and on whether `MAX_CHUNK` bytes remain, so identical bytes at a true
  boundary give the identical cut. It is only used where both files have
  `MAX_CHUNK` bytes left, so end-of-file effects never differ.
* Cut: run FastCDC on `MAX_CHUNK` bytes from `pos` (fewer at the end of the
  file) and take its first chunk, exactly as the streaming chunker would.

So a new checkpoint in which 10% of tensors changed costs one hash pass
over the unchanged 90%, not a cut, and boundaries never depend on the
piece size. New chunks are compressed on worker threads (zstd releases the
GIL) and appended by the main thread.

A file that changes while it is read is detected by comparing fstat before
and after and the byte count; the caller gets FileChangedError and retries,
so a manifest always describes exactly the bytes that were hashed and stored.
"""

from __future__ import annotations

import os
import queue
import stat
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import blake3

from p2pvc.errors import P2pvcError, StorageError
from p2pvc.objects import compress
from p2pvc.objects.chunker import MAX_CHUNK, first_chunk
from p2pvc.objects.model import ChunkRef, Manifest
from p2pvc.store.objectstore import WriteSession
from p2pvc.store.pack import KIND_CHUNK

PIECE_SIZE = 8 * 1024 * 1024  # bytes per read; boundaries do not depend on it
READ_AHEAD = 2  # pieces
MAX_COMPRESS_IN_FLIGHT = 64  # chunks; bounds memory held by pending compression


_ZERO_WINDOW = bytes(MAX_CHUNK)
_ZERO_PREFIX = bytes(64)
_ZERO_CUT_SIZE = len(first_chunk(_ZERO_WINDOW))
_ZERO_CUT_ID = blake3.blake3(_ZERO_WINDOW[:_ZERO_CUT_SIZE]).digest()


class FileChangedError(P2pvcError):
    """The file changed while it was being read."""

    exit_code = 4


@dataclass
class IngestResult:
    manifest: Manifest
    new_bytes: int  # raw bytes of chunks not in the store before
    reused_chunks: int  # chunks found by hashing the previous version's spans


@dataclass(frozen=True)
class FileStat:
    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileStat:
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


class Ingester:
    """Chunks files; with a WriteSession it also stores the new chunks.

    One instance serves many files; call close() to stop its threads.
    """

    def __init__(self, session: WriteSession | None, *, workers: int = 2, progress=None) -> None:
        self.session = session
        self.progress = progress  # called with a byte count as bytes are hashed
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="p2pvc-compress") if session else None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> Ingester:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def ingest(self, path: os.PathLike | str, previous: Manifest | None = None) -> tuple[IngestResult, FileStat]:
        """Chunk one regular file; raises FileChangedError if it changed meanwhile."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            raise StorageError(f"cannot read {os.fsdecode(path)}: {exc.strerror}") from exc
        try:
            before = os.fstat(fd)
            if not stat.S_ISREG(before.st_mode):
                raise FileChangedError(f"{os.fsdecode(path)} is no longer a regular file")
            run = _FileRun(self, fd, before.st_size, previous)
            result = run.execute()
            after = os.fstat(fd)
        finally:
            os.close(fd)
        if (
            run.bytes_read != before.st_size
            or FileStat.of(before) != FileStat.of(after)
            or after.st_size != before.st_size
        ):
            raise FileChangedError(f"{os.fsdecode(path)} changed while it was being read")
        return result, FileStat.of(after)


class _FileRun:
    def __init__(self, owner: Ingester, fd: int, size: int, previous: Manifest | None) -> None:
        self.owner = owner
        self.session = owner.session
        self.fd = fd
        self.size = size
        self.bytes_read = 0
        self.chunks: list[ChunkRef] = []
        self.new_bytes = 0
        self.reused = 0
        self.pos = 0
        self._pending: deque[tuple[bytes, int, Future]] = deque()
        self._queued: set[bytes] = set()  # ids already batched in this file
        self._batch: list[tuple[bytes, memoryview]] = []
        self._reuse: dict[int, ChunkRef] = {}
        self._reuse_limit = 0
        if previous is not None and previous.chunks:
            offset = 0
            for ref in previous.chunks:
                self._reuse[offset] = ref
                offset += ref.size
            # Spans must leave MAX_CHUNK bytes in both files, so end-of-file cuts never differ.
            self._reuse_limit = min(previous.size, size) - MAX_CHUNK

    def execute(self) -> IngestResult:
        carry: memoryview | None = None
        joined: memoryview | None = None
        carry_offset = 0
        done_with: bytearray | None = None  # the piece before the current one
        for piece_offset, piece, eof, buffer in self._pieces():
            if carry is not None:
                # Chunks that start in the previous piece and may run into this one are cut
                # from a small joined buffer: the leftover plus 2 * MAX_CHUNK bytes of the new piece.
                joined = memoryview(bytes(carry) + bytes(piece[: 2 * MAX_CHUNK]))
                carry = None
            if done_with is not None:
                self._free.put(done_with)  # nothing refers to it any more: the reader may refill it
            done_with = buffer
            if joined is not None:
                joined_eof = eof and len(piece) <= 2 * MAX_CHUNK
                self._walk(joined, carry_offset, joined_eof, stop_at=piece_offset)
                if self.pos < piece_offset:
                    # Only when the new piece is short: `joined` already contains all of it.
                    carry = joined[self.pos - carry_offset :]
                    carry_offset = self.pos
                    joined = None
                    continue
                joined = None
            self._walk(piece, piece_offset, eof)
            end = piece_offset + len(piece)
            if self.pos < end:
                carry = piece[self.pos - piece_offset :]
                carry_offset = self.pos
        if carry is not None:  # a file that ended inside the carried bytes
            self._walk(memoryview(bytes(carry)), carry_offset, True)
        self._drain(0)
        return IngestResult(Manifest(self.pos, tuple(self.chunks)), self.new_bytes, self.reused)

    def _walk(self, buf: memoryview, buf_offset: int, eof: bool, stop_at: int | None = None) -> None:
        try:
            self._walk_chunks(buf, buf_offset, eof, stop_at)
        finally:
            self._store_batch()

    def _walk_chunks(self, buf: memoryview, buf_offset: int, eof: bool, stop_at: int | None) -> None:
        end = buf_offset + len(buf)
        while self.pos < end:
            if stop_at is not None and self.pos >= stop_at:
                return
            start = self.pos - buf_offset
            if not eof and self.pos + MAX_CHUNK > end:
                return  # not enough bytes to cut like the streaming chunker: wait for more
            ref = self._reuse.get(self.pos)
            if ref is not None and self.pos <= self._reuse_limit and start + ref.size <= len(buf):
                data = buf[start : start + ref.size]
                if blake3.blake3(data).digest() == ref.id:
                    self.reused += 1
                    self._emit(ref.id, data)
                    continue
            window = buf[start : start + MAX_CHUNK]
            # memoryview comparison is slow, so test a short prefix first and copy only zero-led windows.
            if len(window) == MAX_CHUNK and window[:64].tobytes() == _ZERO_PREFIX and window.tobytes() == _ZERO_WINDOW:
                # Holes of sparse files and zero padding: the cut of an all-zero window is
                # always the same, so take it from the precomputed chunk (a memcmp, not a cut).
                self._emit(_ZERO_CUT_ID, window[:_ZERO_CUT_SIZE])
                continue
            data = first_chunk(window)
            self._emit(blake3.blake3(data).digest(), data)

    def _emit(self, cid: bytes, data: memoryview) -> None:
        size = len(data)
        self.chunks.append(ChunkRef(cid, size))
        self.pos += size
        if self.owner.progress is not None:
            self.owner.progress(size)
        if self.session is not None and cid not in self._queued:
            self._queued.add(cid)
            self._batch.append((cid, data))

    def _store_batch(self) -> None:
        """Compress and store the new chunks among those emitted since the last call.

        Called at the end of every walk, while the pieces under the batched
        views are still valid; one index query covers the whole batch.
        """
        if not self._batch:
            return
        assert self.session is not None and self.owner._pool is not None
        present = self.session.has_many([cid for cid, _ in self._batch])
        for cid, data in self._batch:
            if cid in present:
                continue
            # A copy: the piece under `data` is recycled once the walk moves on.
            future = self.owner._pool.submit(compress.encode, bytes(data))
            self._pending.append((cid, len(data), future))
            self._drain(MAX_COMPRESS_IN_FLIGHT)
        self._batch.clear()

    def _drain(self, keep: int) -> None:
        while len(self._pending) > keep:
            cid, size, future = self._pending.popleft()
            codec, stored = future.result()
            if self.session.put_encoded(KIND_CHUNK, cid, size, codec, stored, checked=True):
                self.new_bytes += size

    def _pieces(self):
        """Yield (offset, piece, is_last, buffer) with a read-ahead thread.

        Buffers come from a small ring (`_free`), because fresh multi-MiB
        allocations cost page faults that showed up as a third of the time.
        The caller puts a buffer back into `_free` when nothing refers to it.
        """
        full: queue.Queue = queue.Queue()
        self._free: queue.Queue = queue.Queue()
        for _ in range(READ_AHEAD + 4):
            self._free.put(None)  # allocated on first use
        stop = threading.Event()

        def reader() -> None:
            offset = 0
            try:
                while not stop.is_set():
                    try:
                        buf = self._free.get(timeout=0.1)
                    except queue.Empty:
                        continue
                    if buf is None:
                        buf = bytearray(PIECE_SIZE)
                    n = os.readv(self.fd, [buf])
                    full.put((offset, buf, n, None))
                    offset += n
                    if n == 0:
                        return
            except OSError as exc:
                full.put((offset, None, 0, exc))

        thread = threading.Thread(target=reader, name="p2pvc-read", daemon=True)
        thread.start()
        try:
            pending = None
            while True:
                offset, buf, n, error = full.get()
                if error is not None:
                    raise StorageError(f"read failed: {error.strerror}") from error
                self.bytes_read += n
                if pending is not None:
                    yield pending[0], memoryview(pending[1])[: pending[2]], n == 0, pending[1]
                if n == 0:
                    return
                pending = (offset, buf, n)
        finally:
            stop.set()
            thread.join()
