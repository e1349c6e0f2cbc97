"""Commands for content spread over many peers: fetch (swarm download) and whereis.

`register(app)` adds them to the `p2pvc` command line.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from p2pvc.cli import output

JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]


def register(app: typer.Typer) -> None:
    """Add fetch and whereis to `app`. Calling it twice adds them once."""
    if any(info.name == "fetch" for info in app.registered_commands):
        return
    app.command("fetch")(fetch)
    app.command("whereis")(whereis)


def _main():
    from p2pvc.cli import main  # loaded by the time a command runs

    return main


def _tree_path(path: str) -> bytes:
    """Return a path inside the repository, as given on the command line, in tree form (a/b/c)."""
    from p2pvc.errors import UserError

    parts = [p for p in path.replace(os.sep, "/").split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts) or path.startswith("/"):
        raise UserError(f"{path}: give a path inside the repository, relative to its root")
    return os.fsencode("/".join(parts))


def fetch(
    rev: Annotated[str, typer.Argument(metavar="REV", help="Revision to fetch: a branch, tag or commit id.")],
    paths: Annotated[
        Optional[list[str]],
        typer.Option("--path", help="Fetch only this file or folder, relative to the repository root (repeatable)."),
    ] = None,
    checkout_dir: Annotated[
        Optional[Path], typer.Option("--checkout", help="Then write the fetched files into this folder.")
    ] = None,
    peers: Annotated[
        Optional[list[str]],
        typer.Option("--peer", help="Peer address to fetch from (repeatable; known peers are used too)."),
    ] = None,
    listen: Annotated[str, typer.Option(help="IP address to serve fetched chunks on, to the other fetchers.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="TCP port to serve on (0 picks a free one).")] = 0,
    seed: Annotated[
        bool, typer.Option("--seed", help="Keep serving after the fetch, until Ctrl-C or SIGTERM.")
    ] = False,
    upload_limit: Annotated[
        float, typer.Option(help="Cap what this node sends to other fetchers, in MiB/s (0: no cap).", min=0)
    ] = 0.0,
    no_peer_exchange: Annotated[
        bool,
        typer.Option(
            "--no-peer-exchange", help="Fetch only from known peers, not from the other fetchers that peers tell about."
        ),
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log each peer joining, leaving or banned.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Fetch the content of one revision from every peer that holds it, at once.

    Chunks come rarest first from all peers in parallel, each verified before it
    is stored, and are served to other fetchers as soon as they arrive. This is
    the command a GPU node runs at job start, typically in a history-only clone
    (p2pvc clone --no-content). An interrupted fetch resumes where it stopped.
    """
    import trio

    from p2pvc.node import runner
    from p2pvc.ops.worktree_ops import export

    main = _main()
    _setup_logging(verbose)
    repo = main._open()
    for address in peers or []:
        main._peer_id_of(address)
    tree_paths = [_tree_path(p) for p in paths or []]
    started = time.monotonic()
    progress = output.TerminalProgress()

    def done(report) -> None:
        elapsed = time.monotonic() - started
        applied = None
        if checkout_dir is not None:
            applied = export(repo, report.commit, tree_paths, Path(main._user_path(checkout_dir)), progress)
        if as_json:
            value = _fetch_json(report, elapsed)
            value["checkout"] = None if applied is None else {"folder": str(checkout_dir), "files": applied.files_written}
            output.emit_json(value)
            sys.stdout.flush()
        else:
            _print_fetch(report, rev, elapsed)
            if applied is not None:
                typer.echo(f"Checked out {applied.files_written} file(s) into {checkout_dir}")
        if seed:
            for address in listening:
                typer.echo(f"listening on {address}", err=True)
            typer.echo("Seeding until Ctrl-C or SIGTERM", err=True)

    listening: list[str] = []

    def ready(addresses: list[str], _peer_id: str) -> None:
        listening.extend(addresses)

    trio.run(
        lambda: runner.fetch(
            repo,
            rev,
            tree_paths,
            list(peers or []),
            runner.default_listen(listen, port),
            seed=seed,
            peer_exchange=not no_peer_exchange,
            upload_limit=upload_limit * 2**20 or None,
            progress=progress,
            on_done=done,
            on_ready=ready,
        )
    )


def _share(held: int, total: int) -> str:
    """Return an incomplete share as a percentage that never rounds to 0% or 100%."""
    percent = 100 * held // total if total else 0
    if held and percent == 0:
        return "<1%"
    return f"{min(percent, 99)}%"


def _setup_logging(verbose: bool) -> None:
    import logging

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _fetch_json(report, elapsed: float) -> dict:
    swarm = report.swarm
    return {
        "commit": report.commit.hex(),
        "files": report.files,
        "bytes_selected": report.bytes_selected,
        "chunks_fetched": swarm.chunks_fetched,
        "bytes_fetched": swarm.bytes_fetched,
        "raw_bytes_fetched": swarm.raw_bytes,
        "duplicate_chunks": swarm.duplicates,
        "seconds": round(elapsed, 3),
        "history_from": report.history_peer,
        "peers": swarm.by_peer,
        "banned": swarm.banned,
        "dropped": swarm.dropped,
        "unreachable": [{"address": a, "reason": r} for a, r in report.unreachable],
        "refs_applied": report.applied_refs,
    }


