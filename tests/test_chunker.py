"""Tests that chunk boundaries depend only on the bytes, never on how they are read.

Three chunkers must agree: `chunk_bytes` on the whole buffer (the reference),
`iter_chunks` on a stream with any read size, and `Ingester.ingest` on a
file, with any `PIECE_SIZE` and with or without the previous version's
manifest to reuse.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pvc.objects.chunker import MAX_CHUNK, MIN_CHUNK, chunk_bytes, iter_chunks
from p2pvc.objects.ids import chunk_id
from p2pvc.objects.model import ChunkRef, Manifest
from p2pvc.worktree import ingest
from p2pvc.worktree.ingest import Ingester

from conftest import random_bytes


def mixed_bytes(size: int, seed: int | str) -> bytes:
    """Return random bytes with runs of zeros, which only forced MAX_CHUNK cuts can split."""
    rng = random.Random(seed)
    parts = []
    total = 0
    while total < size:
        length = rng.randrange(1, 3 * MAX_CHUNK)
        parts.append(bytes(length) if rng.random() < 0.3 else rng.randbytes(length))
        total += length
    return b"".join(parts)[:size]


def reference_chunks(data: bytes) -> list[ChunkRef]:
    return [ChunkRef(chunk_id(c), len(c)) for c in chunk_bytes(data)]


class ShortReader(io.RawIOBase):
    """Wraps a file so that each readinto returns at most `limit` bytes, or a random amount up to it."""

    def __init__(self, file, limit: int, rng: random.Random | None = None) -> None:
        self.file = file
        self.limit = limit
        self.rng = rng

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        size = min(len(buffer), self.rng.randint(1, self.limit) if self.rng else self.limit)
        data = self.file.read(size)
        buffer[: len(data)] = data
        return len(data)


def stream_chunks(path: Path, limit: int, rng: random.Random | None = None) -> list[ChunkRef]:
    with open(path, "rb") as f:
        return [ChunkRef(chunk_id(c), len(c)) for c in iter_chunks(ShortReader(f, limit, rng))]


def ingest_file(path: Path, previous: Manifest | None = None) -> ingest.IngestResult:
    with Ingester(None) as ingester:
        result, _stat = ingester.ingest(path, previous)
    return result


EDGE_SIZES = [
    0,
    1,
    MIN_CHUNK - 1,
    MIN_CHUNK,
    MIN_CHUNK + 1,
    MAX_CHUNK - 1,
    MAX_CHUNK,
    MAX_CHUNK + 1,
    2 * MAX_CHUNK + 1,
    3 * 1024 * 1024 + 17,
]

READ_LIMITS = [1, 4095, MIN_CHUNK + 3, MAX_CHUNK - 1, MAX_CHUNK + 1, 1 << 20]


# iter_chunks on streams ---------------------------------------------------------------


@pytest.mark.parametrize("limit", READ_LIMITS)
@pytest.mark.parametrize("size", [0, 1, MAX_CHUNK + 1, 1 << 20])
def test_stream_short_reads(tmp_path: Path, size: int, limit: int) -> None:
    data = mixed_bytes(size, f"stream-{size}")
    path = tmp_path / "data"
    path.write_bytes(data)
    assert stream_chunks(path, limit) == reference_chunks(data)


@pytest.mark.parametrize("seed", range(4))
def test_stream_random_reads(tmp_path: Path, seed: int) -> None:
    data = mixed_bytes(2 * 1024 * 1024 + seed, f"random-reads-{seed}")
    path = tmp_path / "data"
    path.write_bytes(data)
    assert stream_chunks(path, 3 * MAX_CHUNK, random.Random(seed)) == reference_chunks(data)


@pytest.mark.parametrize("size", EDGE_SIZES)
def test_stream_edge_sizes(tmp_path: Path, size: int) -> None:
    data = random_bytes(size, f"edge-{size}")
    path = tmp_path / "data"
    path.write_bytes(data)
    assert stream_chunks(path, 10_000) == reference_chunks(data)


# Chunk sizes ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", EDGE_SIZES)
def test_chunks_cover_input(size: int) -> None:
    data = mixed_bytes(size, f"cover-{size}")
    assert b"".join(bytes(c) for c in chunk_bytes(data)) == data


@pytest.mark.parametrize("size", EDGE_SIZES)
def test_chunk_sizes_within_limits(size: int) -> None:
    sizes = [len(c) for c in chunk_bytes(mixed_bytes(size, f"limits-{size}"))]
    assert all(MIN_CHUNK <= s <= MAX_CHUNK for s in sizes[:-1])
    assert all(0 < s <= MAX_CHUNK for s in sizes[-1:])


@pytest.mark.parametrize("size", [0, 1, MIN_CHUNK - 1, MIN_CHUNK])
def test_small_input_one_chunk(size: int) -> None:
    """Input up to MIN_CHUNK bytes is one chunk (none when empty)."""
    assert [len(c) for c in chunk_bytes(random_bytes(size, size))] == ([size] if size else [])


def test_zeros_cut_at_max() -> None:
    sizes = [len(c) for c in chunk_bytes(bytes(3 * MAX_CHUNK + 5))]
    assert sizes[:3] == [MAX_CHUNK] * 3


def test_random_data_cuts_by_content() -> None:
    """Random data must produce content-defined cuts below MAX_CHUNK, or the tests above prove little."""
    sizes = [len(c) for c in chunk_bytes(random_bytes(4 * 1024 * 1024, "content"))]
    assert any(s < MAX_CHUNK for s in sizes[:-1])


# Ingester on files -----------------------------------------------------------------------

PIECE_SIZES = [MIN_CHUNK, MAX_CHUNK - 1, MAX_CHUNK, 2 * MAX_CHUNK + 1, 1 << 20]


def piece_edge_sizes(piece: int) -> list[int]:
    return sorted({k * piece + delta for k in (1, 2, 3) for delta in (-1, 0, 1)})


INGEST_CASES = [
    pytest.param(piece, size, id=f"piece{piece}-size{size}") for piece in PIECE_SIZES for size in piece_edge_sizes(piece)
]


@pytest.mark.parametrize(("piece", "size"), INGEST_CASES)
def test_ingest_piece_boundaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, piece: int, size: int) -> None:
    monkeypatch.setattr(ingest, "PIECE_SIZE", piece)
    data = mixed_bytes(size, f"piece-{piece}-{size}")
    path = tmp_path / "data"
    path.write_bytes(data)
    assert list(ingest_file(path).manifest.chunks) == reference_chunks(data)


@pytest.mark.parametrize("piece", [MIN_CHUNK, 1 << 20])
@pytest.mark.parametrize("size", EDGE_SIZES)
def test_ingest_edge_sizes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, piece: int, size: int) -> None:
    monkeypatch.setattr(ingest, "PIECE_SIZE", piece)
    data = random_bytes(size, f"ingest-edge-{size}")
    path = tmp_path / "data"
    path.write_bytes(data)
    assert ingest_file(path).manifest == Manifest(size, tuple(reference_chunks(data)))


def test_ingest_reuses_unchanged_file(tmp_path: Path) -> None:
    """Ingesting the same bytes with their own manifest takes the reuse path, not only cuts."""
    path = tmp_path / "data"
    path.write_bytes(mixed_bytes(3 * 1024 * 1024, "reuse"))
    first = ingest_file(path)
    second = ingest_file(path, first.manifest)
    assert second.manifest == first.manifest
    assert second.reused_chunks > 0


# Reuse after edits --------------------------------------------------------------------------

edit_lists = st.lists(
    st.tuples(
        st.sampled_from(["insert", "delete", "overwrite"]),
        st.floats(min_value=0, max_value=1),
        st.integers(min_value=1, max_value=3 * MAX_CHUNK),
    ),
    max_size=5,
)


def apply_edits(data: bytes, edits: list, rng: random.Random) -> bytes:
    edited = bytearray(data)
    for kind, where, length in edits:
        position = int(where * len(edited))
        if kind == "insert":
            edited[position:position] = rng.randbytes(length)
        elif kind == "delete":
            del edited[position : position + length]
        else:
            edited[position : position + length] = rng.randbytes(length)
    return bytes(edited)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    size=st.integers(min_value=0, max_value=3 * 1024 * 1024),
    seed=st.integers(min_value=0, max_value=2**32),
    edits=edit_lists,
    piece=st.sampled_from(PIECE_SIZES),
)
def test_reuse_matches_fresh_cut(tmp_path: Path, size: int, seed: int, edits: list, piece: int) -> None:
    rng = random.Random(seed)
    old = mixed_bytes(size, seed)
    new = apply_edits(old, edits, rng)
    path = tmp_path / "data"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ingest, "PIECE_SIZE", piece)
        path.write_bytes(old)
        previous = ingest_file(path).manifest
        path.write_bytes(new)
        reused = ingest_file(path, previous).manifest
    assert reused == Manifest(len(new), tuple(reference_chunks(new)))
