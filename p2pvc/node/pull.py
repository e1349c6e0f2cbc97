"""Pulling from one peer: anti-entropy on refs, then the missing objects, then the refs.

Order of publication: membership records first (they decide which
signatures count), then objects (commits, trees, manifests, then chunks),
and a ref update last, only once everything it reaches is stored and
verified. A peer that sends anything that fails verification is dropped
for the rest of the pull and logged with its peer id. What arrived before
stays stored, so a rerun (with this or another peer) fetches only the rest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import trio

from p2pvc.errors import CorruptionError, InvalidSignatureError, P2pvcError, PeerError
from p2pvc.identity.keys import verify
from p2pvc.node.client import PeerClient
from p2pvc.objects import model
from p2pvc.progress import NULL_PROGRESS, Progress
from p2pvc.protocol import messages as m
from p2pvc.refs import membership
from p2pvc.refs.records import RefUpdate, decode_ref_update
from p2pvc.repo import Repository
from p2pvc.store.objectstore import WriteSession
from p2pvc.sync.closure import KIND_CHUNK, ClosureWalker
from p2pvc.sync.heads import differing, local_digests
from p2pvc.sync.receive import verify as verify_received
from p2pvc.sync.retired import storable_without_content
from p2pvc.sync.state import RefChange, SyncState

log = logging.getLogger(__name__)

OBJECT_BATCH = 1024  # ids per request for commits, trees and manifests
CHUNK_BATCH = 128  # chunks per request: about 10 MiB of average chunks; fewer streams to open
VERIFY_BATCH = 16  # chunks decoded and hashed per hand-off to the verifying thread
CHUNK_REQUESTS_IN_FLIGHT = 4  # per peer; keeps the link busy across request round trips
SYNC_COMMIT_BYTES = 32 * 1024 * 1024  # durable index batches: an interrupted pull loses at most this much


class MisbehavingPeer(PeerError):
    """The peer sent data that failed verification."""


@dataclass
class PullReport:
    peer: str
    updates_received: int = 0
    updates_applied: int = 0
    updates_rejected: list[str] = field(default_factory=list)  # reasons
    members_applied: int = 0
    objects_fetched: int = 0
    chunks_fetched: int = 0
    bytes_fetched: int = 0  # stored (wire) bytes of objects and chunks
    changes: list[RefChange] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)  # refs whose content the peer lacked


async def pull(repo: Repository, client: PeerClient, *, progress: Progress = NULL_PROGRESS) -> PullReport:
    """Fetch everything new from one peer and store it in publication order."""
    report = PullReport(client.peer_id)
    with_chunks = not repo.history_only
    state = SyncState(repo.db)

    # 1. Anti-entropy: which refs differ, and which local refs still lack content.
    remote = await client.heads()
    local = local_digests(repo.refs.update_ids_by_name(), [i for i, _ in repo.refs.membership_records()])
    names = [n for n in differing(local, remote) if n in remote]
    # Refs whose content is not all here yet (after a history-only clone, or an interrupted pull).
    unfinished = [s.target for s in repo.ref_states() if with_chunks and s.target and not state.is_complete(s.target)]
    if not names and not unfinished:
        return report

    # 2. Signed records: membership first, then the ref updates to apply later.
    records = await client.updates(names) if names else []
    updates = _apply_members_and_parse(repo, records, report)
    if not updates and not unfinished:
        return report
    before = {u.name: _target(repo, u.name) for u in updates}

    # 3. Objects, then chunks, each verified before it is appended.
    walker = ClosureWalker(repo.store.has, _loader(repo), state.is_complete, with_chunks=with_chunks)
    for target in [u.target for u in updates if u.target is not None] + unfinished:
        walker.add(target)
    with repo.store.session(SYNC_COMMIT_BYTES) as session:
        try:
            await _fetch_objects(repo, client, walker, session, report)
            await _fetch_chunks(client, walker, session, report, progress)
        except BaseException:
            # Everything pending was verified before it was appended, so keep it: a rerun
            # (with this peer or another) then fetches only the rest.
            with trio.CancelScope(shield=True):
                session.commit()
            raise

    # 4. Ref updates last, each only once everything it reaches is stored.
    apply_updates(repo, state, updates, report, with_chunks)
    if unfinished and not walker.missing.chunks and not walker.missing.objects:
        state.mark_complete(walker.commits)
    for name, old in before.items():
        new_state = repo.ref_state(name)
        new = new_state.target if new_state else None
        if new != old or (new_state and new_state.conflicted):
            report.changes.append(RefChange(name, old, new, bool(new_state and new_state.conflicted)))
    return report


async def pull_history(repo: Repository, client: PeerClient, report: PullReport) -> list[RefUpdate]:
    """Fetch membership records, new ref updates and every commit, tree and manifest they
    reach, but no chunks, and apply no ref update; return the verified new updates.

    A swarm fetch starts with this: it must know the files before it can ask
    anyone for their chunks.
    """
    remote = await client.heads()
    local = local_digests(repo.refs.update_ids_by_name(), [i for i, _ in repo.refs.membership_records()])
    names = [n for n in differing(local, remote) if n in remote]
    records = await client.updates(names) if names else []
    updates = _apply_members_and_parse(repo, records, report)
    state = SyncState(repo.db)
    walker = ClosureWalker(repo.store.has, _loader(repo), state.is_complete, with_chunks=False)
    for update in updates:
        if update.target is not None:
            walker.add(update.target)
    with repo.store.session(SYNC_COMMIT_BYTES) as session:
        await _fetch_objects(repo, client, walker, session, report)
    return updates


def _target(repo: Repository, name: str) -> bytes | None:
    state = repo.ref_state(name)
    return state.target if state else None


def _loader(repo: Repository):
    def load(oid: bytes, kind: int) -> model.StoredObject:
        return repo.store.get_object(oid, kind)

    return load


def _apply_members_and_parse(repo: Repository, records: list[bytes], report: PullReport) -> list[RefUpdate]:
    """Store new membership records first, then return the new, verified ref updates."""
    ref_records = []
    for record in records:
        if record[:1] and _is_membership(record):
            try:
                member_record = membership.decode(record)
                if not repo.refs.has_membership(member_record.id) and repo.refs.add_membership_verified(member_record):
                    report.members_applied += 1
            except InvalidSignatureError as exc:
                raise _forged(report, exc) from exc
            except CorruptionError as exc:
                report.updates_rejected.append(f"membership record: {exc.message}")
                log.warning("rejected a membership record from %s: %s", report.peer, exc.message)
        else:
            ref_records.append(record)
    updates = []
    for record in ref_records:
        try:
            update = decode_ref_update(record)
            if repo.refs.has_update(update.id):
                continue
            repo.refs.check_acceptable(update)
        except InvalidSignatureError as exc:
            raise _forged(report, exc) from exc
        except CorruptionError as exc:
            report.updates_rejected.append(exc.message)
            log.warning("rejected a ref update from %s: %s", report.peer, exc.message)
            continue
        report.updates_received += 1
        updates.append(update)
    return updates


def _forged(report: PullReport, exc: InvalidSignatureError) -> MisbehavingPeer:
    """Drop a peer that sent a record whose signature does not verify.

    Every node verifies records before it stores them, so an honest peer
    never stores one, unlike a record of a signer who is not a member yet.
    """
    return MisbehavingPeer(f"peer {report.peer} sent a forged record: {exc.message}")


def _is_membership(record: bytes) -> bool:
    # Both record kinds are msgpack arrays whose first element is the kind (a positive fixint).
    return len(record) > 1 and record[1] == membership.KIND_MEMBERSHIP


async def _fetch_objects(repo: Repository, client: PeerClient, walker: ClosureWalker, session: WriteSession, report) -> None:
    unavailable: set[bytes] = set()
    while True:
        missing = walker.walk()
        wanted = [oid for oid in missing.objects if oid not in unavailable]
        if not wanted:
            return
        for start in range(0, len(wanted), OBJECT_BATCH):
            batch = wanted[start : start + OBJECT_BATCH]
            async for item in client.objects(batch):
                if isinstance(item, m.End):
                    unavailable.update(item.missing)
                    continue
                first, stored = item
                expected = missing.objects.get(first.id)
                if expected is None:
                    continue
                received = _verified(client, first, stored, expected, None)
                if isinstance(received.obj, model.Commit):
                    _check_commit_author(repo, client, received.id, received.obj)
                session.put_encoded(received.kind, received.id, received.raw_size, received.codec, received.stored)
                report.objects_fetched += 1
                report.bytes_fetched += len(stored)
                assert received.obj is not None
                walker.received(received.id, received.obj)
        # Objects written in this round must be readable by the next walk.
        session.commit()


async def _fetch_chunks(
    client: PeerClient, walker: ClosureWalker, session: WriteSession, report: PullReport, progress: Progress
) -> None:
    chunks = list(walker.missing.chunks.items())
    if not chunks:
        return
    progress.start(f"from {client.peer_id[-8:]}", sum(size for _, size in chunks))
    batches = [chunks[i : i + CHUNK_BATCH] for i in range(0, len(chunks), CHUNK_BATCH)]
    send_batch, receive_batch = trio.open_memory_channel(len(batches))
    for batch in batches:
        send_batch.send_nowait(batch)
    send_batch.close()

    # Decoding and hashing run on one worker thread. zstd decompression releases the GIL
    # there, so the trio thread goes on reading frames. A batch amortizes the hand-off.
    verifier = trio.CapacityLimiter(1)

    def verify_all(items: list[tuple[m.ObjectPart, bytes]], sizes: dict[bytes, int]):
        """Return the chunks that verify, up to the first that does not, and that one's error."""
        verified = []
        for first, stored in items:
            try:
                verified.append(_verified(client, first, stored, KIND_CHUNK, sizes.get(first.id)))
            except MisbehavingPeer as exc:
                return verified, exc
        return verified, None

    async def verify_and_store(items: list[tuple[m.ObjectPart, bytes]], sizes: dict[bytes, int]) -> None:
        verified, error = await trio.to_thread.run_sync(verify_all, items, sizes, limiter=verifier)
        for received in verified:
            # checked: the walk found these chunks absent from the index.
            if session.put_encoded(
                KIND_CHUNK, received.id, received.raw_size, received.codec, received.stored, checked=True
            ):
                report.chunks_fetched += 1
                report.bytes_fetched += len(received.stored)
            walker.missing.chunks.pop(received.id, None)
            progress.advance(received.raw_size)
        if error is not None:
            raise error  # after storing what verified, so a rerun does not fetch it again

    async def worker() -> None:
        async for batch in receive_batch:
            sizes = dict(batch)
            items: list[tuple[m.ObjectPart, bytes]] = []
            async for item in client.objects([cid for cid, _ in batch]):
                if isinstance(item, m.End):
                    continue  # left in walker.missing: the ref stays unapplied
                items.append(item)
                if len(items) >= VERIFY_BATCH:
                    await verify_and_store(items, sizes)
                    items = []
            if items:
                await verify_and_store(items, sizes)

    try:
        async with trio.open_nursery() as nursery:
            for _ in range(CHUNK_REQUESTS_IN_FLIGHT):
                nursery.start_soon(worker)
    except BaseExceptionGroup as group:
        raise first_leaf(group) from None
    finally:
        progress.finish()


