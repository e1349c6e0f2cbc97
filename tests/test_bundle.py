"""Tests for bundles: round trips, incremental bundles, and damaged or forged files.

Two replicas of one repository live in temporary folders, each with its
own signing key; both are members. Damaged bundles are made by rewriting
frames of a good one, with or without a recomputed trailer digest.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import blake3
import msgpack
import pytest

from p2pvc.errors import CorruptionError, SignatureError, UserError
from p2pvc.identity.keys import load_or_create
from p2pvc.ops import bundle, fsck, maintenance, worktree_ops
from p2pvc.refs import membership
from p2pvc.refs.records import encode_repository
from p2pvc.protocol.messages import MAX_FRAME
from p2pvc.repo import Repository
from p2pvc.store.pack import PackAppender, _BackgroundWriter

MAIN = "refs/heads/main"
CLI = [sys.executable, "-m", "p2pvc.cli.merge_commands"]
CLI_TIMEOUT_S = 120


@dataclass
class Replicas:
    a: Repository
    b: Repository
    root: Path


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[Replicas]:
    """Two replicas of one repository. Replica a created it and added b as a member, and b has nothing else yet."""
    identity_a = load_or_create(tmp_path / "home-a")
    identity_b = load_or_create(tmp_path / "home-b")
    a = Repository.init(tmp_path / "a", identity_a)
    a.refs.change_member(identity_a, membership.ACTION_ADD, identity_b.public_key)
    b = Repository.init_from_record(tmp_path / "b", encode_repository(a.record), identity_b)
    try:
        yield Replicas(a, b, tmp_path)
    finally:
        a.close()
        b.close()


def commit(repo: Repository, files: dict[str, bytes], message: str = "commit") -> bytes:
    for name, data in files.items():
        path = repo.worktree / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return worktree_ops.commit(repo, message).id


def checkpoint(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def ref_states(repo: Repository) -> dict[str, tuple]:
    return {
        s.name: (s.target, tuple(sorted(h.id for h in s.heads)), s.conflicted) for s in repo.ref_states()
    }


# Round trips --------------------------------------------------------------------------------


def test_bundle_round_trip(replicas: Replicas) -> None:
    first = commit(replicas.a, {"model.bin": checkpoint(600_000, 1), "src/train.py": b"print(1)\n"})
    path = replicas.root / "full.p2b"
    created = bundle.create_bundle(replicas.a, path)
    report = bundle.apply_bundle(replicas.b, path)
    assert created.commits == 1
    assert report.updates_applied == 1
    assert report.members_applied == 1
    assert [(c.name, c.old, c.new) for c in report.changes] == [(MAIN, None, first)]
    assert ref_states(replicas.b) == ref_states(replicas.a)
    assert replicas.b.identity.public_key in replicas.b.refs.members().current
    assert fsck.fsck(replicas.b).ok
    worktree_ops.checkout(replicas.b, "main", force=True)
    assert (replicas.b.worktree / "model.bin").read_bytes() == checkpoint(600_000, 1)


def test_bundle_apply_twice_is_noop(replicas: Replicas) -> None:
    commit(replicas.a, {"a.txt": b"a\n"})
    path = replicas.root / "full.p2b"
    bundle.create_bundle(replicas.a, path)
    bundle.apply_bundle(replicas.b, path)
    again = bundle.apply_bundle(replicas.b, path)
    assert again.updates_applied == 0
    assert again.objects_stored == 0
    assert again.chunks_stored == 0
    assert again.changes == []


def test_bundle_since_leaves_out_held(replicas: Replicas) -> None:
    commit(replicas.a, {"model.bin": checkpoint(900_000, 1)})
    full = replicas.root / "full.p2b"
    bundle.create_bundle(replicas.a, full)
    bundle.apply_bundle(replicas.b, full)
    heads = replicas.root / "b-heads.json"
    heads.write_text(json.dumps(bundle.local_heads(replicas.b)))
    second = commit(replicas.a, {"notes.txt": b"step 2\n"})
    incremental = replicas.root / "since.p2b"
    created = bundle.create_bundle(replicas.a, incremental, since=heads)
    assert created.commits == 1
    assert created.chunks == 1  # only the new small file: the checkpoint's chunks are held
    assert incremental.stat().st_size < full.stat().st_size // 20
    report = bundle.apply_bundle(replicas.b, incremental)
    assert [(c.name, c.new) for c in report.changes] == [(MAIN, second)]
    assert ref_states(replicas.b) == ref_states(replicas.a)
    assert fsck.fsck(replicas.b).ok


def test_bundle_of_one_branch(replicas: Replicas) -> None:
    commit(replicas.a, {"a.txt": b"a\n"})
    from p2pvc.ops import history

    history.create_branch(replicas.a, "exp")
    path = replicas.root / "exp.p2b"
    created = bundle.create_bundle(replicas.a, path, ["exp"])
    assert created.refs == ["refs/heads/exp"]
    bundle.apply_bundle(replicas.b, path)
    assert [s.name for s in replicas.b.ref_states()] == ["refs/heads/exp"]


def _deleted_branch(repo: Repository) -> None:
    """Create branch exp at HEAD, commit on it, and delete it: its updates outlive its commit."""
    from p2pvc.ops import history

    history.create_branch(repo, "exp")
    worktree_ops.checkout(repo, "exp")
    commit(repo, {"exp.txt": b"only on exp\n"})
    worktree_ops.checkout(repo, "main")
    history.delete_branch(repo, "exp", force=True)


def test_bundle_carries_retired_targets(replicas: Replicas) -> None:
    """A retired update's commit travels too, so the update it retired cannot come back as a head."""
    commit(replicas.a, {"a.txt": b"a\n"})
    _deleted_branch(replicas.a)
    path = replicas.root / "full.p2b"
    bundle.create_bundle(replicas.a, path)
    report = bundle.apply_bundle(replicas.b, path)
    assert report.incomplete == []
    assert ref_states(replicas.b) == ref_states(replicas.a)


