"""Serving repositories to peers: one request per stream, served from the local store.

A node serves only what it has stored and verified. Ref updates are stored
only after their whole closure is (see `p2pvc.node.pull`), so every ref a
node shows can be fetched from it in full.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio

from p2pvc.errors import P2pvcError, PeerError
from p2pvc.objects import model
from p2pvc.protocol import messages as m
from p2pvc.repo import Repository
from p2pvc.sync.availability import LocalAvailability, encode_have
from p2pvc.sync.heads import local_digests
from p2pvc.sync.state import SyncState
from p2pvc.node.ratelimit import UploadLimit
from p2pvc.node.streams import FrameStream, StreamClosed

log = logging.getLogger(__name__)

# Called with (repository, announcing peer, announced records); returns when handled.
AnnounceHandler = Callable[[Repository, str, tuple[bytes, ...]], Awaitable[None]]

PARTIAL_HAVE_TTL_S = 2.0  # how long the availability of a partly stored manifest is reused
HAVE_RESPONSE_BITMAP_BYTES = m.MAX_FRAME // 2  # bitmaps past this are answered HAVE_NONE
# Object requests served at once: per peer, so many downloaders share the uplink fairly, and in
# all, so memory stays bounded (each holds one record plus a write batch of about 1 MiB).
OBJECT_REQUESTS_PER_PEER = 16
OBJECT_REQUESTS_TOTAL = 64


class RepoServer:
    def __init__(self, repos: dict[bytes, Repository], on_announce: AnnounceHandler | None = None) -> None:
        self.repos = repos
        self.on_announce = on_announce
        self.requests_served = 0
        self.availability = {rid: LocalAvailability() for rid in repos}
        self._full: dict[bytes, set[bytes]] = {rid: set() for rid in repos}  # manifests known fully stored
        self._partial: dict[bytes, tuple[float, m.Have]] = {}  # manifest id -> (when computed, availability)
        self.upload_limit: UploadLimit | None = None
        self._all_slots = trio.Semaphore(OBJECT_REQUESTS_TOTAL)
        self._peer_slots: dict[str, tuple[trio.Semaphore, int]] = {}  # peer id -> (slots, requests using them)

    async def handle(self, stream: FrameStream) -> None:
        """Serve one request. A protocol violation closes the stream with a logged reason."""
        peer = stream.peer_id
        try:
            request = await stream.receive()
            await self._dispatch(stream, request)
            self.requests_served += 1
            await stream.close()
        except m.ProtocolViolation as exc:
            log.warning("peer %s broke the protocol: %s; closing the stream", peer, exc)
            await _send_error(stream, m.ERR_BAD_REQUEST, str(exc))
        except StreamClosed as exc:
            log.debug("stream from %s closed early: %s", peer, exc)
        except PeerError as exc:
            # Handling the request needed something from the peer (a pull after its announcement),
            # and that failed. The fault is the peer's, so the error tells it why.
            log.warning("request from %s failed: %s", peer, exc.message)
            await _send_error(stream, m.ERR_BAD_REQUEST, exc.message)
        except P2pvcError as exc:
            # Our own store failed (corruption, disk): tell the peer, keep serving others.
            log.error("request from %s failed locally: %s", peer, exc.message)
            await _send_error(stream, m.ERR_INTERNAL, "the serving node failed to read its store")

    async def _dispatch(self, stream: FrameStream, request: m.Message) -> None:
        if isinstance(request, m.RepositoryRequest):
            records = [repo.db.get_meta("repository") for rid, repo in self.repos.items() if request.repo in (None, rid)]
            await stream.send(m.RepositoryResponse(tuple(r for r in records if r)))
            return
        repo_id = getattr(request, "repo", None)
        repo = self.repos.get(repo_id) if isinstance(repo_id, bytes) else None
        if repo is None:
            if repo_id is None:
                raise m.ProtocolViolation(f"{type(request).__name__} is not a request")
            await _send_error(stream, m.ERR_UNKNOWN_REPOSITORY, f"repository {repo_id.hex()[:12]} is not served here")
            return
        with repo.lock():  # gc must not move records while this request reads them
            await self._answer(stream, repo, request)

    async def _answer(self, stream: FrameStream, repo: Repository, request: m.Message) -> None:
        if isinstance(request, m.HeadsRequest):
            digests = local_digests(repo.refs.update_ids_by_name(), [i for i, _ in repo.refs.membership_records()])
            await stream.send(m.HeadsResponse(digests))
        elif isinstance(request, m.UpdatesRequest):
            await self._send_updates(stream, repo, list(request.names))
        elif isinstance(request, m.ObjectsRequest):
            async with self._object_slot(stream.peer_id):
                await self._send_objects(stream, repo, request.ids)
        elif isinstance(request, m.HaveRequest):
            await stream.send(self._have(repo, stream.peer_id, request))
        elif isinstance(request, m.Announce):
            if self.on_announce is not None:
                await self.on_announce(repo, stream.peer_id, request.records)
            await stream.send(m.Ack())
        else:
            raise m.ProtocolViolation(f"{type(request).__name__} is not a request")

    async def _send_updates(self, stream: FrameStream, repo: Repository, names: list[str]) -> None:
        records = repo.refs.records_for([n for n in names if n != m.MEMBERS_KEY])
        if m.MEMBERS_KEY in names:
            records = [r for _, r in repo.refs.membership_records()] + records
        batch: list[bytes] = []
        size = 0
        for record in records:
            # Keep each frame well under MAX_FRAME: 16 bytes covers msgpack's per-item overhead.
            if batch and size + len(record) + 16 > m.MAX_FRAME // 2:
                await stream.send(m.UpdatesResponse(tuple(batch)))
                batch, size = [], 0
            batch.append(record)
            size += len(record) + 16
        if batch:
            await stream.send(m.UpdatesResponse(tuple(batch)))
        await stream.send(m.End(()))

    @asynccontextmanager
    async def _object_slot(self, peer: str) -> AsyncIterator[None]:
        """Wait for a free slot of this peer's and of the node's object requests."""
        slots, users = self._peer_slots.get(peer, (None, 0))
        if slots is None:
            slots = trio.Semaphore(OBJECT_REQUESTS_PER_PEER)
        self._peer_slots[peer] = (slots, users + 1)
        try:
            async with slots, self._all_slots:
                yield
        finally:
            slots, users = self._peer_slots[peer]
            if users <= 1:
                del self._peer_slots[peer]
            else:
                self._peer_slots[peer] = (slots, users - 1)

    def _have(self, repo: Repository, peer: str, request: m.HaveRequest) -> m.HaveResponse:
        """Return which requested commits are complete here and which chunks of each requested manifest are stored."""
        now = time.monotonic()
        availability = self.availability[repo.id]
        availability.note_member(peer, request.listen, now)
        state = SyncState(repo.db)
        answers: list[m.Have] = []
        budget = HAVE_RESPONSE_BITMAP_BYTES
        for oid in request.ids:
            have = availability.have(oid)
            if have is None:
                have = self._stored_have(repo, state, oid, now)
            if isinstance(have, bytes):
                if len(have) > budget:
                    have = m.HAVE_NONE  # "do not ask me": safe, only less helpful
                else:
                    budget -= len(have)
            answers.append(have)
        return m.HaveResponse(tuple(answers), availability.members(peer, now))

    def _stored_have(self, repo: Repository, state: SyncState, oid: bytes, now: float) -> m.Have:
        full = self._full[repo.id]
        if oid in full:
            return m.HAVE_ALL
        cached = self._partial.get(oid)
        if cached is not None and now - cached[0] < PARTIAL_HAVE_TTL_S:
            return cached[1]
        entry = repo.store.entry(oid)
        if entry is None:
            return m.HAVE_NONE
        if entry.kind == model.KIND_COMMIT:
            return m.HAVE_ALL if state.is_complete(oid) else m.HAVE_NONE
        if entry.kind != model.KIND_MANIFEST:
            return m.HAVE_NONE
        manifest = repo.store.get_object(oid, model.KIND_MANIFEST)
        assert isinstance(manifest, model.Manifest)
        ids = [c.id for c in manifest.chunks]
        stored = repo.store.has_many(ids)
        fresh = self.availability[repo.id].fresh
        have = encode_have([cid in stored or cid in fresh for cid in ids])
        if have is m.HAVE_ALL:
            full.add(oid)
        else:
            if len(self._partial) > 10_000:
                self._partial.clear()  # bounds memory; entries are only a cache
            self._partial[oid] = (now, have)
        return have

    async def _send_objects(self, stream: FrameStream, repo: Repository, ids: tuple[bytes, ...]) -> None:
        missing = []
        fresh = self.availability[repo.id].fresh
        for oid in ids:
            found = repo.store.read_stored(oid)
            if found is not None:
                entry, stored = found
                kind, codec, raw_size = entry.kind, entry.codec, entry.raw_size
            elif oid in fresh:
                # Verified by a fetch running here and appended, but not durable yet.
                record = fresh[oid]
                kind, codec, raw_size, stored = record.kind, record.codec, record.raw_size, record.stored
            else:
                missing.append(oid)
                continue
            offset = 0
            while True:
                part = stored[offset : offset + m.OBJECT_PART_BYTES]
                if self.upload_limit is not None:
                    await self.upload_limit.take(len(part))
                await stream.send(m.ObjectPart(oid, kind, codec, raw_size, len(stored), offset, part))
                offset += len(part)
                if offset >= len(stored):
                    break
        await stream.send(m.End(tuple(missing)))


async def _send_error(stream: FrameStream, code: int, text: str) -> None:
    """Send an error and close the stream; a close (unlike a reset) lets the peer read the error first."""
    try:
        await stream.send(m.ErrorResponse(code, text))
    except StreamClosed:
        await stream.reset()
        return
    await stream.close()
