"""Append-only pack files.

A pack is `PACK_MAGIC` followed by records. Each record is a fixed header
(`RECORD_HEADER`: magic, kind, codec, raw size, stored size, id) and the
stored bytes. Records are self-describing, so the index could be rebuilt
from the packs alone, and a reader checks the header against the index
entry before it trusts the bytes.

Crash safety: a record becomes visible only when its index row is
committed, and rows are committed only after the pack was fsynced. A crash
leaves at most a torn tail past the indexed size; the next writer that
reuses the pack truncates it, and gc drops it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import queue
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from p2pvc.errors import CorruptionError, StorageError

PACK_MAGIC = b"P2PVCPK\x01"
RECORD_MAGIC = b"P2R1"
RECORD_HEADER = struct.Struct("<4sBBxxQQ32s")  # magic, kind, codec, raw size, stored size, id
KIND_CHUNK = 0


@dataclass(frozen=True, slots=True)
class RecordHeader:
    kind: int
    codec: int
    raw_size: int
    stored_size: int
    id: bytes


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def storage_error(action: str, path: Path, exc: OSError) -> StorageError:
    if exc.errno == errno.ENOSPC:
        return StorageError(
            f"disk full while {action} {path}; nothing was committed",
            hint="free some space (p2pvc gc removes unreachable data) and run the command again",
        )
    return StorageError(f"{action} {path} failed: {exc.strerror or exc}")


class PackAppender:
    """Appends records to one pack, holding an exclusive flock on it so no
    other process appends at the same time. Not thread-safe."""

    def __init__(
        self, path: Path, pack_id: int, durable_size: int | Callable[[], int], *, new: bool
    ) -> None:
        """Open and lock a pack for appending.

        For an existing pack, `durable_size` is a function that reads the indexed
        size: it is called only after the lock is held, because another process
        may append and commit right up to the moment we take the lock, and a size
        read before that would truncate its records.
        """
        self.path = path
        self.pack_id = pack_id
        try:
            flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if new else 0)
            self._fd = os.open(path, flags, 0o644)
        except OSError as exc:
            raise storage_error("opening pack", path, exc) from exc
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise
        self._writer: _BackgroundWriter | None = None
        try:
            if new:
                os.write(self._fd, PACK_MAGIC)
                size = len(PACK_MAGIC)
            else:
                size = durable_size() if callable(durable_size) else durable_size
                # Drop a torn tail that a crashed writer left past the indexed size.
                os.ftruncate(self._fd, size)
            os.lseek(self._fd, size, os.SEEK_SET)
        except OSError as exc:
            self.close()
            raise storage_error("preparing pack", path, exc) from exc
        self.size = size  # bytes appended, durable or not
        self.durable_size = size  # bytes fsynced and indexed
        self._buffer: list[bytes] = []  # parts not yet handed to the writer
        self._buffered = 0  # bytes in _buffer

    def mark_durable(self) -> None:
        """Record that everything appended so far is synced and indexed."""
        self.durable_size = self.size

    def discard_tail(self) -> None:
        """Drop what was appended after the last durable point (a failed write session),
        so a failure such as a full disk frees the space it took."""
        if self._writer is not None:
            self._writer.stop()
            self._writer = None
        self._buffer = []
        self._buffered = 0
        try:
            os.ftruncate(self._fd, self.durable_size)
        except OSError:
            pass  # the next writer of this pack, or gc, truncates it
        self.size = self.durable_size

    BUFFER_LIMIT = 4 * 1024 * 1024  # bytes held before they go to the writer thread

    def append(self, kind: int, codec: int, raw_size: int, oid: bytes, stored: bytes) -> int:
        """Buffer one record; return its offset in the pack."""
        offset = self.size
        self._buffer.append(RECORD_HEADER.pack(RECORD_MAGIC, kind, codec, raw_size, len(stored), oid))
        self._buffer.append(stored)
        self._buffered += RECORD_HEADER.size + len(stored)
        self.size += RECORD_HEADER.size + len(stored)
        if self._buffered >= self.BUFFER_LIMIT:
            # write() of page-cache pages costs about as much kernel time as the rest of a
            # commit on some machines, so it runs on its own thread (it releases the GIL).
            if self._writer is None:
                self._writer = _BackgroundWriter(self._fd, self.path)
            self._writer.submit(self._buffer)
            self._buffer = []
            self._buffered = 0
        return offset

    def sync(self) -> None:
        """Make everything appended so far durable."""
        if self._writer is not None:
            self._writer.wait()
        try:
            _write_all(self._fd, self._buffer)
            self._buffer = []
            self._buffered = 0
            os.fsync(self._fd)
        except OSError as exc:
            raise storage_error("syncing pack", self.path, exc) from exc

    def close(self) -> None:
        if self._writer is not None:
            self._writer.stop()
            self._writer = None
        if self._fd >= 0:
            os.close(self._fd)  # also releases the flock
            self._fd = -1


def _write_all(fd: int, parts: list[bytes]) -> None:
    """Write parts in order with writev, resuming after short writes."""
    index = 0
    while index < len(parts):
        batch = parts[index : index + 512]  # IOV_MAX is 1024 on Linux
        n = os.writev(fd, batch)
        for part in batch:
            if n >= len(part):
                n -= len(part)
                index += 1
            else:
                parts[index] = part[n:]
                break


class _BackgroundWriter:
    """Writes buffers to a file descriptor in order on one thread; errors surface on the next call."""

    MAX_QUEUED = 4  # buffers; bounds memory held while the disk is slower than hashing
    FLUSH_EVERY = 64 * 1024 * 1024  # bytes; start write-back early so the final fsync is short

    def __init__(self, fd: int, path: Path) -> None:
        self._fd = fd
        self._path = path
        self._queue: queue.Queue[list[bytes] | None] = queue.Queue(maxsize=self.MAX_QUEUED)
        self._error: OSError | None = None
        self._thread = threading.Thread(target=self._run, name="p2pvc-pack-write", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        unflushed = 0
        while True:
            data = self._queue.get()
            try:
                if data is None:
                    return
                if self._error is None:
                    _write_all(self._fd, data)
                    unflushed += sum(len(p) for p in data)
                    if unflushed >= self.FLUSH_EVERY:
                        os.fdatasync(self._fd)
                        unflushed = 0
            except OSError as exc:
                self._error = exc
            finally:
                self._queue.task_done()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise storage_error("writing pack", self._path, self._error)

    def submit(self, data: list[bytes]) -> None:
        self._raise_error()
        self._queue.put(data)

    def wait(self) -> None:
        self._queue.join()
        self._raise_error()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()


class PackReader:
    """Reads records by offset. Keeps file descriptors open for reuse."""

    MAX_OPEN = 64

    def __init__(self, packs_dir: Path) -> None:
        self.packs_dir = packs_dir
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()  # checkout reads from several threads

    def read(self, pack_name: str, offset: int, expected_id: bytes, stored_size: int) -> tuple[RecordHeader, bytes]:
        header, data = self._read_record(pack_name, offset, expected_id, stored_size)
        return header, data[RECORD_HEADER.size :]

    def read_view(
        self, pack_name: str, offset: int, expected_id: bytes, stored_size: int
    ) -> tuple[RecordHeader, memoryview]:
        """Return the same as `read`, with the stored bytes as a view of the read buffer instead of a copy."""
        header, data = self._read_record(pack_name, offset, expected_id, stored_size)
        return header, memoryview(data)[RECORD_HEADER.size :]

    def _read_record(self, pack_name: str, offset: int, expected_id: bytes, stored_size: int) -> tuple[RecordHeader, bytes]:
        """Return the checked header and the whole record, header included."""
        path = self.packs_dir / pack_name
        # The read happens under the lock, so no other thread can close (evict) this descriptor meanwhile.
        with self._lock:
            fd = self._open(pack_name)
            try:
                data = os.pread(fd, RECORD_HEADER.size + stored_size, offset)
            except OSError as exc:
                raise storage_error("reading pack", path, exc) from exc
        if len(data) < RECORD_HEADER.size + stored_size:
            raise CorruptionError(
                f"pack {pack_name} is truncated at offset {offset}",
                expected=str(RECORD_HEADER.size + stored_size),
                actual=str(len(data)),
            )
        magic, kind, codec, raw_size, size, oid = RECORD_HEADER.unpack_from(data)
        if magic != RECORD_MAGIC or oid != expected_id or size != stored_size:
            raise CorruptionError(
                f"pack {pack_name} has a damaged record header at offset {offset}",
                expected=expected_id.hex(),
                actual=oid.hex() if magic == RECORD_MAGIC else "no record",
            )
        return RecordHeader(kind, codec, raw_size, size, oid), data

    def _open(self, pack_name: str) -> int:
        fd = self._fds.get(pack_name)
        if fd is None:
            if len(self._fds) >= self.MAX_OPEN:
                self._close_all()
            path = self.packs_dir / pack_name
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError as exc:
                raise CorruptionError(f"pack {pack_name} is missing from {self.packs_dir}") from exc
            except OSError as exc:
                raise storage_error("opening pack", path, exc) from exc
            self._fds[pack_name] = fd
        return fd

    def forget(self, pack_name: str) -> None:
        with self._lock:
            fd = self._fds.pop(pack_name, None)
            if fd is not None:
                os.close(fd)

    def close(self) -> None:
        with self._lock:
            self._close_all()

    def _close_all(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def iter_records(path: Path):
    """Yield (offset, header) for every whole record in a pack; stops at a torn tail."""
    with open(path, "rb") as f:
        if f.read(len(PACK_MAGIC)) != PACK_MAGIC:
            raise CorruptionError(f"{path.name} is not a p2pvc pack")
        offset = len(PACK_MAGIC)
        while True:
            head = f.read(RECORD_HEADER.size)
            if len(head) < RECORD_HEADER.size:
                return
            magic, kind, codec, raw_size, size, oid = RECORD_HEADER.unpack(head)
            if magic != RECORD_MAGIC:
                return
            yield offset, RecordHeader(kind, codec, raw_size, size, oid)
            f.seek(size, os.SEEK_CUR)
            offset += RECORD_HEADER.size + size
