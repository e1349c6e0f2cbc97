"""Running a node for a command: `serve` (until stopped), `sync` and `clone` (one exchange).

This is the only module the CLI calls for networking; it imports libp2p
lazily through `p2pvc.node.transport`, so local commands stay fast.
"""

from __future__ import annotations

import logging
import signal
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import AsyncIterator, Callable

import trio

from p2pvc.errors import P2pvcError, PeerError, UserError
from p2pvc.node.service import ExchangeReport, Node
from p2pvc.progress import NULL_PROGRESS, Progress
from p2pvc.repo import Repository
from p2pvc.sync.state import SyncState

log = logging.getLogger(__name__)

DEFAULT_PORT = 4730
STOP_TIMEOUT_S = 2.0


def default_listen(host: str = "0.0.0.0", port: int = DEFAULT_PORT) -> list[str]:
    return [f"/ip4/{host}/tcp/{port}"]


@asynccontextmanager
async def running_node(
    repos: list[Repository],
    listen: list[str],
    *,
    progress: Progress = NULL_PROGRESS,
    upload_limit: float | None = None,
) -> AsyncIterator[Node]:
    """Run a node serving `repos`; `upload_limit` caps the chunk and object bytes it sends per second."""
    from p2pvc.node.ratelimit import UploadLimit
    from p2pvc.node.transport import open_node_host

    seed = repos[0].identity.seed
    async with open_node_host(seed, listen) as host:
        node = Node(host, repos, progress=progress)
        if upload_limit:
            node.server.upload_limit = UploadLimit(upload_limit)
        host.serve(node.server.handle)
        yield node


