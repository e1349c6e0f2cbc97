"""Pull between two real repositories over in-memory streams: the sync logic without a network."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import trio

from p2pvc.errors import PeerError
from p2pvc.identity.keys import Identity
from p2pvc.node.client import PeerClient
from p2pvc.node.pull import MisbehavingPeer, pull
from p2pvc.node.server import RepoServer
from p2pvc.node.streams import memory_stream_pair
from p2pvc.objects import model
from p2pvc.ops.worktree_ops import checkout, commit
from p2pvc.protocol import messages as m
from p2pvc.repo import Repository


def _connect(server: RepoServer, nursery: trio.Nursery, client_id: str = "client", server_id: str = "server"):
    """Return an opener that serves each new stream with `server` in the nursery."""

    async def open_stream(peer_id: str):
        here, there = memory_stream_pair(client_id, server_id)
        nursery.start_soon(server.handle, there)
        return here

    return open_stream


@pytest.fixture
def pair(tmp_path):
    alice = Identity.generate()
    bob = Identity.generate()
    origin = Repository.init(tmp_path / "origin", identity=alice)
    replica = Repository.init_from_record(tmp_path / "replica", origin.db.get_meta("repository"), identity=bob)
    yield origin, replica
    origin.close()
    replica.close()


def _write(repo: Repository, name: str, data: bytes) -> None:
    path = repo.worktree / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


async def test_pull_copies_refs_and_content(pair):
    origin, replica = pair
    _write(origin, "weights.bin", os.urandom(3_000_000))
    _write(origin, "src/train.py", b"print('train')\n")
    first = commit(origin, "first")
    async with trio.open_nursery() as nursery:
        client = PeerClient(_connect(RepoServer({origin.id: origin}), nursery), "server", origin.id)
        report = await pull(replica, client)
    assert report.updates_applied == 1
    assert report.chunks_fetched > 10
    assert replica.ref_state("refs/heads/main").target == first.id
    checkout(replica, "main", force=True)
    assert (replica.worktree / "weights.bin").read_bytes() == (origin.worktree / "weights.bin").read_bytes()


async def test_pull_twice_fetches_nothing_new(pair):
    origin, replica = pair
    _write(origin, "a.bin", os.urandom(500_000))
    commit(origin, "first")
    async with trio.open_nursery() as nursery:
        client = PeerClient(_connect(RepoServer({origin.id: origin}), nursery), "server", origin.id)
        await pull(replica, client)
        second = await pull(replica, client)
    assert second.bytes_fetched == 0
    assert second.updates_received == 0


async def test_pull_second_version_fetches_changed_chunks(pair):
    origin, replica = pair
    data = bytearray(os.urandom(4_000_000))
    _write(origin, "ckpt.bin", bytes(data))
    commit(origin, "v1")
    async with trio.open_nursery() as nursery:
        client = PeerClient(_connect(RepoServer({origin.id: origin}), nursery), "server", origin.id)
        await pull(replica, client)
        data[2_000_000:2_100_000] = os.urandom(100_000)
        _write(origin, "ckpt.bin", bytes(data))
        commit(origin, "v2")
        report = await pull(replica, client)
    assert report.updates_applied == 1
    assert report.bytes_fetched < 600_000


async def test_pull_rejects_non_member_update(pair, tmp_path):
    origin, replica = pair
    _write(origin, "a.txt", b"a\n")
    commit(origin, "first")
    # A stranger holding a copy of the repository signs an update of main.
    stranger = Repository.init_from_record(tmp_path / "stranger", origin.db.get_meta("repository"), identity=Identity.generate())
    async with trio.open_nursery() as nursery:
        client = PeerClient(_connect(RepoServer({origin.id: origin}), nursery), "server", origin.id)
        await pull(stranger, client)
    forged_target = origin.ref_state("refs/heads/main").target
    forged = stranger.refs.state("refs/heads/main", stranger.is_ancestor).winner
    forged = replace(forged, author=stranger.identity.public_key, supersedes=(forged.id,), clock=replace(forged.clock, counter=forged.clock.counter + 1))
    forged = replace(forged, signature=stranger.identity.sign(forged.signing_payload()))
    stranger.db.conn.execute(
        "INSERT INTO ref_updates (id, name, record) VALUES (?, ?, ?)",
        (forged.id, forged.name, __import__("p2pvc.refs.records", fromlist=["x"]).encode_ref_update(forged)),
    )
    async with trio.open_nursery() as nursery:
        client = PeerClient(_connect(RepoServer({stranger.id: stranger}), nursery), "stranger", stranger.id)
        report = await pull(replica, client)
    assert any("not a member" in r for r in report.updates_rejected)
    assert replica.ref_state("refs/heads/main").target == forged_target
    stranger.close()


class _CorruptingServer(RepoServer):
    """Flips one byte of every chunk it sends."""

    async def _send_objects(self, stream, repo, ids):
        for oid in ids:
            entry, stored = repo.store.read_stored(oid)
            if entry.kind == 0:
                stored = bytes([stored[0] ^ 1]) + stored[1:]
            await stream.send(m.ObjectPart(oid, entry.kind, entry.codec, entry.raw_size, len(stored), 0, stored))
        await stream.send(m.End(()))


async def test_pull_drops_peer_sending_corrupt_chunk(pair):
    origin, replica = pair
    _write(origin, "a.bin", os.urandom(300_000))
    commit(origin, "first")
    async with trio.open_nursery() as nursery:
        client = PeerClient(_connect(_CorruptingServer({origin.id: origin}), nursery), "server", origin.id)
        with pytest.raises(MisbehavingPeer):
            await pull(replica, client)
    assert replica.ref_state("refs/heads/main") is None


async def test_unknown_repository_is_an_error(pair):
    origin, replica = pair
    async with trio.open_nursery() as nursery:
        client = PeerClient(_connect(RepoServer({}), nursery), "server", origin.id)
        with pytest.raises(PeerError, match="not served"):
            await client.heads()


async def test_membership_record_syncs(pair):
    origin, replica = pair
    from p2pvc.ops.members import add_member

    add_member(origin, replica.identity.public_key.hex())
    async with trio.open_nursery() as nursery:
        client = PeerClient(_connect(RepoServer({origin.id: origin}), nursery), "server", origin.id)
        report = await pull(replica, client)
    assert report.members_applied == 1
    assert replica.identity.public_key in replica.refs.members().current


def test_commit_objects_decode(pair):
    origin, _ = pair
    _write(origin, "a.txt", b"a")
    result = commit(origin, "x")
    assert isinstance(origin.store.get_object(result.id), model.Commit)


async def test_deleted_branch_after_gc_no_conflict(pair):
    origin, replica = pair
    from p2pvc.ops.history import create_branch, delete_branch
    from p2pvc.ops.maintenance import gc

    _write(origin, "a.txt", b"a\n")
    commit(origin, "first")
    create_branch(origin, "experiment")
    checkout(origin, "experiment")
    _write(origin, "e.bin", os.urandom(100_000))
    commit(origin, "experiment only")
    checkout(origin, "main")
    delete_branch(origin, "experiment", force=True)
    assert gc(origin).removed_objects > 0
    async with trio.open_nursery() as nursery:
        client = PeerClient(_connect(RepoServer({origin.id: origin}), nursery), "server", origin.id)
        report = await pull(replica, client)
    state = replica.ref_state("refs/heads/experiment")
    assert not state.conflicted
    assert state.deleted
    assert report.incomplete == []