def first_leaf(group: BaseExceptionGroup) -> BaseException:
    """Return the first plain exception in a (nested) exception group, so callers see one error."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _verified(client: PeerClient, first, stored: bytes, kind: int, size: int | None):
    try:
        return verify_received(first, stored, kind, size)
    except CorruptionError as exc:
        log.warning("peer %s sent bad data and is dropped for this pull: %s", client.peer_id, exc.message)
        raise MisbehavingPeer(f"peer {client.peer_id} sent data that failed verification: {exc.message}") from exc


def _check_commit_author(repo: Repository, client: PeerClient, oid: bytes, commit: model.Commit) -> None:
    if not verify(commit.author, commit.signature, commit.signing_payload()):
        log.warning("peer %s sent commit %s with an invalid signature", client.peer_id, oid.hex()[:12])
        raise MisbehavingPeer(f"peer {client.peer_id} sent commit {oid.hex()[:12]} with an invalid signature")
    if commit.author not in repo.refs.members().ever:
        log.warning("peer %s sent commit %s signed by a non-member", client.peer_id, oid.hex()[:12])
        raise MisbehavingPeer(f"peer {client.peer_id} sent commit {oid.hex()[:12]} signed by a non-member")


def apply_updates(
    repo: Repository, state: SyncState, updates: list[RefUpdate], report: PullReport, with_chunks: bool
) -> None:
    """Store each update whose closure is now complete; mark the closures complete.

    In a history-only replica the closure stops at manifests, and nothing is marked complete.
    """
    complete: dict[bytes, ClosureWalker | None] = {}
    for update in updates:
        complete[update.id] = None
        if update.target is not None:
            check = ClosureWalker(repo.store.has, _loader(repo), state.is_complete, with_chunks=with_chunks)
            check.add(update.target)
            missing = check.walk()
            if missing.objects or missing.chunks:
                del complete[update.id]
                continue
            complete[update.id] = check
    # Updates that will be stored: already stored ones, and the complete ones of this batch.
    superseders = [u for u in updates if u.id in complete]
    for name in {u.name for u in updates}:
        superseders += repo.refs.updates(name)
    for update in sorted(updates, key=lambda u: (u.clock, u.id)):
        if update.id not in complete:
            if not storable_without_content(update, superseders):
                report.incomplete.append(update.name)
                log.info("not applying %s from %s yet: part of its content is missing", update.name, report.peer)
                continue
            # Retired by a later update: it can never be the ref's value, so its content is not needed.
        elif with_chunks and complete[update.id] is not None:
            state.mark_complete(complete[update.id].commits)
        try:
            if repo.refs.add_verified(update):
                report.updates_applied += 1
        except P2pvcError as exc:
            report.updates_rejected.append(exc.message)
            log.warning("rejected ref update %s from %s: %s", update.id.hex()[:12], report.peer, exc.message)