def test_bundle_after_gc_same_state(replicas: Replicas) -> None:
    commit(replicas.a, {"a.txt": b"a\n"})
    _deleted_branch(replicas.a)
    maintenance.gc(replicas.a)
    path = replicas.root / "full.p2b"
    bundle.create_bundle(replicas.a, path)
    bundle.apply_bundle(replicas.b, path)
    assert ref_states(replicas.b) == ref_states(replicas.a)


def test_bundle_wrong_repository(replicas: Replicas, tmp_path: Path) -> None:
    other = Repository.init(tmp_path / "other", load_or_create(tmp_path / "home-a"))
    try:
        commit(other, {"a.txt": b"a\n"})
        path = tmp_path / "other.p2b"
        bundle.create_bundle(other, path)
        with pytest.raises(UserError, match="is a bundle of repository"):
            bundle.apply_bundle(replicas.b, path)
    finally:
        other.close()


def test_bundle_not_a_bundle(replicas: Replicas) -> None:
    path = replicas.root / "junk.p2b"
    path.write_bytes(b"hello world, not a bundle at all")
    with pytest.raises(UserError, match="not a p2pvc bundle"):
        bundle.apply_bundle(replicas.b, path)


def test_bundle_apply_memory_bounded(replicas: Replicas) -> None:
    """Creating and applying a bundle hold a few frames (and the store's write buffers), never the whole 64 MiB file."""
    size = 64 * 1024 * 1024
    commit(replicas.a, {"big.bin": checkpoint(size, 7)})
    path = replicas.root / "big.p2b"
    tracemalloc.start()
    try:
        bundle.create_bundle(replicas.a, path)
        _current, create_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert create_peak < 2 * MAX_FRAME, f"peak traced memory while creating: {create_peak} bytes"
    # The pack writer may queue MAX_QUEUED buffers while the disk lags, plus the one it
    # writes and the one being filled. A frame being decoded adds up to two frames.
    limit = (_BackgroundWriter.MAX_QUEUED + 2) * PackAppender.BUFFER_LIMIT + 2 * MAX_FRAME
    tracemalloc.start()
    try:
        bundle.apply_bundle(replicas.b, path)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert limit < size  # so the check can tell streaming from holding the file
    assert peak < limit, f"peak traced memory {peak} bytes"
    assert ref_states(replicas.b) == ref_states(replicas.a)


