"""Tests of the parallel paths of ingest and checkout, on a bare object store.

Ingest hashes, checks and compresses batches of chunks on worker threads.
Checkout looks chunks up in batches, then reads, verifies and writes runs of
them on worker threads. The limits are shrunk so that small files take the
same paths as multi-GiB checkpoints.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pvc.errors import CorruptionError
from p2pvc.objects import compress
from p2pvc.objects.chunker import MAX_CHUNK, chunk_bytes
from p2pvc.objects.ids import chunk_id
from p2pvc.objects.model import ENTRY_FILE, ChunkRef, Manifest
from p2pvc.store.db import Database
from p2pvc.store.objectstore import ObjectStore
from p2pvc.store.pack import KIND_CHUNK, RECORD_HEADER, iter_records
from p2pvc.worktree import checkout, ingest
from p2pvc.worktree.checkout import Plan
from p2pvc.worktree.ingest import Ingester

from conftest import random_bytes

KIB = 1024
MIB = 1024 * KIB


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ObjectStore]:
    db = Database(tmp_path / "index.sqlite")
    store = ObjectStore(tmp_path / "store", db)
    (tmp_path / "store").mkdir()
    yield store
    store.close()
    db.close()


@pytest.fixture
def small_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shrink pieces, batches and the inline limits, so a few MiB span many tasks."""
    monkeypatch.setattr(ingest, "PIECE_SIZE", 512 * KIB)
    monkeypatch.setattr(ingest, "BATCH_BYTES", 128 * KIB)
    monkeypatch.setattr(ingest, "BATCH_CHUNKS", 4)
    monkeypatch.setattr(ingest, "INLINE_MAX", 64 * KIB)
    monkeypatch.setattr(checkout, "CHECKOUT_BATCH_BYTES", 256 * KIB)
    monkeypatch.setattr(checkout, "INLINE_MAX", 64 * KIB)


def mixed_content(size: int, seed: str) -> bytes:
    """Return runs of random bytes (stored raw), repetitive text (stored as zstd) and zeros (holes)."""
    rng = random.Random(seed)
    parts = []
    total = 0
    while total < size:
        length = rng.randrange(MAX_CHUNK, 4 * MAX_CHUNK)
        kind = rng.choice(["random", "text", "zeros"])
        if kind == "random":
            part = rng.randbytes(length)
        elif kind == "text":
            part = (b"%d weights of layer %d\n" % (rng.randrange(1000), rng.randrange(100)) * length)[:length]
        else:
            part = bytes(length)
        parts.append(part)
        total += length
    return b"".join(parts)[:size]


def store_file(store: ObjectStore, path: Path, previous: Manifest | None = None, **session_options) -> ingest.IngestResult:
    with store.session(**session_options) as session, Ingester(session) as ingester:
        result, _stat = ingester.ingest(path, previous)
        session.put_object(result.manifest)
    return result


def check_out(store: ObjectStore, root: Path, name: bytes, manifest: Manifest) -> checkout.ApplyResult:
    with store.session() as session:
        manifest_id = session.put_object(manifest)
    the_plan = Plan(writes=[(name, (ENTRY_FILE, False, manifest_id, manifest.size))])
    return checkout.apply(root, the_plan, store, None)


def expected_manifest(data: bytes) -> Manifest:
    return Manifest(len(data), tuple(ChunkRef(chunk_id(c), len(c)) for c in chunk_bytes(data)))


def record_ids(store: ObjectStore) -> list[bytes]:
    ids = []
    for pack in sorted(store.packs_dir.iterdir()):
        ids.extend(header.id for _offset, header in iter_records(pack))
    return ids


# Ingest -------------------------------------------------------------------------------


def test_ingest_stores_every_chunk(store: ObjectStore, tmp_path: Path, small_limits: None) -> None:
    data = mixed_content(5 * MIB + 123, "store")
    path = tmp_path / "model.bin"
    path.write_bytes(data)
    result = store_file(store, path)
    assert result.manifest == expected_manifest(data)
    rebuilt = b"".join(store.get_chunk(ref.id) for ref in result.manifest.chunks)
    assert rebuilt == data
    unique = {ref.id: ref.size for ref in result.manifest.chunks}
    assert result.new_bytes == sum(unique.values())


def test_ingest_mixes_codecs(store: ObjectStore, tmp_path: Path, small_limits: None) -> None:
    """The test data must reach both codecs, or the checkout tests below prove less."""
    path = tmp_path / "model.bin"
    path.write_bytes(mixed_content(5 * MIB, "codecs"))
    store_file(store, path)
    codecs = {entry.codec for entry in store.iter_entries() if entry.kind == KIND_CHUNK}
    assert codecs == {compress.CODEC_RAW, compress.CODEC_ZSTD}


