"""Swarm fetch: the chunks of a set of files from every peer that holds them, at once.

Theory of operation. The scheduler (`p2pvc.sync.swarm`) decides; this
module talks to peers. Per peer, one task polls availability (a HAVE
request for the files still incomplete) every HAVE_INTERVAL_S and one task
keeps that peer's window of chunk requests full, each request on its own
stream. Every chunk is verified against its id before it is appended; it
then counts as held here at once (the node serving this repository answers
HAVE requests and serves it from memory until the write session makes it
durable), so other fetchers can take it from us while we still fetch.

Peers are the ones given, plus, with peer exchange, the swarm members that
HAVE responses list (fetchers that advertise a listen address). A peer
that sends a bad chunk is banned for this fetch and logged with its peer
id; a peer that leaves, or whose request delivers nothing for
STALL_TIMEOUT_S, is dropped and its chunks are asked of others.

What arrived stays stored when the fetch fails or is interrupted (the
caller commits the session), so a rerun fetches only the rest.
"""

from __future__ import annotations

import logging
import random
from contextlib import aclosing
from dataclasses import dataclass, field

import trio

from p2pvc.errors import CorruptionError, P2pvcError, PeerError
from p2pvc.node.client import PeerClient
from p2pvc.node.streams import StreamClosed
from p2pvc.objects import model
from p2pvc.progress import NULL_PROGRESS, Progress
from p2pvc.protocol import messages as m
from p2pvc.store.objectstore import WriteSession
from p2pvc.sync.availability import FreshRecord, LocalAvailability, bitmap_size, held_indices
from p2pvc.sync.closure import KIND_CHUNK
from p2pvc.sync.receive import verify as verify_received
from p2pvc.sync.swarm import Request, Scheduler

log = logging.getLogger(__name__)

HAVE_INTERVAL_S = 1.0  # how often each peer is asked what it holds, once the swarm has formed
FIRST_HAVE_INTERVAL_S = 0.25  # the first polls come faster, doubling up to HAVE_INTERVAL_S, so fetchers find each other early
STALL_TIMEOUT_S = 15.0  # a request that delivers nothing this long is abandoned and its peer dropped
UNAVAILABLE_GRACE_S = 10.0  # with nothing in flight, how long to wait for a holder of the missing chunks to appear
MAX_PEERS = 32  # peers one fetch talks to
REDIAL_DELAYS_S = (1.0, 3.0, 9.0)  # waits before each redial of a dropped (not banned) peer
HAVE_REQUEST_BITMAP_BYTES = 1024 * 1024  # bitmap bytes one HAVE request may ask for


class SwarmError(PeerError):
    """The swarm could not deliver every chunk."""


@dataclass
class SwarmReport:
    chunks_fetched: int = 0
    bytes_fetched: int = 0  # stored (wire) bytes of new chunks
    raw_bytes: int = 0  # raw bytes of new chunks
    duplicates: int = 0  # chunks that arrived twice in the endgame
    by_peer: dict[str, int] = field(default_factory=dict)  # raw bytes received per peer
    banned: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # peers that left or stalled


class _File:
    __slots__ = ("chunks", "remaining")

    def __init__(self, chunks: list[bytes], remaining: int) -> None:
        self.chunks = chunks
        self.remaining = remaining


