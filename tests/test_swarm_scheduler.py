"""The swarm scheduler and the availability bitmaps, without a network."""

from __future__ import annotations

import random

import pytest

from p2pvc.protocol import messages as m
from p2pvc.sync import swarm
from p2pvc.sync.availability import FreshRecord, LocalAvailability, encode_have, held_indices
from p2pvc.sync.swarm import Scheduler

KiB = 1024


def ids(count: int, prefix: int = 0) -> list[bytes]:
    return [bytes([prefix]) + i.to_bytes(31, "big") for i in range(count)]


def drain(scheduler: Scheduler, peer: str, now: float = 0.0) -> list[swarm.Request]:
    requests = []
    for _ in range(10_000):
        request = scheduler.next_request(peer, now)
        if request is None:
            return requests
        requests.append(request)
    raise AssertionError("the window never filled")


# Availability -------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 7, 8, 9, 100])
def test_bitmap_round_trip(count):
    rng = random.Random(count)
    held = [rng.random() < 0.5 for _ in range(count)]
    held[0] = True
    if count > 1:
        held[-1] = False
    have = encode_have(held)
    assert held_indices(have, count) == [i for i, flag in enumerate(held) if flag]


def test_bitmap_all_and_none():
    assert encode_have([True] * 5) is m.HAVE_ALL
    assert encode_have([False] * 5) is m.HAVE_NONE
    assert held_indices(m.HAVE_ALL, 3) == [0, 1, 2]
    assert held_indices(m.HAVE_NONE, 3) == []


def test_bitmap_of_wrong_length_rejected():
    with pytest.raises(ValueError, match="bitmap of 3 bytes"):
        held_indices(b"\x01\x02\x03", 9)


def test_local_availability_follows_stored_chunks():
    chunks = ids(10)
    local = LocalAvailability()
    local.track(b"m" * 32, chunks, [i < 3 for i in range(10)])
    assert held_indices(local.have(b"m" * 32), 10) == [0, 1, 2]
    local.chunk_stored(chunks[5], FreshRecord(0, 0, 4, b"data"))
    assert held_indices(local.have(b"m" * 32), 10) == [0, 1, 2, 5]
    assert chunks[5] in local.fresh
    local.durable()
    assert not local.fresh
    for cid in chunks:
        local.chunk_stored(cid, None)
    assert local.have(b"m" * 32) is m.HAVE_ALL
    assert local.have(b"x" * 32) is None


def test_swarm_members_expire_and_exclude_the_asker():
    local = LocalAvailability()
    local.note_member("a", ["/ip4/127.0.0.1/tcp/1"], now=0.0)
    local.note_member("b", ["/ip4/127.0.0.1/tcp/2"], now=50.0)
    local.note_member("c", [], now=50.0)  # no address: it does not serve, so it is not listed
    assert [p.peer_id for p in local.members("b", now=55.0)] == ["a"]
    assert [p.peer_id for p in local.members("x", now=100.0)] == ["b"]


def test_have_messages_round_trip():
    request = m.HaveRequest(b"r" * 32, (b"a" * 32, b"b" * 32), ("/ip4/127.0.0.1/tcp/4730",))
    assert m.decode(m.encode(request)) == request
    response = m.HaveResponse((True, False, b"\x80"), (m.SwarmPeer("peer", ("/ip4/10.0.0.1/tcp/1",)),))
    assert m.decode(m.encode(response)) == response


def test_have_response_with_invalid_entry_is_a_violation():
    import msgpack

    bad = msgpack.packb([m.RESP_HAVE, [1], []], use_bin_type=True)
    with pytest.raises(m.ProtocolViolation, match="true, false or a bitmap"):
        m.decode(bad)


# Scheduler --------------------------------------------------------------------------------------


def test_rarest_chunk_is_asked_first():
    chunks = ids(4)
    scheduler = Scheduler({cid: 64 * KiB for cid in chunks}, random.Random(1))
    for peer in ("a", "b", "c"):
        scheduler.add_peer(peer)
    scheduler.update_have("a", chunks)  # a holds all four
    scheduler.update_have("b", chunks[:3])
    scheduler.update_have("c", chunks[:2])
    # From a: chunk 3 (one holder) first, then chunk 2 (two holders), then 0 and 1 (three).
    request = scheduler.next_request("a", 0.0)
    assert request.chunks[:2] == [chunks[3], chunks[2]]


def test_random_rank_spreads_fetchers_over_different_chunks():
    chunks = ids(200)
    firsts = set()
    for seed in range(5):
        scheduler = Scheduler({cid: 64 * KiB for cid in chunks}, random.Random(seed))
        scheduler.add_peer("seed")
        scheduler.update_have("seed", chunks)
        firsts.add(scheduler.next_request("seed", 0.0).chunks[0])
    assert len(firsts) >= 4


def test_window_grows_with_rate():
    chunks = ids(2000)
    scheduler = Scheduler({cid: 64 * KiB for cid in chunks}, random.Random(0))
    scheduler.add_peer("fast")
    scheduler.update_have("fast", chunks)
    first = drain(scheduler, "fast")
    in_flight = sum(len(r.chunks) for r in first) * 64 * KiB
    assert swarm.MIN_WINDOW_BYTES <= in_flight < swarm.MIN_WINDOW_BYTES + swarm.BATCH_BYTES
    # Deliver 16 MiB over one second: the measured rate sizes the next window.
    now = 0.0
    delivered = 0
    for request in first:
        for cid in request.chunks:
            now += 0.004
            scheduler.chunk_arrived(request.id, cid, now)
            delivered += 64 * KiB
        scheduler.request_ended(request.id)
    for _ in range(8):
        batch = drain(scheduler, "fast", now)
        for request in batch:
            for cid in request.chunks:
                now += 0.004
                scheduler.chunk_arrived(request.id, cid, now)
            scheduler.request_ended(request.id)
    assert scheduler.rate("fast") > 10 * 1024 * KiB
    assert scheduler.window("fast") > swarm.MIN_WINDOW_BYTES