# Damage ---------------------------------------------------------------------------------------

RawFrame = tuple[int, bytes]  # (frame type, payload)


def read_raw_frames(path: Path) -> tuple[bytes, list[bytes]]:
    """Return the header and every frame payload before the trailer."""
    data = path.read_bytes()
    header = data[: bundle.HEADER.size]
    offset = bundle.HEADER.size
    payloads = []
    while offset < len(data):
        (length,) = bundle.LENGTH.unpack_from(data, offset)
        payload = data[offset + 4 : offset + 4 + length]
        offset += 4 + length
        if payload[1] == bundle.FRAME_TRAILER:
            break
        payloads.append(payload)
    return header, payloads


def write_raw_frames(path: Path, header: bytes, payloads: list[bytes], *, trailer: bool = True) -> None:
    """Write a bundle from raw payloads, with a correct trailer unless `trailer` is False."""
    body = header + b"".join(bundle.LENGTH.pack(len(p)) + p for p in payloads)
    out = body
    if trailer:
        payload = msgpack.packb([bundle.FRAME_TRAILER, len(payloads), 0, 0, blake3.blake3(body).digest()], use_bin_type=True)
        out += bundle.LENGTH.pack(len(payload)) + payload
    path.write_bytes(out)


def frame_type(payload: bytes) -> int:
    return payload[1]


def chunk_frame_indices(payloads: list[bytes]) -> list[int]:
    return [i for i, p in enumerate(payloads) if frame_type(p) == 20 and msgpack.unpackb(p)[2] == 0]


def rewrite(path: Path, out: Path, change: Callable[[list[bytes]], list[bytes]], *, trailer: bool = True) -> None:
    header, payloads = read_raw_frames(path)
    write_raw_frames(out, header, change(payloads), trailer=trailer)


def flip_in_last_chunk(payloads: list[bytes]) -> list[bytes]:
    index = chunk_frame_indices(payloads)[-1]
    value = msgpack.unpackb(payloads[index])
    data = bytearray(value[7])
    data[len(data) // 2] ^= 0xFF
    value[7] = bytes(data)
    return [*payloads[:index], msgpack.packb(value, use_bin_type=True), *payloads[index + 1 :]]


@pytest.fixture
def good_bundle(replicas: Replicas) -> Path:
    commit(replicas.a, {"model.bin": checkpoint(1_500_000, 3), "a.txt": b"a\n"})
    path = replicas.root / "good.p2b"
    bundle.create_bundle(replicas.a, path)
    return path


def test_damaged_chunk_rejected(replicas: Replicas, good_bundle: Path) -> None:
    """A chunk that does not match its id fails like a bad peer; what verified before stays stored."""
    damaged = replicas.root / "damaged.p2b"
    rewrite(good_bundle, damaged, flip_in_last_chunk)
    with pytest.raises(CorruptionError, match="damaged at byte .*does not match") as caught:
        bundle.apply_bundle(replicas.b, damaged)
    assert caught.value.hint is not None
    assert ref_states(replicas.b) == {}
    assert len(list(replicas.b.store.iter_entries())) > 0
    assert replicas.b.identity.public_key in replicas.b.refs.members().current
    # The intact bundle completes the replica; only the rest is stored.
    report = bundle.apply_bundle(replicas.b, good_bundle)
    assert report.chunks_stored == 1
    assert ref_states(replicas.b) == ref_states(replicas.a)


def test_changed_byte_fails_digest(replicas: Replicas, good_bundle: Path) -> None:
    """A change that leaves every frame valid is still caught by the trailer's digest."""
    data = good_bundle.read_bytes()
    changed = replicas.root / "changed.p2b"
    # Swap two bytes of the trailer's digest: every frame is intact, the file is not.
    changed.write_bytes(data[:-3] + bytes([data[-2], data[-3]]) + data[-1:])
    with pytest.raises(CorruptionError, match="BLAKE3 digest of the bundle does not match"):
        bundle.apply_bundle(replicas.b, changed)
    assert ref_states(replicas.b) == {}


def test_truncated_bundle_rejected(replicas: Replicas, good_bundle: Path) -> None:
    data = good_bundle.read_bytes()
    truncated = replicas.root / "truncated.p2b"
    truncated.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CorruptionError, match="truncated"):
        bundle.apply_bundle(replicas.b, truncated)
    assert ref_states(replicas.b) == {}
    stored_before = len(list(replicas.b.store.iter_entries()))
    assert stored_before > 0
    report = bundle.apply_bundle(replicas.b, good_bundle)
    assert report.objects_stored + report.chunks_stored == len(list(replicas.b.store.iter_entries())) - stored_before