def test_ingest_again_stores_nothing(store: ObjectStore, tmp_path: Path, small_limits: None) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(mixed_content(3 * MIB, "again"))
    first = store_file(store, path)
    records = len(record_ids(store))
    second = store_file(store, path, first.manifest)
    assert second.manifest == first.manifest
    assert second.new_bytes == 0
    assert second.reused_chunks > 0
    assert len(record_ids(store)) == records
    fresh = store_file(store, path)
    assert fresh.new_bytes == 0


def test_ingest_repeats_stored_once(store: ObjectStore, tmp_path: Path, small_limits: None) -> None:
    """A block repeated across batches, with a commit after nearly every record, is stored once."""
    block = random_bytes(MIB, "repeat")
    path = tmp_path / "repeated.bin"
    path.write_bytes(block * 6)
    result = store_file(store, path, batch_bytes=64 * KIB)
    ids = record_ids(store)
    assert len(ids) == len(set(ids))
    chunk_ids = {ref.id for ref in result.manifest.chunks}
    assert chunk_ids <= set(ids)
    assert result.new_bytes == sum({ref.id: ref.size for ref in result.manifest.chunks}.values())


def test_ingest_stores_reused_chunks_missing(store: ObjectStore, tmp_path: Path, small_limits: None) -> None:
    """Spans reused from a previous manifest whose chunks the store lacks are still stored."""
    path = tmp_path / "model.bin"
    data = mixed_content(3 * MIB, "missing")
    path.write_bytes(data)
    with Ingester(None) as hasher:
        unstored, _stat = hasher.ingest(path)
    result = store_file(store, path, unstored.manifest)
    assert result.reused_chunks > 0
    assert all(store.has(ref.id) for ref in result.manifest.chunks)
    assert b"".join(store.get_chunk(ref.id) for ref in result.manifest.chunks) == data


def test_ingest_reuse_after_edit(store: ObjectStore, tmp_path: Path, small_limits: None) -> None:
    path = tmp_path / "model.bin"
    old = mixed_content(4 * MIB, "edit")
    path.write_bytes(old)
    first = store_file(store, path)
    new = bytearray(old)
    new[MIB : MIB + 300 * KIB] = random_bytes(300 * KIB, "edit-2")
    path.write_bytes(bytes(new))
    second = store_file(store, path, first.manifest)
    assert second.manifest == expected_manifest(bytes(new))
    assert second.reused_chunks > 0
    assert 0 < second.new_bytes < len(new) // 2


# Compression -----------------------------------------------------------------------------


def test_encode_without_sample_compresses() -> None:
    """Text with an incompressible middle: the sample compresses too little, but a full attempt saves MIN_SAVING."""
    text = b"layer.0.weight layer.0.bias " * 4000
    data = text[: 40 * KIB] + random_bytes(8 * KIB, "middle") + text[: 40 * KIB]
    assert compress.encode(data)[0] == compress.CODEC_RAW
    codec, stored = compress.encode(data, sample=False)
    assert codec == compress.CODEC_ZSTD
    assert len(stored) < len(data)
    assert compress.decode(codec, stored, len(data)) == data


def test_compressed_well_threshold() -> None:
    assert compress.compressed_well(1000, compress.CODEC_ZSTD, bytes(900))
    assert not compress.compressed_well(1000, compress.CODEC_ZSTD, bytes(901))
    assert not compress.compressed_well(1000, compress.CODEC_RAW, bytes(10))


# Store -------------------------------------------------------------------------------------


def test_entries_batches_lookups(store: ObjectStore) -> None:
    chunks = [random_bytes(100 + i, f"entries-{i}") for i in range(1200)]
    with store.session() as session:
        ids = [session.put_chunk(c)[0] for c in chunks]
    absent = chunk_id(b"not stored")
    found = store.entries(ids + [absent] + ids[:10])
    assert set(found) == set(ids)
    assert all(found[oid].raw_size == len(c) for oid, c in zip(ids, chunks))


def test_session_absent_and_generation(store: ObjectStore) -> None:
    data = random_bytes(10 * KIB, "absent")
    cid = chunk_id(data)
    with store.session() as session:
        generation = session.generation
        assert session.absent([cid]) == {cid}
        assert session.put_encoded(KIND_CHUNK, cid, len(data), compress.CODEC_RAW, data, checked=True)
        assert session.absent([cid]) == set()  # pending
        session.commit()
        assert session.generation == generation + 1
        assert session.absent([cid]) == set()  # in the index
        assert not session.put_encoded(KIND_CHUNK, cid, len(data), compress.CODEC_RAW, data)
    assert record_ids(store) == [cid]