def test_each_chunk_is_asked_once_outside_the_endgame():
    chunks = ids(300)
    scheduler = Scheduler({cid: 64 * KiB for cid in chunks}, random.Random(2))
    for peer in ("a", "b", "c"):
        scheduler.add_peer(peer)
        scheduler.update_have(peer, chunks)
    asked = [cid for peer in ("a", "b", "c") for r in drain(scheduler, peer) for cid in r.chunks]
    assert len(asked) == len(set(asked))


def test_endgame_cancels_duplicate_request():
    chunks = ids(3)
    scheduler = Scheduler({cid: 64 * KiB for cid in chunks}, random.Random(3))
    scheduler.add_peer("slow")
    scheduler.add_peer("fast")
    scheduler.update_have("slow", chunks)
    slow_request = scheduler.next_request("slow", 0.0)
    assert sorted(slow_request.chunks) == sorted(chunks)  # all three fit one batch
    scheduler.update_have("fast", chunks)
    # Everything is in flight: the fast peer gets single-chunk endgame requests.
    endgame = drain(scheduler, "fast")
    assert [len(r.chunks) for r in endgame] == [1, 1, 1]
    assert {r.chunks[0] for r in endgame} == set(chunks)
    for request in endgame[:2]:
        assert scheduler.chunk_arrived(request.id, request.chunks[0], 0.1) == []
    # The last one makes the slow request redundant: every chunk of it has arrived.
    redundant = scheduler.chunk_arrived(endgame[2].id, endgame[2].chunks[0], 0.2)
    assert [r.id for r in redundant] == [slow_request.id]
    assert scheduler.done


def test_endgame_never_asks_more_copies_than_the_limit():
    chunks = ids(1)
    scheduler = Scheduler({chunks[0]: 64 * KiB}, random.Random(4))
    for peer in ("a", "b", "c", "d"):
        scheduler.add_peer(peer)
        scheduler.update_have(peer, chunks)
    requests = [r for peer in ("a", "b", "c", "d") for r in drain(scheduler, peer)]
    assert len(requests) == swarm.ENDGAME_COPIES


def test_banned_peer_never_requested_again():
    chunks = ids(10)
    scheduler = Scheduler({cid: 64 * KiB for cid in chunks}, random.Random(5))
    scheduler.add_peer("bad")
    scheduler.add_peer("good")
    scheduler.update_have("bad", chunks)
    taken = drain(scheduler, "bad")
    assert taken
    released = scheduler.ban("bad")
    assert {r.id for r in released} == {r.id for r in taken}
    assert not scheduler.add_peer("bad")
    assert scheduler.next_request("bad", 0.0) is None
    scheduler.update_have("good", chunks)
    again = [cid for r in drain(scheduler, "good") for cid in r.chunks]
    assert set(again) == set(chunks)


def test_chunks_a_peer_lacks_go_to_others():
    chunks = ids(2)
    scheduler = Scheduler({cid: 64 * KiB for cid in chunks}, random.Random(6))
    scheduler.add_peer("liar")
    scheduler.add_peer("honest")
    scheduler.update_have("liar", chunks)
    request = scheduler.next_request("liar", 0.0)
    scheduler.lacks("liar", request.chunks)
    scheduler.request_ended(request.id)
    assert scheduler.next_request("liar", 0.0) is None
    assert sorted(scheduler.unavailable()) == sorted(chunks)
    scheduler.update_have("honest", chunks)
    assert sorted(scheduler.next_request("honest", 0.0).chunks) == sorted(chunks)


def test_swarm_simulation_completes_with_every_chunk_once():
    """Three peers, random delivery order, a peer leaving midway: every chunk arrives exactly once."""
    rng = random.Random(7)
    chunks = ids(500)
    sizes = {cid: rng.randrange(16 * KiB, 128 * KiB) for cid in chunks}
    scheduler = Scheduler(sizes, random.Random(8))
    for peer in ("a", "b", "c"):
        scheduler.add_peer(peer)
        scheduler.update_have(peer, chunks if peer != "c" else chunks[:250])
    arrived: list[bytes] = []
    now = 0.0
    for step in range(100_000):
        if scheduler.done:
            break
        if step == 50:
            scheduler.remove_peer("b")
        open_requests = []
        for peer in scheduler.peers:
            open_requests += drain(scheduler, peer, now)
        pending = [r for r in scheduler._requests.values()]
        assert pending, "nothing in flight while chunks are missing"
        request = rng.choice(pending)
        cid = rng.choice(sorted(request.pending))
        now += 0.001
        if cid in scheduler.wanted:
            arrived.append(cid)
        for redundant in scheduler.chunk_arrived(request.id, cid, now):
            scheduler.request_ended(redundant.id)
        if not request.pending:
            scheduler.request_ended(request.id)
    assert scheduler.done
    assert sorted(arrived) == sorted(chunks)
    assert scheduler.remaining_bytes == 0