def test_forged_ref_update_rejected(replicas: Replicas, good_bundle: Path) -> None:
    """A ref update whose signature fails rejects the bundle, even with a recomputed trailer."""

    def forge(payloads: list[bytes]) -> list[bytes]:
        result = []
        for payload in payloads:
            value = msgpack.unpackb(payload)
            if value[0] == 19:
                records = []
                for record in value[1]:
                    if record[1] == 17:  # a ref update: retarget it to a made-up commit
                        fields = msgpack.unpackb(record)
                        fields[4] = b"\x07" * 32
                        record = msgpack.packb(fields, use_bin_type=True)
                    records.append(record)
                value[1] = records
                payload = msgpack.packb(value, use_bin_type=True)
            result.append(payload)
        return result

    forged = replicas.root / "forged.p2b"
    rewrite(good_bundle, forged, forge)
    with pytest.raises(SignatureError, match="invalid signature"):
        bundle.apply_bundle(replicas.b, forged)
    assert ref_states(replicas.b) == {}


def test_missing_content_not_applied(replicas: Replicas, good_bundle: Path) -> None:
    """A bundle without some chunks verifies, but its ref waits for them (the closure rule)."""
    partial = replicas.root / "partial.p2b"

    def drop_chunks(payloads: list[bytes]) -> list[bytes]:
        dropped = set(chunk_frame_indices(payloads)[-2:])
        return [p for i, p in enumerate(payloads) if i not in dropped]

    rewrite(good_bundle, partial, drop_chunks)
    report = bundle.apply_bundle(replicas.b, partial)
    assert report.incomplete == [MAIN]
    assert ref_states(replicas.b) == {}
    report = bundle.apply_bundle(replicas.b, good_bundle)
    assert report.chunks_stored == 2
    assert ref_states(replicas.b) == ref_states(replicas.a)


def test_bytes_after_trailer_rejected(replicas: Replicas, good_bundle: Path) -> None:
    extended = replicas.root / "extended.p2b"
    extended.write_bytes(good_bundle.read_bytes() + b"\x00")
    with pytest.raises(CorruptionError, match="bytes after the trailer"):
        bundle.apply_bundle(replicas.b, extended)


# Command line -------------------------------------------------------------------------------


def run_cli(cwd: Path, home: Path, *args: str | os.PathLike) -> subprocess.CompletedProcess:
    env = dict(os.environ, P2PVC_HOME=str(home))
    return subprocess.run([*CLI, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S)


def test_cli_bundle_commands(replicas: Replicas) -> None:
    commit(replicas.a, {"a.txt": b"a\n"})
    root = replicas.root
    created = run_cli(replicas.a.worktree, root / "home-a", "bundle", "create", root / "cli.p2b", "--json")
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["commits"] == 1
    cloned = run_cli(root, root / "home-b", "bundle", "clone", root / "cli.p2b", root / "c")
    assert cloned.returncode == 0, cloned.stderr
    assert (root / "c" / "a.txt").read_bytes() == b"a\n"
    heads = run_cli(root / "c", root / "home-b", "bundle", "heads")
    assert heads.returncode == 0, heads.stderr
    assert json.loads(heads.stdout)["repository"] == replicas.a.id.hex()


def test_cli_damaged_bundle_exit_code(replicas: Replicas, good_bundle: Path) -> None:
    damaged = replicas.root / "damaged.p2b"
    rewrite(good_bundle, damaged, flip_in_last_chunk)
    done = run_cli(replicas.b.worktree, replicas.root / "home-b", "bundle", "apply", damaged)
    assert done.returncode == 5, done.stderr
    assert [line for line in done.stderr.splitlines() if line.startswith("error:")] != []
    assert "hint: get an intact copy of the bundle" in done.stderr
    assert "Traceback" not in done.stderr