def _print_fetch(report, rev: str, elapsed: float) -> None:
    swarm = report.swarm
    if swarm.chunks_fetched == 0:
        typer.echo(
            f"{rev} ({report.commit.hex()[:12]}): all {report.files} file(s), "
            f"{output.human_bytes(report.bytes_selected)}, were already stored here; nothing fetched"
        )
        return
    rate = swarm.raw_bytes / elapsed if elapsed > 0 else 0.0
    typer.echo(
        f"Fetched {rev} ({report.commit.hex()[:12]}): {report.files} file(s), "
        f"{output.human_bytes(report.bytes_selected)}; {output.human_bytes(swarm.raw_bytes)} new in "
        f"{swarm.chunks_fetched} chunk(s) from {len(swarm.by_peer)} peer(s) in {elapsed:.1f} s "
        f"({output.human_bytes(int(rate))}/s)"
    )
    for peer, amount in sorted(swarm.by_peer.items(), key=lambda item: -item[1]):
        typer.echo(f"  {peer}: {output.human_bytes(amount)}")
    for peer in swarm.banned:
        typer.echo(f"  {peer}: banned for sending data that failed verification")
    for peer in swarm.dropped:
        typer.echo(f"  {peer}: left or stalled; its chunks came from others")
    for address, reason in report.unreachable:
        typer.echo(f"  {address}: unreachable: {reason}", err=True)


def whereis(
    target: Annotated[
        str,
        typer.Argument(metavar="TARGET", help="A revision (branch, tag, commit id), or a file or folder path."),
    ],
    rev: Annotated[str, typer.Option("--rev", help="For a path: the revision to look in.")] = "HEAD",
    peers: Annotated[
        Optional[list[str]], typer.Option("--peer", help="Peer address to ask (repeatable; known peers are asked too).")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Show which peers hold a revision's content, or a path's, and how much of it."""
    import trio

    from p2pvc.errors import P2pvcError, UserError
    from p2pvc.node import runner
    from p2pvc.objects import model
    from p2pvc.sync.availability import held_indices
    from p2pvc.worktree.trees import flatten, select_paths

    main = _main()
    repo = main._open()
    for address in peers or []:
        main._peer_id_of(address)
    try:
        commit_id = repo.resolve(target)
        paths: list[bytes] = []
        label = f"{target} ({commit_id.hex()[:12]})"
    except P2pvcError:
        commit_id = repo.resolve(rev)
        paths = [_tree_path(target)]
        label = f"{target} in {rev}"
    flat = select_paths(flatten(repo.read_tree, repo.read_commit(commit_id).commit.tree), paths)
    if paths and not flat:
        raise UserError(f"{target} is neither a revision nor a path in {rev}")
    files = [e for e in flat.values() if e.kind == model.ENTRY_FILE]  # identical files share a manifest
    manifests = {e.target: repo.read_manifest(e.target) for e in files}
    total = sum(e.size for e in files)
    ids = [commit_id] + list(manifests)
    answers, unreachable = trio.run(lambda: runner.whereis(repo, ids, list(peers or [])))

    def held_bytes(held_by_manifest: dict[bytes, int]) -> int:
        return sum(held_by_manifest.get(e.target, 0) for e in files)

    def remote_held(have_by_id: dict) -> dict[bytes, int]:
        held = {}
        for mid, manifest in manifests.items():
            try:
                indices = held_indices(have_by_id.get(mid, False), len(manifest.chunks))
            except ValueError:
                continue  # a malformed bitmap counts as nothing held
            held[mid] = sum(manifest.chunks[i].size for i in indices)
        return held

    stored = repo.store.has_many([c.id for m in manifests.values() for c in m.chunks])
    local = {mid: sum(c.size for c in m.chunks if c.id in stored) for mid, m in manifests.items()}
    rows = [{"peer": "this node", "bytes": held_bytes(local)}]
    for peer, have in answers.items():
        rows.append({"peer": peer, "bytes": held_bytes(remote_held(dict(zip(ids, have))))})
    for row in rows:
        row["complete"] = row["bytes"] == total
    if as_json:
        output.emit_json(
            {
                "target": target,
                "commit": commit_id.hex(),
                "files": len(files),
                "bytes": total,
                "peers": rows,
                "unreachable": [{"address": a, "reason": r} for a, r in unreachable],
            }
        )
        return
    typer.echo(f"{label}: {len(files)} file(s), {output.human_bytes(total)}")
    for row in rows:
        state = "all" if row["complete"] else _share(row["bytes"], total)
        typer.echo(f"  {row['peer']}: {state} ({output.human_bytes(row['bytes'])})")
    for address, reason in unreachable:
        typer.echo(f"  {address}: unreachable: {reason}", err=True)
