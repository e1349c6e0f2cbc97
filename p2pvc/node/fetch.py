"""`p2pvc fetch`: one revision's content, or part of it, from every peer at once.

Steps: history first (signed records, commits, trees and manifests, no
chunks) from the first peer that answers; then the revision is resolved,
newest signed update first, so `fetch main` means main as the swarm knows
it; then the chunks of the selected files come from the swarm
(`p2pvc.node.swarm`); last, ref updates whose content is now complete are
applied, as after any pull.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import trio

from p2pvc.errors import P2pvcError, PeerError, UserError
from p2pvc.node.pull import SYNC_COMMIT_BYTES, PullReport, apply_updates, pull_history
from p2pvc.node.swarm import SwarmFetch, SwarmReport
from p2pvc.objects import model
from p2pvc.progress import NULL_PROGRESS, Progress
from p2pvc.protocol import messages as m
from p2pvc.refs.records import BRANCH_PREFIX, TAG_PREFIX, RefUpdate
from p2pvc.repo import Repository
from p2pvc.sync.state import SyncState
from p2pvc.worktree.trees import flatten, select_paths

log = logging.getLogger(__name__)


@dataclass
class FetchReport:
    commit: bytes
    history_peer: str | None
    files: int  # selected files
    bytes_selected: int  # raw bytes of the selected files
    swarm: SwarmReport
    history: PullReport | None
    unreachable: list[tuple[str, str]] = field(default_factory=list)  # (address, reason)
    applied_refs: int = 0


def resolve(repo: Repository, rev: str, updates: list[RefUpdate]) -> bytes:
    """Resolve `rev`, preferring the newest update of a ref of that name among stored and received ones."""
    for name in (rev, BRANCH_PREFIX + rev, TAG_PREFIX + rev):
        if not name.startswith((BRANCH_PREFIX, TAG_PREFIX)):
            continue
        candidates = [u for u in updates if u.name == name] + repo.refs.updates(name)
        if candidates:
            newest = max(candidates, key=lambda u: (u.clock, u.id))
            if newest.target is None:
                raise UserError(f"{rev} was deleted")
            return newest.target
    return repo.resolve(rev)


async def fetch(
    node,
    repo: Repository,
    rev: str,
    paths: list[bytes],
    addresses: list[str],
    *,
    progress: Progress = NULL_PROGRESS,
    peer_exchange: bool = True,
) -> FetchReport:
    """Fetch the content of `rev` (only `paths`, when given) from every reachable peer."""
    peers: list[str] = []
    reached: dict[str, str] = {}  # peer id -> address
    unreachable: list[tuple[str, str]] = []
    for address in addresses:
        try:
            peer = await node.host.connect(address)
        except P2pvcError as exc:
            unreachable.append((address, exc.message))
            continue
        if peer not in reached:
            peers.append(peer)
            reached[peer] = address
    if not peers:
        detail = "; ".join(f"{a}: {r}" for a, r in unreachable) or "no peers are known"
        raise PeerError(
            f"no peer could be reached ({detail})",
            hint="add one with p2pvc peer add ADDRESS, or pass --peer ADDRESS",
        )

    history, updates, history_peer = None, [], None
    for peer in peers:
        history = PullReport(peer)
        try:
            async with node.repos[repo.id].lock:
                with repo.lock():
                    updates = await pull_history(repo, node.client(peer, repo), history)
            history_peer = peer
            break
        except (PeerError, m.ProtocolViolation) as exc:
            log.warning("fetching history from %s failed: %s", peer, exc)
            unreachable.append((peer, str(exc)))
    if history_peer is None:
        raise PeerError("no peer sent the repository's history", hint="check that the peers serve this repository")
    state = SyncState(repo.db)
    if repo.history_only:
        apply_updates(repo, state, updates, history, with_chunks=False)

    commit_id = resolve(repo, rev, updates)
    if not repo.store.has(commit_id):
        raise UserError(f"{rev} ({commit_id.hex()[:12]}) is not in the history any peer sent")
    flat = flatten(repo.read_tree, repo.read_commit(commit_id).commit.tree)
    chosen = select_paths(flat, paths)
    missing_paths = [p for p in paths if not any(q == p or q.startswith(p + b"/") for q in chosen)]
    if missing_paths:
        raise UserError(f"{os.fsdecode(missing_paths[0])} does not exist in {rev}")
    manifests: dict[bytes, model.Manifest] = {}
    for entry in chosen.values():
        if entry.kind == model.ENTRY_FILE and entry.target not in manifests:
            manifests[entry.target] = repo.read_manifest(entry.target)

    availability = node.server.availability[repo.id]
    with repo.lock():
        with repo.store.session(SYNC_COMMIT_BYTES) as session:
            swarm = SwarmFetch(node, repo, session, manifests, progress=progress, peer_exchange=peer_exchange)
            try:
                await swarm.run(peers, reached)
            finally:
                # Everything appended was verified first, so keep it even when the fetch failed:
                # a rerun then fetches only the rest.
                with trio.CancelScope(shield=True):
                    session.commit()
                    availability.durable()

    report = FetchReport(
        commit=commit_id,
        history_peer=history_peer,
        files=sum(1 for e in chosen.values() if e.kind == model.ENTRY_FILE),
        bytes_selected=sum(e.size for e in chosen.values() if e.kind == model.ENTRY_FILE),
        swarm=swarm.report,
        history=history,
        unreachable=unreachable,
    )
    if not repo.history_only:
        before = history.updates_applied
        apply_updates(repo, state, updates, history, with_chunks=True)
        report.applied_refs = history.updates_applied - before
    else:
        report.applied_refs = history.updates_applied
    return report
