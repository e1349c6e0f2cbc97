"""The swarm scheduler: which missing chunk to ask which peer for, next.

Theory of operation. Every peer reports which wanted chunks it holds. A
peer with room in its window is given a request of up to BATCH_BYTES of
chunks it holds, rarest first (fewest holders among the peers in the
swarm), ties broken by a random rank fixed at the start, so fetchers that
start together spread over different chunks and soon have something to
trade. The window, the bytes in flight allowed to a peer, follows that
peer's measured rate times WINDOW_S: a fast link stays busy across round
trips and gets more of the load, and a slow one does not hoard chunks.

When every missing chunk is already asked for (the endgame), a peer with
room may ask for chunks in flight elsewhere, one per request and at most
ENDGAME_COPIES copies of each. When a chunk arrives, every other request
whose chunks have all arrived is returned for cancellation.

A peer that sent a bad chunk is banned: its requests are released and it
is never asked again by this scheduler. A peer that left is removed the
same way but may be added back.

Pure logic: no I/O, time is passed in by the driver (`p2pvc.node.swarm`),
so simulations can run the same code.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field

BATCH_BYTES = 1024 * 1024  # raw bytes of chunks per request outside the endgame
MIN_WINDOW_BYTES = 2 * BATCH_BYTES  # bytes in flight per peer before its rate is known
MAX_WINDOW_BYTES = 32 * 1024 * 1024
WINDOW_S = 1.0  # a window is this many seconds of a peer's measured rate
RATE_SAMPLE_S = 0.5  # the rate estimate is updated at most this often
ENDGAME_COPIES = 2  # requests in flight for one chunk during the endgame
REORDER_S = 2.0  # a peer's candidate order is re-sorted by rarity at most this often


@dataclass
class Request:
    id: int
    peer: str
    chunks: list[bytes]
    started: float
    pending: set[bytes] = field(default_factory=set)  # chunks not yet arrived by this request


@dataclass
class _Peer:
    have: set[bytes] = field(default_factory=set)
    requests: dict[int, Request] = field(default_factory=dict)
    in_flight_bytes: int = 0
    rate: float = 0.0  # bytes per second, smoothed
    sample_bytes: int = 0
    sample_start: float | None = None
    received_bytes: int = 0
    order: list[bytes] | None = None  # candidate chunks by (holders, rank); None when stale
    cursor: int = 0  # order[:cursor] has all arrived
    sorted_at: float = 0.0


class Scheduler:
    def __init__(self, chunks: dict[bytes, int], rng: random.Random | None = None) -> None:
        """`chunks`: each wanted chunk id and its raw size in bytes."""
        rng = rng or random.Random()
        self.wanted: dict[bytes, int] = dict(chunks)
        self.total_bytes = sum(chunks.values())
        self.remaining_bytes = self.total_bytes
        ids = list(chunks)
        rng.shuffle(ids)
        self._rank = {cid: position for position, cid in enumerate(ids)}
        self._holders: dict[bytes, int] = dict.fromkeys(chunks, 0)
        self._unheld = len(chunks)  # wanted chunks with no holder
        self._in_flight: dict[bytes, set[int]] = {}  # chunk id -> ids of requests asking for it
        self._requests: dict[int, Request] = {}
        self._peers: dict[str, _Peer] = {}
        self.banned: set[str] = set()
        self._next_id = 0

    # Peers ---------------------------------------------------------------------------

    @property
    def peers(self) -> list[str]:
        return list(self._peers)

    def add_peer(self, peer: str) -> bool:
        if peer in self.banned or peer in self._peers:
            return False
        self._peers[peer] = _Peer()
        return True

    def update_have(self, peer: str, chunks: Iterable[bytes], now: float = 0.0) -> int:
        """Record chunks the peer holds (as it reported them); return how many are new and wanted.

        Only this peer's candidate order changes. New chunks go to its end until the
        next re-sort (at most every REORDER_S), because re-sorting every peer on every
        report costs more than slightly stale rarity does.
        """
        state = self._peers.get(peer)
        if state is None:
            return 0
        new = []
        for cid in chunks:
            if cid in self.wanted and cid not in state.have:
                state.have.add(cid)
                self._count_holder(cid, +1)
                new.append(cid)
        if new:
            if state.order is not None and now - state.sorted_at < REORDER_S:
                state.order.extend(new)
            else:
                state.order = None
        return len(new)

    def lacks(self, peer: str, chunks: Iterable[bytes]) -> None:
        """Forget chunks that the peer's response listed as missing after all."""
        state = self._peers.get(peer)
        if state is None:
            return
        for cid in chunks:
            if cid in state.have:
                state.have.discard(cid)
                self._count_holder(cid, -1)
        state.order = None

    def remove_peer(self, peer: str) -> list[Request]:
        """Forget a peer that left; return its requests, now released."""
        state = self._peers.pop(peer, None)
        if state is None:
            return []
        for cid in state.have:
            self._count_holder(cid, -1)
        released = list(state.requests.values())
        for request in released:
            self._release(request)
        return released

    def ban(self, peer: str) -> list[Request]:
        """Stop trusting a peer that sent bad data; return its requests, now released."""
        self.banned.add(peer)
        return self.remove_peer(peer)

    def rate(self, peer: str) -> float:
        state = self._peers.get(peer)
        return state.rate if state else 0.0

    @property
    def serving_peers(self) -> int:
        """Peers with at least one request in flight."""
        return sum(1 for state in self._peers.values() if state.requests)

    # Requests ------------------------------------------------------------------------

    def window(self, peer: str) -> int:
        state = self._peers[peer]
        return int(min(MAX_WINDOW_BYTES, max(MIN_WINDOW_BYTES, state.rate * WINDOW_S)))

    def next_request(self, peer: str, now: float) -> Request | None:
        """Return the next request to send to `peer`, or None if its window is full or it has nothing wanted."""
        state = self._peers.get(peer)
        if state is None or state.in_flight_bytes >= self.window(peer):
            return None
        chunks = self._pick(state, now)
        if not chunks and self._in_endgame():
            chunks = self._pick_endgame(peer, state)
        if not chunks:
            return None
        request = Request(self._next_id, peer, chunks, now, set(chunks))
        self._next_id += 1
        self._requests[request.id] = request
        state.requests[request.id] = request
        for cid in chunks:
            self._in_flight.setdefault(cid, set()).add(request.id)
            state.in_flight_bytes += self.wanted[cid]
        return request

    def chunk_arrived(self, request_id: int, cid: bytes, now: float) -> list[Request]:
        """A verified chunk arrived by a request; return other requests that are now redundant."""
        request = self._requests.get(request_id)
        size = self.wanted.pop(cid, None)
        if request is not None and cid in request.pending:
            request.pending.discard(cid)
            state = self._peers.get(request.peer)
            if state is not None and size is not None:
                state.in_flight_bytes -= size
                state.received_bytes += size
                self._sample(state, size, now)
        if size is None:
            return []  # a duplicate from the endgame: counted already
        self.remaining_bytes -= size
        if self._holders.pop(cid, 0) <= 0:
            self._unheld -= 1
        redundant = []
        for other_id in self._in_flight.pop(cid, set()):
            other = self._requests.get(other_id)
            if other is None or other_id == request_id:
                continue
            other.pending.discard(cid)
            other_state = self._peers.get(other.peer)
            if other_state is not None:
                other_state.in_flight_bytes -= size
            if not other.pending:
                redundant.append(other)
        return redundant

    def request_ended(self, request_id: int) -> None:
        """Release the chunks a finished, failed or cancelled request did not deliver."""
        request = self._requests.get(request_id)
        if request is not None:
            self._release(request)

    @property
    def done(self) -> bool:
        return not self.wanted

    def unavailable(self) -> list[bytes]:
        """Wanted chunks that no peer in the swarm holds."""
        return [cid for cid in self.wanted if self._holders.get(cid, 0) <= 0]

    @property
    def in_flight(self) -> int:
        return len(self._requests)

    # Internals -----------------------------------------------------------------------

    def _count_holder(self, cid: bytes, change: int) -> None:
        before = self._holders.get(cid)
        if before is None:
            return  # arrived already
        after = before + change
        self._holders[cid] = after
        if before <= 0 < after:
            self._unheld -= 1
        elif after <= 0 < before:
            self._unheld += 1

    def _release(self, request: Request) -> None:
        self._requests.pop(request.id, None)
        state = self._peers.get(request.peer)
        if state is not None:
            state.requests.pop(request.id, None)
        for cid in request.pending:
            holders = self._in_flight.get(cid)
            if holders is not None:
                holders.discard(request.id)
                if not holders:
                    del self._in_flight[cid]
            if state is not None and cid in self.wanted:
                state.in_flight_bytes -= self.wanted[cid]
        request.pending.clear()
        if state is not None and not state.requests:
            state.in_flight_bytes = 0  # guards against drift from chunks that arrived by another request

    def _sample(self, state: _Peer, amount: int, now: float) -> None:
        if state.sample_start is None:
            state.sample_start = now
            state.sample_bytes = 0
            return
        state.sample_bytes += amount
        elapsed = now - state.sample_start
        if elapsed >= RATE_SAMPLE_S:
            current = state.sample_bytes / elapsed
            state.rate = current if state.rate == 0 else 0.5 * state.rate + 0.5 * current
            state.sample_start = now
            state.sample_bytes = 0

    def _ordered(self, state: _Peer, now: float) -> list[bytes]:
        if state.order is None or (now - state.sorted_at >= REORDER_S and state.cursor < len(state.order)):
            state.sorted_at = now
            holders, rank = self._holders, self._rank
            candidates = [cid for cid in state.have if cid in self.wanted]
            candidates.sort(key=lambda cid: (holders[cid], rank[cid]))
            state.order = candidates
            state.cursor = 0
        return state.order

    def _pick(self, state: _Peer, now: float) -> list[bytes]:
        order = self._ordered(state, now)
        wanted, in_flight = self.wanted, self._in_flight
        while state.cursor < len(order) and order[state.cursor] not in wanted:
            state.cursor += 1
        picked: list[bytes] = []
        size = 0
        arrived = 0
        for index in range(state.cursor, len(order)):
            cid = order[index]
            if cid not in wanted:
                arrived += 1
                continue
            if cid in in_flight:
                continue
            picked.append(cid)
            size += wanted[cid]
            if size >= BATCH_BYTES:
                break
        if arrived > 64 and arrived * 2 > len(order) - state.cursor:
            # Mostly arrived chunks past the cursor: drop them so later scans stay short.
            state.order = [cid for cid in order[state.cursor :] if cid in wanted]
            state.cursor = 0
        return picked

    def _in_endgame(self) -> bool:
        """Every wanted chunk that some peer holds is already asked for (counted, not scanned)."""
        return len(self._in_flight) + self._unheld >= len(self.wanted)

    def _pick_endgame(self, peer: str, state: _Peer) -> list[bytes]:
        best: bytes | None = None
        best_copies = ENDGAME_COPIES
        for cid, requests in self._in_flight.items():
            if cid not in state.have or len(requests) >= best_copies:
                continue
            if any(self._requests[r].peer == peer for r in requests if r in self._requests):
                continue
            best, best_copies = cid, len(requests)
            if best_copies <= 1:
                break
        return [best] if best is not None else []