async def serve(
    repos: list[Repository],
    listen: list[str],
    *,
    anti_entropy_s: float,
    mdns: bool = False,
    seed: bool = False,
    upload_limit: float | None = None,
    on_ready: Callable[[list[str], str], None] | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM; then stop within STOP_TIMEOUT_S.

    With `seed`, only serve: pull nothing, neither periodically nor on announcements.
    """
    async with running_node(repos, listen, upload_limit=upload_limit) as node:
        if on_ready is not None:
            on_ready(node.host.listen_addresses(), node.host.peer_id)
        for repo in repos:
            log.info("serving repository %s from %s%s", repo.id.hex()[:12], repo.worktree, " as a seed" if seed else "")
        node.pulls_enabled = not seed
        async with trio.open_nursery() as nursery:
            if not seed:
                nursery.start_soon(node.watch_local_records)
                nursery.start_soon(node.anti_entropy, anti_entropy_s)
            if mdns:
                from p2pvc.node.discovery import run_mdns

                port = int(node.host.listen_addresses()[0].split("/tcp/")[1].split("/")[0])
                nursery.start_soon(run_mdns, node.host.libp2p_host, port, node.exchange_with_discovered)
            await _until_signal()
            nursery.cancel_scope.cancel()


async def _until_signal() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s, stopping", signal.Signals(signum).name)
            return


def _targets(repo: Repository, addresses: list[str]) -> list[str]:
    """Return the given addresses, then every stored peer's, each once."""
    targets = list(addresses)
    for peer in SyncState(repo.db).peers():
        if peer.address not in targets:
            targets.append(peer.address)
    return targets


async def fetch(
    repo: Repository,
    rev: str,
    paths: list[bytes],
    addresses: list[str],
    listen: list[str],
    *,
    seed: bool = False,
    peer_exchange: bool = True,
    upload_limit: float | None = None,
    progress: Progress = NULL_PROGRESS,
    on_done: Callable[[object], None] | None = None,
    on_ready: Callable[[list[str], str], None] | None = None,
):
    """Fetch `rev` from every reachable peer while serving what arrives; with `seed`, keep serving after.

    `on_ready` gets the listen addresses and peer id once the node listens.
    `on_done` runs on a worker thread once the content is stored, before the seeding.
    """
    from p2pvc.node import fetch as fetching

    targets = _targets(repo, addresses)
    if not targets:
        raise UserError("no peers to fetch from", hint="pass --peer ADDRESS, or add one with p2pvc peer add ADDRESS")
    async with running_node([repo], listen, progress=progress, upload_limit=upload_limit) as node:
        node.pulls_enabled = False  # serve while fetching, but let only this fetch write
        if on_ready is not None:
            on_ready(node.host.listen_addresses(), node.host.peer_id)
        report = await fetching.fetch(node, repo, rev, paths, targets, progress=progress, peer_exchange=peer_exchange)
        if on_done is not None:
            # On a worker thread, so the node keeps serving while it runs (a checkout, say).
            await trio.to_thread.run_sync(on_done, report)
        if seed:
            log.info("fetch done; seeding %s until stopped", repo.id.hex()[:12])
            await _until_signal()
    return report


async def whereis(repo: Repository, ids: list[bytes], addresses: list[str]):
    """Ask every reachable peer which of `ids` (commits, manifests) it holds.

    Returns (answers per peer id, unreachable (address, reason) pairs).
    """
    from p2pvc.node.streams import StreamClosed
    from p2pvc.node.transport import open_node_host
    from p2pvc.protocol.messages import ProtocolViolation

    answers: dict[str, tuple] = {}
    unreachable: list[tuple[str, str]] = []
    async with open_node_host(repo.identity.seed, ["/ip4/127.0.0.1/tcp/0"]) as host:
        from p2pvc.node.client import PeerClient

        for address in _targets(repo, addresses):
            try:
                peer_id = await host.connect(address)
                client = PeerClient(host.open_frame_stream, peer_id, repo.id)
                have: list = []
                for start in range(0, len(ids), 256):
                    have.extend((await client.have(ids[start : start + 256], [])).have)
                answers[peer_id] = tuple(have)
            except P2pvcError as exc:
                unreachable.append((address, exc.message))
            except (StreamClosed, ProtocolViolation) as exc:  # report the peer, ask the others
                unreachable.append((address, f"bad answer: {exc}"))
    return answers, unreachable


@dataclass
class SyncResult:
    reports: list[ExchangeReport] = field(default_factory=list)
    unreachable: list[tuple[str, str]] = field(default_factory=list)  # (address, reason)


async def sync(repo: Repository, addresses: list[str], *, progress: Progress = NULL_PROGRESS) -> SyncResult:
    """Exchange with each address (or every known peer); an unreachable peer does not stop the others."""
    targets = addresses or [p.address for p in SyncState(repo.db).peers()]
    if not targets:
        raise UserError("no peers to sync with", hint="add one with: p2pvc peer add ADDRESS, or pass it to p2pvc sync")
    result = SyncResult()
    async with running_node([repo], ["/ip4/127.0.0.1/tcp/0"], progress=progress) as node:
        for address in targets:
            try:
                peer_id = await node.host.connect(address)
            except P2pvcError as exc:  # unreachable (PeerError) or an invalid address (UserError)
                result.unreachable.append((address, exc.message))
                continue
            report = await node.exchange(peer_id, repo)
            result.reports.append(report)
    return result


def clone_target_hint(path: Path, otherwise: str) -> str:
    """Return the hint for a clone into a folder that is not empty."""
    if (path / ".p2pvc").is_dir():
        return f"it holds a repository, maybe from an interrupted clone: run p2pvc sync in {path} to finish it"
    return otherwise


def _repository_prefix(repo_hex: str | None) -> str | None:
    """Return a repository id or id prefix in lower case; raises UserError if it is not one."""
    if repo_hex is None:
        return None
    prefix = repo_hex.strip().lower()
    if not 4 <= len(prefix) <= 64 or any(c not in "0123456789abcdef" for c in prefix):
        raise UserError(
            f"invalid repository id {repo_hex!r}",
            hint="pass the id that p2pvc init or p2pvc serve prints (4 to 64 hex digits)",
        )
    return prefix


async def clone(
    address: str,
    path: Path | None,
    *,
    repo_hex: str | None = None,
    history_only: bool = False,
    progress: Progress = NULL_PROGRESS,
) -> tuple[Repository, ExchangeReport]:
    """Create a replica of a repository served at `address` in `path`, and pull it."""
    from p2pvc.identity.keys import load_or_create
    from p2pvc.node.client import PeerClient
    from p2pvc.node.transport import open_node_host
    from p2pvc.refs.records import decode_repository

    prefix = _repository_prefix(repo_hex)
    identity = load_or_create()
    async with open_node_host(identity.seed, ["/ip4/127.0.0.1/tcp/0"]) as host:
        peer_id = await host.connect(address)
        # A whole id is asked for by itself; a prefix, as the commands print ids, is matched here.
        requested = bytes.fromhex(prefix) if prefix is not None and len(prefix) == 64 else None
        records = await PeerClient(host.open_frame_stream, peer_id, b"\x00" * 32).repository_records(requested)
        if prefix is not None:
            records = tuple(r for r in records if decode_repository(r).id.hex().startswith(prefix))
        if not records:
            raise PeerError(f"peer {peer_id} serves no repository" + (f" with id {repo_hex}" if repo_hex else ""))
        if len(records) > 1:
            ids = ", ".join(decode_repository(r).id.hex()[:12] for r in records)
            raise UserError(f"peer {peer_id} serves several repositories: {ids}", hint="choose one with --repo ID")
    if path is None:
        path = Path.cwd() / f"p2pvc-{decode_repository(records[0]).id.hex()[:12]}"
        if path.exists() and any(path.iterdir()):
            raise UserError(f"{path} exists and is not empty", hint=clone_target_hint(path, "pass a folder name to p2pvc clone"))
    repo = Repository.init_from_record(path, records[0], identity)
    try:
        if history_only:
            repo.set_history_only(True)
        SyncState(repo.db).add_peer(peer_id, address)
        result = await sync(repo, [address], progress=progress)
    except P2pvcError:
        repo.close()
        raise
    if result.unreachable:
        repo.close()
        raise PeerError(
            f"peer {address} became unreachable: {result.unreachable[0][1]}",
            hint=f"the replica in {path} keeps what arrived; run p2pvc sync there to finish",
        )
    report = result.reports[0]
    if report.error is not None:
        repo.close()
        raise PeerError(
            f"cloning from {report.peer} failed: {report.error}",
            hint=f"the replica in {path} keeps what arrived; run p2pvc sync there to finish",
        )
    return repo, report
