"""A p2pvc node: serves repositories, pulls and pushes, and gossips new heads.

Theory of operation. Small signed records travel by direct announcement:
when a node stores a new ref update or membership record (a local commit
seen by polling the database, or a record received from a peer), it sends
`ANNOUNCE` to every connected peer except the one it came from. The
receiver verifies the records, pulls the missing objects from the
announcer, stores the records last, and forwards them in turn. Nothing is
lost if an announcement is: every connection to a known peer starts with a
full exchange (pull, then push), and the exchange repeats every
`ANTI_ENTROPY_S`, so a node that was offline catches up at its next contact.

All pulls into one repository are serialized by a lock, so two peers
announcing the same head do not fetch it twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import trio

from p2pvc.errors import P2pvcError, PeerError
from p2pvc.node.client import PeerClient
from p2pvc.node.pull import PullReport, pull
from p2pvc.node.server import RepoServer
from p2pvc.progress import NULL_PROGRESS, Progress
from p2pvc.protocol import messages as m
from p2pvc.protocol.messages import MEMBERS_KEY
from p2pvc.repo import Repository
from p2pvc.sync.heads import differing, local_digests
from p2pvc.sync.state import SyncState

log = logging.getLogger(__name__)

ANTI_ENTROPY_S = 30.0  # full exchange with every known peer this often
WATCH_INTERVAL_S = 0.2  # how often the database is polled for records made by other processes
ANNOUNCE_TIMEOUT_S = 600.0  # a push waits this long for the peer to pull the content
ANNOUNCE_BATCH = 1024  # records per ANNOUNCE message


@dataclass
class ExchangeReport:
    peer: str
    pulled: PullReport | None = None
    pushed_records: int = 0
    error: str | None = None


@dataclass
class _RepoState:
    repo: Repository
    lock: trio.Lock = field(default_factory=trio.Lock)
    known: set[bytes] = field(default_factory=set)  # record ids already announced or received


class Node:
    def __init__(self, host, repos: list[Repository], *, progress: Progress = NULL_PROGRESS) -> None:
        self.host = host
        self.repos = {repo.id: _RepoState(repo) for repo in repos}
        self.progress = progress
        self.pulls_enabled = True  # False: serve only (a seed, or while a fetch writes)
        self.server = RepoServer({rid: s.repo for rid, s in self.repos.items()}, self._on_announce)
        for state in self.repos.values():
            state.known = _record_ids(state.repo)

    def client(self, peer_id: str, repo: Repository) -> PeerClient:
        return PeerClient(self.host.open_frame_stream, peer_id, repo.id)

    # Exchanges --------------------------------------------------------------

    async def exchange(self, peer_id: str, repo: Repository, *, push: bool = True) -> ExchangeReport:
        """Pull everything new from the peer, then push what it lacks."""
        report = ExchangeReport(peer_id)
        state = self.repos[repo.id]
        client = self.client(peer_id, repo)
        try:
            async with state.lock:
                with repo.lock():
                    report.pulled = await pull(repo, client, progress=self.progress)
            if report.pulled.updates_applied or report.pulled.members_applied:
                log.info(
                    "pulled from %s: %d ref update(s), %d object(s), %d chunk(s), %d bytes",
                    peer_id,
                    report.pulled.updates_applied,
                    report.pulled.objects_fetched,
                    report.pulled.chunks_fetched,
                    report.pulled.bytes_fetched,
                )
                await self._announce_new(repo, exclude=peer_id)
            if push:
                report.pushed_records = await self._push(client, repo)
            SyncState(repo.db).record_contact(peer_id, error=None, refs=repo.live_ref_count())
        except (P2pvcError, m.ProtocolViolation) as exc:
            text = exc.message if isinstance(exc, P2pvcError) else f"protocol violation: {exc}"
            report.error = text
            log.warning("exchange with %s failed: %s", peer_id, text)
            SyncState(repo.db).record_contact(peer_id, error=text)
        return report

    async def _push(self, client: PeerClient, repo: Repository) -> int:
        remote = await client.heads()
        local = local_digests(repo.refs.update_ids_by_name(), [i for i, _ in repo.refs.membership_records()])
        names = [n for n in differing(local, remote) if n in local]
        if not names:
            return 0
        records = repo.refs.records_for([n for n in names if n != MEMBERS_KEY])
        if MEMBERS_KEY in names:
            records = [r for _, r in repo.refs.membership_records()] + records
        with trio.fail_after(ANNOUNCE_TIMEOUT_S):
            for start in range(0, len(records), ANNOUNCE_BATCH):
                await client.announce(records[start : start + ANNOUNCE_BATCH])
        return len(records)

    async def _on_announce(self, repo: Repository, peer_id: str, records: tuple[bytes, ...]) -> None:
        """Handle an announcement: pull from the announcer if anything is new."""
        state = self.repos[repo.id]
        new = [r for r in records if _record_id(r) not in state.known]
        if not new or not self.pulls_enabled:
            return
        log.info("peer %s announced %d new record(s)", peer_id, len(new))
        report = await self.exchange(peer_id, repo, push=False)
        if report.error is not None:
            raise PeerError(f"pull after announcement from {peer_id} failed: {report.error}")

    async def _announce_new(self, repo: Repository, exclude: str | None = None) -> int:
        """Announce records this node has not announced yet to every connected peer."""
        state = self.repos[repo.id]
        current = _record_ids(repo)
        fresh_ids = current - state.known
        if not fresh_ids:
            return 0
        state.known = current
        records = [r for i, r in repo.refs.all_updates() if i in fresh_ids]
        records += [r for i, r in repo.refs.membership_records() if i in fresh_ids]
        peers = [p for p in self.host.connected_peers() if p != exclude]
        for peer_id in peers:
            self.host.nursery.start_soon(self._send_announce, peer_id, repo, records)
        return len(records)

    async def _send_announce(self, peer_id: str, repo: Repository, records: list[bytes]) -> None:
        client = self.client(peer_id, repo)
        try:
            with trio.fail_after(ANNOUNCE_TIMEOUT_S):
                for start in range(0, len(records), ANNOUNCE_BATCH):
                    await client.announce(records[start : start + ANNOUNCE_BATCH])
        except (P2pvcError, m.ProtocolViolation, trio.TooSlowError) as exc:
            log.info("announcement to %s failed (anti-entropy will retry): %s", peer_id, exc)

    async def exchange_with_discovered(self, peer_id: str, address: str) -> bool:
        """Dial a peer found on the LAN and exchange every repository it also serves; False if unreachable."""
        try:
            await self.host.connect(address)
        except PeerError as exc:
            log.info("peer %s found by mDNS is unreachable: %s", peer_id, exc.message)
            return False
        for state in self.repos.values():
            report = await self.exchange(peer_id, state.repo)
            if report.error and "is not served" in report.error:
                log.debug("peer %s does not serve %s", peer_id, state.repo.id.hex()[:12])
        return True

    # Background tasks -----------------------------------------------------------

    async def watch_local_records(self) -> None:
        """Announce records written by other processes (a `p2pvc commit` while serving)."""
        while True:
            await trio.sleep(WATCH_INTERVAL_S)
            for state in self.repos.values():
                if not state.lock.locked():
                    await self._announce_new(state.repo)

    async def anti_entropy(self, interval: float = ANTI_ENTROPY_S) -> None:
        """Exchange with every known peer now and then every `interval` seconds."""
        while True:
            for state in self.repos.values():
                for peer in SyncState(state.repo.db).peers():
                    try:
                        peer_id = await self.host.connect(peer.address)
                    except P2pvcError as exc:  # unreachable, or an invalid stored address
                        log.info("peer %s is unreachable: %s", peer.peer_id, exc.message)
                        SyncState(state.repo.db).record_contact(peer.peer_id, error=exc.message)
                        continue
                    await self.exchange(peer_id, state.repo)
            await trio.sleep(interval)


def _record_id(record: bytes) -> bytes:
    from p2pvc.objects.ids import object_id

    return object_id(record)


def _record_ids(repo: Repository) -> set[bytes]:
    ids = {i for i, _ in repo.refs.all_updates()}
    ids.update(i for i, _ in repo.refs.membership_records())
    return ids