class SwarmFetch:
    def __init__(
        self,
        node,
        repo,
        session: WriteSession,
        manifests: dict[bytes, model.Manifest],
        *,
        progress: Progress = NULL_PROGRESS,
        peer_exchange: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        self.node = node
        self.repo = repo
        self.session = session
        self.progress = progress
        self.peer_exchange = peer_exchange
        self.availability: LocalAvailability = node.server.availability[repo.id]
        self.report = SwarmReport()

        all_ids = list({c.id for manifest in manifests.values() for c in manifest.chunks})
        stored = session.has_many(all_ids)
        wanted: dict[bytes, int] = {}
        self._files: dict[bytes, _File] = {}
        self._positions: dict[bytes, list[bytes]] = {}  # chunk id -> manifests that need it
        for mid, manifest in manifests.items():
            ids = [c.id for c in manifest.chunks]
            held = [cid in stored for cid in ids]
            missing = [c for c in manifest.chunks if c.id not in stored]
            if not missing:
                continue
            self.availability.track(mid, ids, held)
            self._files[mid] = _File(ids, len({c.id for c in missing}))
            for chunk in missing:
                if chunk.id not in wanted:
                    wanted[chunk.id] = chunk.size
                self._positions.setdefault(chunk.id, [])
                if mid not in self._positions[chunk.id]:
                    self._positions[chunk.id].append(mid)
        self.scheduler = Scheduler(wanted, rng)
        self._peer_scopes: dict[str, trio.CancelScope] = {}
        self._wake: dict[str, trio.Event] = {}
        self._requests: dict[int, trio.CancelScope] = {}
        self._cancelled: set[int] = set()  # requests cancelled as redundant, not stalled
        self._dialing: set[str] = set()
        self._addresses: dict[str, str] = {}  # peer id -> address it was reached at, for redials
        self._redials: dict[str, int] = {}  # peer id -> redials started
        self._last_have: dict[tuple[str, bytes], m.Have] = {}  # (peer, manifest id) -> last availability
        self._done = trio.Event()
        self._last_progress = 0.0
        self._nursery: trio.Nursery | None = None

    async def run(self, peers: list[str], addresses: dict[str, str] | None = None) -> SwarmReport:
        """Fetch every wanted chunk; raise SwarmError if the swarm cannot deliver them all.

        `addresses` maps peer ids to the address each was reached at, so a peer
        that drops out (a broken connection, a stall) is dialed again.
        """
        self._addresses.update(addresses or {})
        if self.scheduler.done:
            return self.report
        self.progress.start(self._label(), self.scheduler.total_bytes)
        self._last_progress = trio.current_time()
        failure: list[BaseException] = []
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for peer in peers:
                    self._add_peer(peer)
                nursery.start_soon(self._watch, failure)
                await self._done.wait()
                nursery.cancel_scope.cancel()
        finally:
            self.progress.finish()
            self.availability.untrack_all()
        if failure:
            raise failure[0]
        return self.report

    # Peers ------------------------------------------------------------------------------

    def _add_peer(self, peer: str) -> None:
        if peer == self.node.host.peer_id or len(self.scheduler.peers) >= MAX_PEERS:
            return
        if not self.scheduler.add_peer(peer):
            return
        scope = trio.CancelScope()
        self._peer_scopes[peer] = scope
        self._wake[peer] = trio.Event()
        assert self._nursery is not None
        self._nursery.start_soon(self._run_peer, peer, scope)

    async def _run_peer(self, peer: str, scope: trio.CancelScope) -> None:
        with scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._poll, peer)
                nursery.start_soon(self._keep_window_full, peer, nursery)

    def _drop(self, peer: str, reason: str, *, ban: bool = False) -> None:
        if peer not in self._peer_scopes:
            return
        released = self.scheduler.ban(peer) if ban else self.scheduler.remove_peer(peer)
        for key in [k for k in self._last_have if k[0] == peer]:
            del self._last_have[key]  # a peer added back reports everything afresh
        listed = self.report.banned if ban else self.report.dropped
        if peer not in listed:
            listed.append(peer)
        if ban:
            log.warning("peer %s is banned from this fetch: %s", peer, reason)
        else:
            log.info("peer %s dropped from this fetch: %s", peer, reason)
            attempt = self._redials.get(peer, 0)
            if peer in self._addresses and attempt < len(REDIAL_DELAYS_S) and self._nursery is not None:
                self._redials[peer] = attempt + 1
                self._dialing.add(peer)
                self._nursery.start_soon(self._redial, peer, REDIAL_DELAYS_S[attempt])
        for request in released:
            self._cancel(request.id)
        self._peer_scopes.pop(peer).cancel()
        self._wake.pop(peer, None)
        self._wake_all()
        self.progress.describe(self._label())

    def _label(self) -> str:
        return f"{self.scheduler.serving_peers}/{len(self.scheduler.peers)} peers"

    def _wake_peer(self, peer: str) -> None:
        event = self._wake.get(peer)
        if event is not None:
            event.set()

    def _wake_all(self) -> None:
        for event in self._wake.values():
            event.set()

    async def _redial(self, peer: str, delay: float) -> None:
        try:
            await trio.sleep(delay)
            try:
                await self.node.host.connect(self._addresses[peer])
            except P2pvcError as exc:
                log.info("redialing peer %s failed: %s", peer, exc.message)
                return
            log.info("peer %s is back in this fetch", peer)
            self._add_peer(peer)
            self._wake_all()
        finally:
            self._dialing.discard(peer)

    async def _dial(self, swarm_peer: m.SwarmPeer) -> None:
        try:
            for address in swarm_peer.addresses:
                full = address if "/p2p/" in address else f"{address}/p2p/{swarm_peer.peer_id}"
                try:
                    peer = await self.node.host.connect(full)
                except P2pvcError as exc:
                    log.debug("swarm peer %s at %s is unreachable: %s", swarm_peer.peer_id, address, exc.message)
                    continue
                if peer == swarm_peer.peer_id:
                    log.info("joined swarm peer %s at %s", peer, address)
                    self._addresses[peer] = full
                    self._add_peer(peer)
                return
        finally:
            self._dialing.discard(swarm_peer.peer_id)

    # Availability ------------------------------------------------------------------------

    async def _poll(self, peer: str) -> None:
        client = self.node.client(peer, self.repo)
        listen = advertised_addresses(self.node.host)
        interval = FIRST_HAVE_INTERVAL_S
        while not self.scheduler.done:
            try:
                await self._poll_once(client, peer, listen)
            except (PeerError, StreamClosed, m.ProtocolViolation) as exc:
                self._drop(peer, f"availability request failed: {exc}")
                return
            await trio.sleep(interval)
            interval = min(2 * interval, HAVE_INTERVAL_S)

    async def _poll_once(self, client: PeerClient, peer: str, listen: list[str]) -> None:
        incomplete = [mid for mid, file in self._files.items() if file.remaining > 0]
        for batch in _have_batches(incomplete, self._files):
            response = await client.have(batch, listen)
            added = 0
            now = trio.current_time()
            for mid, have in zip(batch, response.have):
                if self._last_have.get((peer, mid)) == have:
                    continue  # unchanged since the last poll: skip decoding it again
                self._last_have[(peer, mid)] = have
                chunks = self._files[mid].chunks
                try:
                    indices = held_indices(have, len(chunks))
                except ValueError as exc:
                    raise m.ProtocolViolation(str(exc)) from exc
                added += self.scheduler.update_have(peer, (chunks[i] for i in indices), now)
            if added:
                self._wake_peer(peer)
            if self.peer_exchange:
                for swarm_peer in response.peers:
                    known = swarm_peer.peer_id in self._peer_scopes or swarm_peer.peer_id in self._dialing
                    if known or swarm_peer.peer_id in self.scheduler.banned:
                        continue
                    if swarm_peer.peer_id == self.node.host.peer_id or len(self.scheduler.peers) >= MAX_PEERS:
                        continue
                    self._dialing.add(swarm_peer.peer_id)
                    assert self._nursery is not None
                    self._nursery.start_soon(self._dial, swarm_peer)

    # Requests ---------------------------------------------------------------------------

    async def _keep_window_full(self, peer: str, nursery: trio.Nursery) -> None:
        while not self.scheduler.done:
            request = self.scheduler.next_request(peer, trio.current_time())
            if request is not None:
                nursery.start_soon(self._request, peer, request)
                continue
            event = self._wake.get(peer)
            if event is None:
                return
            await event.wait()
            self._wake[peer] = trio.Event()

    async def _request(self, peer: str, request: Request) -> None:
        client = self.node.client(peer, self.repo)
        scope = trio.CancelScope(deadline=trio.current_time() + STALL_TIMEOUT_S)
        self._requests[request.id] = scope
        self.progress.describe(self._label())
        try:
            with scope:
                async with aclosing(client.objects(request.chunks)) as items:
                    async for item in items:
                        scope.deadline = trio.current_time() + STALL_TIMEOUT_S
                        if isinstance(item, m.End):
                            if item.missing:
                                self.scheduler.lacks(peer, item.missing)
                            continue
                        self._store(peer, request, *item)
        except CorruptionError as exc:
            self._drop(peer, f"sent a bad chunk: {exc.message}", ban=True)
        except (PeerError, StreamClosed, m.ProtocolViolation) as exc:
            self._drop(peer, f"request failed: {exc}")
        finally:
            self._requests.pop(request.id, None)
            self.scheduler.request_ended(request.id)
            self._wake_all() if request.pending else self._wake_peer(peer)
        if scope.cancelled_caught and request.id not in self._cancelled:
            self._drop(peer, f"sent nothing for {STALL_TIMEOUT_S:g} s")
        self._cancelled.discard(request.id)

    def _cancel(self, request_id: int) -> None:
        scope = self._requests.get(request_id)
        if scope is not None:
            self._cancelled.add(request_id)
            scope.cancel()

    def _store(self, peer: str, request: Request, first: m.ObjectPart, stored: bytes) -> None:
        size = self.scheduler.wanted.get(first.id)
        if size is None:
            self.report.duplicates += 1  # arrived from another peer first, in the endgame
            self.scheduler.chunk_arrived(request.id, first.id, trio.current_time())
            return
        received = verify_received(first, stored, KIND_CHUNK, size)  # CorruptionError: the peer's fault
        self.session.put_encoded(KIND_CHUNK, received.id, received.raw_size, received.codec, received.stored)
        self.availability.chunk_stored(
            received.id, FreshRecord(KIND_CHUNK, received.codec, received.raw_size, received.stored)
        )
        if self.session.pending_records == 0:
            self.availability.durable()  # the session committed a batch just now
        for mid in self._positions.pop(received.id, ()):
            self._files[mid].remaining -= 1
        self.report.chunks_fetched += 1
        self.report.bytes_fetched += len(received.stored)
        self.report.raw_bytes += received.raw_size
        self.report.by_peer[peer] = self.report.by_peer.get(peer, 0) + received.raw_size
        self._last_progress = trio.current_time()
        for redundant in self.scheduler.chunk_arrived(request.id, received.id, trio.current_time()):
            self._cancel(redundant.id)
        self.progress.advance(received.raw_size)
        if self.scheduler.done:
            self._done.set()

    async def _watch(self, failure: list[BaseException]) -> None:
        """End the fetch when nothing can arrive any more.

        Nothing in flight means no peer holds a missing chunk: a peer that held one
        would have room in its window and be asked for it. Holders may still appear
        (a fetcher that gets them elsewhere, a peer found by exchange), hence the grace.
        """
        while not self.scheduler.done:
            await trio.sleep(1.0)
            idle = trio.current_time() - self._last_progress
            if self.scheduler.in_flight or self._dialing:
                continue
            if not self.scheduler.peers and idle > HAVE_INTERVAL_S * 3:
                failure.append(SwarmError(
                    f"no peer is left to fetch {len(self.scheduler.wanted)} chunk(s) from",
                    hint="check that peers holding this revision are running, then run the command again",
                ))
                break
            if idle > UNAVAILABLE_GRACE_S:
                failure.append(SwarmError(
                    f"{len(self.scheduler.unavailable())} of the {len(self.scheduler.wanted)} missing chunk(s) are on no reachable peer",
                    hint="fetch from a peer that holds the whole revision, then run the command again",
                ))
                break
        self._done.set()


def _have_batches(manifest_ids: list[bytes], files: dict[bytes, _File]) -> list[list[bytes]]:
    """Split HAVE requests so that each asks at most MAX_HAVE_IDS ids and HAVE_REQUEST_BITMAP_BYTES of bitmaps."""
    batches: list[list[bytes]] = []
    batch: list[bytes] = []
    size = 0
    for mid in manifest_ids:
        bitmap = bitmap_size(len(files[mid].chunks))
        if batch and (len(batch) >= m.MAX_HAVE_IDS or size + bitmap > HAVE_REQUEST_BITMAP_BYTES):
            batches.append(batch)
            batch, size = [], 0
        batch.append(mid)
        size += bitmap
    if batch:
        batches.append(batch)
    return batches


def advertised_addresses(host) -> list[str]:
    """Return the listen addresses to give other swarm members, with a wildcard host replaced by this machine's address."""
    from p2pvc.node.addresses import primary_ip

    addresses = []
    for address in host.listen_addresses():
        if address.startswith("/ip4/0.0.0.0/"):
            address = f"/ip4/{primary_ip()}/" + address[len("/ip4/0.0.0.0/") :]
        addresses.append(address)
    return addresses[: m.MAX_ADDRESSES]
