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
piece size.

Only the cuts are sequential. The rest runs on worker threads, because
blake3, zstd and SQLite release the GIL. When a piece arrives, the reuse
hashes of every previous span inside it are computed ahead. That stops
while the last piece walked reused no chunk, so a wholly rewritten file
wastes the hashing of its first two pieces only. Emitted chunks go out in
batches of about `BATCH_BYTES` that a worker hashes, checks against the
index and compresses. The main thread appends the results in order. A
piece buffer goes back to the reader only after every task that reads it
has finished, so no chunk is copied before compression.

A file that changes while it is read is detected by comparing fstat before
and after and the byte count; the caller gets FileChangedError and retries,
so a manifest always describes exactly the bytes that were hashed and stored.
"""

from __future__ import annotations

import bisect
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
RETIRED_PIECES = 2  # walked pieces whose buffers wait for their tasks before the reader reuses them
BATCH_BYTES = 1024 * 1024  # bytes of new chunks per worker task: fewer tasks, but enough to keep 2 workers busy
BATCH_CHUNKS = 64  # chunks per worker task when they need no hashing (reused spans)
INLINE_MAX = 1024 * 1024  # bytes; smaller files are hashed on the calling thread


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
        self.progress = progress  # called with a byte count as chunks are cut or reused
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="p2pvc-ingest")

    def close(self) -> None:
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


def _hash_and_encode(
    session: WriteSession | None, items: list[tuple[bytes | None, memoryview]]
) -> tuple[int, list[tuple[bytes, tuple[int, bytes] | None]]]:
    """Hash the chunks that have no id yet and encode those the store lacks, on a worker thread.

    Returns the session's generation read before the index was queried, and one
    (id, (codec, stored bytes) or None) pair per item, None when the chunk is
    stored or pending already, or appears earlier in the same batch.
    """
    ids = [cid if cid is not None else blake3.blake3(data).digest() for cid, data in items]
    if session is None:
        return 0, [(cid, None) for cid in ids]
    generation = session.generation
    absent = session.absent(ids)
    results: list[tuple[bytes, tuple[int, bytes] | None]] = []
    sample = True
    for cid, (_, data) in zip(ids, items):
        encoded = None
        if cid in absent:
            absent.discard(cid)  # a repeat inside the batch is stored once
            codec, stored = encoded = compress.encode(data, sample=sample)
            sample = not compress.compressed_well(len(data), codec, stored)
        results.append((cid, encoded))
    return generation, results


def _matching_spans(view: memoryview, view_offset: int, spans: list[ChunkRef], offsets: list[int]) -> set[int]:
    """Return the file offsets of the previous version's spans whose bytes in `view` still hash to their id."""
    matches = set()
    for ref, offset in zip(spans, offsets):
        start = offset - view_offset
        if blake3.blake3(view[start : start + ref.size]).digest() == ref.id:
            matches.add(offset)
    return matches


@dataclass
class _Speculation:
    """Reuse hashes computed ahead for the previous version's spans inside one piece."""

    start: int  # file offset of the piece
    end: int  # file offset just past the piece
    limit: int  # last span start that was hashed (`_reuse_limit`, or less)
    futures: list[Future]  # each returns a set of matching file offsets

    def matches(self) -> set[int]:
        merged: set[int] = set()
        for future in self.futures:
            merged |= future.result()
        return merged


@dataclass
class _Task:
    indices: list[int]  # positions of the batch's chunks in the manifest
    sizes: list[int]
    future: Future