def test_read_entry_view_raw(store: ObjectStore) -> None:
    data = random_bytes(100 * KIB, "view")
    with store.session() as session:
        cid, _new = session.put_chunk(data)
    entry = store.entry(cid)
    assert entry is not None
    assert entry.codec == compress.CODEC_RAW
    view = store.read_entry_view(entry)
    assert isinstance(view, memoryview)
    assert view == data
    assert store.read_entry(entry) == data


# Checkout ------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 60 * KIB, 3 * MIB + 5, 2 * MAX_CHUNK])
def test_checkout_round_trip(store: ObjectStore, tmp_path: Path, small_limits: None, size: int) -> None:
    data = mixed_content(size, f"round-{size}")
    source = tmp_path / "source.bin"
    source.write_bytes(data)
    manifest = store_file(store, source).manifest
    root = tmp_path / "out"
    root.mkdir()
    result = check_out(store, root, b"model.bin", manifest)
    assert (root / "model.bin").read_bytes() == data
    assert result.bytes_written == size
    assert os.listdir(root) == ["model.bin"]


def test_checkout_trailing_hole(store: ObjectStore, tmp_path: Path, small_limits: None) -> None:
    """A file that ends in a run of zeros written as a hole still gets its full size."""
    padded = random_bytes(MIB, "hole") + bytes(4 * MAX_CHUNK)
    cuts = [len(c) for c in chunk_bytes(padded)]
    end = sum(cuts[:-1])  # the last whole MAX_CHUNK chunk of zeros ends the file
    data = padded[:end]
    source = tmp_path / "source.bin"
    source.write_bytes(data)
    manifest = store_file(store, source).manifest
    assert manifest.chunks[-1].id == checkout.ZERO_CHUNK_ID
    assert manifest.chunks[-1].size == MAX_CHUNK
    root = tmp_path / "out"
    root.mkdir()
    check_out(store, root, b"model.bin", manifest)
    assert (root / "model.bin").stat().st_size == len(data)
    assert (root / "model.bin").read_bytes() == data


def damage_record(store: ObjectStore, cid: bytes) -> None:
    entry = store.entry(cid)
    assert entry is not None
    with open(store.packs_dir / entry.pack_name, "r+b") as pack:
        pack.seek(entry.offset + RECORD_HEADER.size + entry.stored_size // 2)
        byte = pack.read(1)
        pack.seek(-1, os.SEEK_CUR)
        pack.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("codec", [compress.CODEC_RAW, compress.CODEC_ZSTD])
def test_checkout_damaged_chunk_fails(store: ObjectStore, tmp_path: Path, small_limits: None, codec: int) -> None:
    """A damaged chunk in a late batch fails the checkout and leaves no file and no temporary file."""
    source = tmp_path / "source.bin"
    source.write_bytes(mixed_content(4 * MIB, "damage"))
    manifest = store_file(store, source).manifest
    entries = store.entries(ref.id for ref in manifest.chunks)
    late = [ref.id for ref in manifest.chunks[len(manifest.chunks) // 2 :] if entries[ref.id].codec == codec]
    assert late, "no chunk of that codec in the second half"
    damage_record(store, late[0])
    root = tmp_path / "out"
    root.mkdir()
    with pytest.raises(CorruptionError):
        check_out(store, root, b"model.bin", manifest)
    assert os.listdir(root) == []


def test_checkout_missing_chunk_fails(store: ObjectStore, tmp_path: Path, small_limits: None) -> None:
    source = tmp_path / "source.bin"
    source.write_bytes(random_bytes(2 * MIB, "missing-chunk"))
    manifest = store_file(store, source).manifest
    lost = manifest.chunks[3].id
    with store.db.write() as conn:
        conn.execute("DELETE FROM objects WHERE id = ?", (lost,))
    root = tmp_path / "out"
    root.mkdir()
    with pytest.raises(CorruptionError, match=lost.hex()):
        check_out(store, root, b"model.bin", manifest)
    assert os.listdir(root) == []


def test_checkout_size_mismatch_fails(store: ObjectStore, tmp_path: Path, small_limits: None) -> None:
    """A manifest that gives a chunk another size than the stored one is rejected before writing."""
    source = tmp_path / "source.bin"
    source.write_bytes(random_bytes(MIB, "sizes"))
    manifest = store_file(store, source).manifest
    first = manifest.chunks[0]
    second = manifest.chunks[1]
    wrong = Manifest(
        manifest.size,
        (ChunkRef(first.id, first.size + 1), ChunkRef(second.id, second.size - 1), *manifest.chunks[2:]),
    )
    root = tmp_path / "out"
    root.mkdir()
    with pytest.raises(CorruptionError, match="another size"):
        check_out(store, root, b"model.bin", wrong)
    assert os.listdir(root) == []