class _FileRun:
    def __init__(self, owner: Ingester, fd: int, size: int, previous: Manifest | None) -> None:
        self.owner = owner
        self.session = owner.session
        self.fd = fd
        self.size = size
        self.bytes_read = 0
        self.chunks: list[ChunkRef | None] = []  # None until a worker has hashed the chunk
        self.new_bytes = 0
        self.reused = 0
        self.pos = 0
        self._inline = size <= INLINE_MAX

        self._queued: set[bytes] = set()  # known ids already batched in this file
        self._batch: list[tuple[bytes | None, memoryview]] = []
        self._batch_indices: list[int] = []
        self._batch_work = 0  # bytes in the batch that need hashing
        self._tasks: deque[_Task] = deque()
        self._submitted = 0  # tasks submitted; the first `_consumed` of them are appended
        self._consumed = 0

        self._retired: deque[tuple[bytearray, int, int]] = deque()  # buffer, piece offset, task count
        self._speculations: dict[int, _Speculation] = {}  # by piece offset
        self._speculate = True  # false while the previous piece had no reused chunk
        self._piece_reused = 0

        self._reuse: dict[int, ChunkRef] = {}
        self._reuse_offsets: list[int] = []
        self._reuse_limit = 0
        self._stored: set[bytes] = set()  # ids of the previous version that the store contains
        if previous is not None and previous.chunks and self.session is not None:
            # One lookup for the whole previous version: reused chunks then need no check by a worker.
            self._stored = self.session.store.has_many(list({ref.id for ref in previous.chunks}))
        if previous is not None and previous.chunks:
            offset = 0
            for ref in previous.chunks:
                self._reuse[offset] = ref
                self._reuse_offsets.append(offset)
                offset += ref.size
            # Spans must leave MAX_CHUNK bytes in both files, so end-of-file cuts never differ.
            self._reuse_limit = min(previous.size, size) - MAX_CHUNK

    def execute(self) -> IngestResult:
        carry: memoryview | None = None
        joined: memoryview | None = None
        carry_offset = 0
        done_with: tuple[bytearray, int] | None = None  # the piece before the current one
        for piece_offset, piece, eof, buffer in self._pieces():
            if carry is not None:
                # Chunks that start in the previous piece and may run into this one are cut
                # from a small joined buffer: the leftover plus 2 * MAX_CHUNK bytes of the new piece.
                joined = memoryview(bytes(carry) + bytes(piece[: 2 * MAX_CHUNK]))
                carry = None
            if done_with is not None:
                self._retire(*done_with)  # the walk no longer refers to it, but tasks may still read it
            done_with = (buffer, piece_offset)
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
            self._piece_reused = self.reused
            self._walk(piece, piece_offset, eof)
            self._speculate = self.reused > self._piece_reused
            end = piece_offset + len(piece)
            if self.pos < end:
                carry = piece[self.pos - piece_offset :]
                carry_offset = self.pos
        if carry is not None:  # a file that ended inside the carried bytes
            self._walk(memoryview(bytes(carry)), carry_offset, True)
        self._consume(self._submitted)
        for speculation in self._speculations.values():
            speculation.matches()
        chunks = tuple(ref for ref in self.chunks if ref is not None)
        assert len(chunks) == len(self.chunks)
        return IngestResult(Manifest(self.pos, chunks), self.new_bytes, self.reused)

    def _walk(self, buf: memoryview, buf_offset: int, eof: bool, stop_at: int | None = None) -> None:
        try:
            self._walk_chunks(buf, buf_offset, eof, stop_at)
        finally:
            self._submit_batch()

    def _walk_chunks(self, buf: memoryview, buf_offset: int, eof: bool, stop_at: int | None) -> None:
        end = buf_offset + len(buf)
        speculation = self._speculations.pop(buf_offset, None)
        matches = speculation.matches() if speculation is not None else set()
        while self.pos < end:
            if stop_at is not None and self.pos >= stop_at:
                return
            start = self.pos - buf_offset
            if not eof and self.pos + MAX_CHUNK > end:
                return  # not enough bytes to cut like the streaming chunker: wait for more
            ref = self._reuse.get(self.pos)
            if ref is not None and self.pos <= self._reuse_limit and start + ref.size <= len(buf):
                data = buf[start : start + ref.size]
                if speculation is not None and self.pos <= speculation.limit and self.pos + ref.size <= speculation.end:
                    same = self.pos in matches
                else:
                    same = blake3.blake3(data).digest() == ref.id
                if same:
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
            self._emit(None, first_chunk(window))

    def _emit(self, cid: bytes | None, data: memoryview) -> None:
        """Append a chunk to the manifest; `cid` is None when a worker still has to hash it."""
        size = len(data)
        self.pos += size
        if self.owner.progress is not None:
            self.owner.progress(size)
        if cid is not None:
            self.chunks.append(ChunkRef(cid, size))
            if self.session is None or cid in self._queued or cid in self._stored:
                return
            self._queued.add(cid)
        else:
            self.chunks.append(None)
            self._batch_work += size
        self._batch.append((cid, data))
        self._batch_indices.append(len(self.chunks) - 1)
        if self._batch_work >= BATCH_BYTES or len(self._batch) >= BATCH_CHUNKS:
            self._submit_batch()

    def _submit_batch(self) -> None:
        """Hand the batched chunks to a worker.

        Called at the end of every walk too, while the buffers under the batched views are still valid.
        """
        if not self._batch:
            return
        sizes = [len(data) for _, data in self._batch]
        future = self._submit(_hash_and_encode, self.session, self._batch)
        self._tasks.append(_Task(self._batch_indices, sizes, future))
        self._submitted += 1
        self._batch = []
        self._batch_indices = []
        self._batch_work = 0
        while self._tasks and self._tasks[0].future.done():
            self._consume(self._consumed + 1)

    def _submit(self, fn, *args) -> Future:
        if self._inline:
            # A small file: a worker round trip costs more than the work.
            future: Future = Future()
            future.set_result(fn(*args))
            return future
        return self.owner._pool.submit(fn, *args)

    def _consume(self, count: int) -> None:
        """Take the results of the first `count` tasks in order: fill in ids, append new chunks."""
        while self._consumed < count:
            task = self._tasks.popleft()
            generation, results = task.future.result()
            self._consumed += 1
            for index, size, (cid, encoded) in zip(task.indices, task.sizes, results):
                self.chunks[index] = ChunkRef(cid, size)
                if encoded is None:
                    continue
                assert self.session is not None
                codec, stored = encoded
                # A batch committed after the worker's check may have stored the id meanwhile.
                checked = generation == self.session.generation
                if self.session.put_encoded(KIND_CHUNK, cid, size, codec, stored, checked=checked):
                    self.new_bytes += size

    def _retire(self, buffer: bytearray, piece_offset: int) -> None:
        """Return a piece buffer to the reader once every task submitted so far has finished with it.

        The last `RETIRED_PIECES` buffers wait, so workers are not drained at every piece.
        """
        self._retired.append((buffer, piece_offset, self._submitted))
        while len(self._retired) > RETIRED_PIECES:
            old_buffer, old_offset, tasks = self._retired.popleft()
            self._consume(tasks)
            speculation = self._speculations.pop(old_offset, None)
            if speculation is not None:  # a piece short enough to be walked only inside `joined`
                speculation.matches()
            self._free.put(old_buffer)

    def _start_speculation(self, piece_offset: int, piece: memoryview) -> None:
        """Hash, on the workers, every previous span that lies inside the piece and may be reused."""
        if not self._speculate or not self._reuse_offsets or self._inline:
            return
        end = piece_offset + len(piece)
        limit = min(self._reuse_limit, end - 1)
        first = bisect.bisect_left(self._reuse_offsets, piece_offset)
        spans: list[ChunkRef] = []
        offsets: list[int] = []
        for offset in self._reuse_offsets[first:]:
            if offset > limit:
                break
            ref = self._reuse[offset]
            if offset + ref.size > end:
                break
            spans.append(ref)
            offsets.append(offset)
        if not spans:
            return
        half = len(spans) // 2
        parts = [(spans[:half], offsets[:half]), (spans[half:], offsets[half:])]
        futures = [self._submit(_matching_spans, piece, piece_offset, s, o) for s, o in parts if s]
        self._speculations[piece_offset] = _Speculation(piece_offset, end, limit, futures)

    def _pieces(self):
        """Yield (offset, piece, is_last, buffer) with a read-ahead thread.

        Buffers come from a small ring (`_free`), because fresh multi-MiB
        allocations cost page faults that showed up as a third of the time.
        The caller puts a buffer back into `_free` when nothing refers to it.
        """
        full: queue.Queue = queue.Queue()
        self._free: queue.Queue = queue.Queue()
        for _ in range(READ_AHEAD + RETIRED_PIECES + 3):
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
                if n:
                    self._start_speculation(offset, memoryview(buf)[:n])
                if pending is not None:
                    yield pending[0], memoryview(pending[1])[: pending[2]], n == 0, pending[1]
                if n == 0:
                    return
                pending = (offset, buf, n)
        finally:
            stop.set()
            thread.join()

