"""The `p2pvc` command line.

Commands print results on stdout (JSON with --json) and progress and errors
on stderr. Every expected failure prints one `error:` line and an optional
`hint:` line, and exits with the code of its category. The codes are 0 ok,
1 unexpected, 2 bad usage, 3 user error, 4 conflict, 5 corruption, 6 local
storage, 7 bad signature and 8 peer (docs/cli.md has examples).

Networking code is never imported by commands that do not use the network.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from p2pvc.cli import merge_commands, output, swarm_commands
from p2pvc.errors import P2pvcError, UserError

app = typer.Typer(
    name="p2pvc",
    help="Peer-to-peer version control for ML code, checkpoints and datasets.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
peer_app = typer.Typer(help="List, add or remove the peers this repository syncs with.", no_args_is_help=True)
member_app = typer.Typer(help="List, add or remove the repository's members (who may sign commits).", no_args_is_help=True)

_state: dict[str, object] = {"dir": None}

JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"p2pvc {version('p2pvc')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            typer.echo("p2pvc (not installed, version unknown)")
        raise typer.Exit()


@app.callback()
def _main(
    directory: Annotated[
        Optional[Path], typer.Option("-C", help="Run as if started in this folder.", show_default=False)
    ] = None,
    show_version: Annotated[
        bool,
        typer.Option("--version", help="Print p2pvc's version and exit.", callback=_print_version, is_eager=True),
    ] = False,
) -> None:
    _state["dir"] = directory


def _cwd() -> Path:
    return Path(_state["dir"] or os.getcwd())  # type: ignore[arg-type]


def _user_path(path: str | Path) -> str:
    """Resolve a path given on the command line against the -C folder, like every other path."""
    return os.path.join(_cwd(), path)


def _open():
    from p2pvc.repo import Repository

    return Repository.discover(_cwd())


def _progress():
    return output.TerminalProgress()


def _parse_meta(items: list[str] | None) -> dict[str, str]:
    result: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"invalid --meta {item!r}", hint="write it as KEY=VALUE, e.g. --meta step=12000")
        if key.strip() in result:
            raise UserError(f"--meta {key.strip()} is given twice", hint="give each key once")
        result[key.strip()] = value.strip()
    return result


def _hex(oid: bytes | None) -> str | None:
    return oid.hex() if oid is not None else None


# Setup ----------------------------------------------------------------------------


@app.command()
def init(
    directory: Annotated[
        Optional[Path],
        typer.Argument(metavar="DIR", help="Folder to turn into a repository (default: current)."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Create a repository, and your signing identity if you have none."""
    from p2pvc.repo import Repository

    path = Path(_user_path(directory)).absolute() if directory else _cwd().absolute()
    repo = Repository.init(path)
    if as_json:
        output.emit_json({"path": str(path), "repository": repo.id.hex(), "branch": "main"})
    else:
        typer.echo(f"Initialized p2pvc repository {repo.id.hex()[:12]} in {path / '.p2pvc'}")
        typer.echo(f"Signing as {repo.identity.fingerprint} (p2pvc id shows your full key)")


@app.command("id")
def show_id(as_json: JsonOption = False) -> None:
    """Show your public key, fingerprint, libp2p peer id and address (creates the key on first use)."""
    from p2pvc.identity.keys import KEY_FILE_NAME, home_dir, load_or_create

    from p2pvc.identity.peerid import peer_id
    from p2pvc.node.addresses import primary_ip
    from p2pvc.node.runner import DEFAULT_PORT

    identity = load_or_create()
    key_path = home_dir() / KEY_FILE_NAME
    pid = peer_id(identity.public_key)
    address = f"/ip4/{primary_ip()}/tcp/{DEFAULT_PORT}/p2p/{pid}"
    if as_json:
        output.emit_json(
            {
                "public_key": identity.public_key.hex(),
                "fingerprint": identity.fingerprint,
                "peer_id": pid,
                "address": address,
                "key_file": str(key_path),
            }
        )
    else:
        typer.echo(f"public key:  {identity.public_key.hex()}")
        typer.echo(f"fingerprint: {identity.fingerprint}")
        typer.echo(f"peer id:     {pid}")
        typer.echo(f"address:     {address}  (when p2pvc serve runs with the default port)")
        typer.echo(f"key file:    {key_path}")


# Working tree ---------------------------------------------------------------------------


@app.command()
def status(as_json: JsonOption = False) -> None:
    """Show what changed in the working tree since HEAD."""
    from p2pvc.ops.worktree_ops import status as run_status

    repo = _open()
    result = run_status(repo, _progress())
    if as_json:
        output.emit_json(
            {
                "ref": result.ref,
                "head": _hex(result.head),
                "base": _hex(result.base),
                "changes": [_change_json(c) for c in result.changes],
                "skipped": [{"path": output.path_text(p), "reason": r} for p, r in result.skipped],
                "conflicted_refs": result.conflicted_refs,
            }
        )
        return
    where = result.ref.removeprefix("refs/heads/") if result.ref else "detached HEAD"
    typer.echo(f"On {where}" + (f" at {result.head.hex()[:12]}" if result.head else " (no commits yet)"))
    if result.head is not None and result.base is None and repo.history_only:
        typer.echo(
            "This is a history-only clone, and no files are checked out here: p2pvc sync --content fetches "
            "the content, and p2pvc fetch REV --checkout DIR fetches one revision into a folder."
        )
    elif result.head is not None and result.base != result.head:
        typer.echo(
            f"The working tree is based on {result.base.hex()[:12] if result.base else 'nothing'}: a peer moved "
            f"{where}. Changes below are relative to that base; p2pvc checkout {where} brings in the new commits."
        )
    for name in result.conflicted_refs:
        typer.echo(f"CONFLICT: {name} has divergent heads (p2pvc conflicts)")
    if not result.changes:
        typer.echo("Nothing changed.")
    for change in result.changes:
        typer.echo(f"  {change.status:<9} {output.path_text(change.path)}")
    for path, reason in result.skipped:
        typer.echo(f"  skipped   {output.path_text(path)}: {reason}", err=True)


def _change_json(change) -> dict:
    def side(entry):
        if entry is None:
            return None
        from p2pvc.objects.model import ENTRY_KIND_NAMES, ENTRY_SYMLINK

        kind, executable, target, size = entry
        value = {"kind": ENTRY_KIND_NAMES[kind], "size": size, "executable": executable}
        if kind == ENTRY_SYMLINK:
            value["link_target"] = output.path_text(target)
        elif target:
            value["id"] = target.hex()
        return value

    return {"path": output.path_text(change.path), "status": change.status, "old": side(change.old), "new": side(change.new)}


@app.command()
def add(
    paths: Annotated[list[str], typer.Argument(metavar="PATH...", help="Files or folders to store now.")],
) -> None:
    """Store the content of paths now, so the next commit only has to record them."""
    from p2pvc.ops.worktree_ops import add as run_add

    repo = _open()
    result = run_add(repo, [_user_path(p) for p in paths], _progress())
    typer.echo(f"Stored {result.files} file(s): read {result.files_read}, {output.human_bytes(result.new_bytes)} new")


@app.command()
def commit(
    message: Annotated[str, typer.Option("-m", "--message", help="Commit message.")],
    meta: Annotated[
        Optional[list[str]], typer.Option("--meta", help="Metadata KEY=VALUE, repeatable (e.g. step=12000).")
    ] = None,
    allow_empty: Annotated[bool, typer.Option(help="Commit even if nothing changed.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Record a signed snapshot of the whole working tree (minus .p2pvcignore rules)."""
    from p2pvc.ops.worktree_ops import commit as run_commit

    repo = _open()
    result = run_commit(repo, message, _parse_meta(meta), allow_empty=allow_empty, progress=_progress())
    if as_json:
        output.emit_json(
            {
                "id": result.id.hex(),
                "ref": result.ref,
                "parents": [p.hex() for p in result.parents],
                "files": result.files,
                "logical_bytes": result.logical_bytes,
                "new_bytes": result.new_bytes,
                "files_read": result.files_read,
                "changes": [_change_json(c) for c in result.changes],
            }
        )
        return
    where = result.ref.removeprefix("refs/heads/") if result.ref else "detached HEAD"
    typer.echo(
        f"[{where} {result.id.hex()[:12]}] {message.splitlines()[0] if message else ''}\n"
        f" {len(result.changes)} change(s), {result.files} file(s), {output.human_bytes(result.logical_bytes)}; "
        f"{output.human_bytes(result.new_bytes)} new after dedupe"
    )


@app.command()
def checkout(
    rev: Annotated[str, typer.Argument(metavar="REV", help="Branch, tag or commit id.")],
    force: Annotated[bool, typer.Option("--force", "-f", help="Discard uncommitted changes in the way.")] = False,
) -> None:
    """Make the working tree match a revision (rollback to any version). Alias: switch."""
    from p2pvc.ops.worktree_ops import checkout as run_checkout

    repo = _open()
    result = run_checkout(repo, rev, force=force, progress=_progress())
    if result.ref:
        where = f"branch {result.ref.removeprefix('refs/heads/')}"
    elif result.commit.hex().startswith(rev.lower()):
        where = "detached HEAD"  # the id follows in parentheses
    else:
        where = f"detached HEAD at {rev}"
    applied = result.applied
    typer.echo(
        f"Switched to {where} ({result.commit.hex()[:12]}): wrote {applied.files_written} file(s), "
        f"{output.human_bytes(applied.bytes_written)}, removed {applied.removed}"
    )
    for folder in applied.kept_folders:
        typer.echo(f"kept folder {output.path_text(folder)}: it contains untracked files", err=True)
    if result.left_behind is not None:
        short = result.left_behind.hex()[:12]
        typer.echo(
            f"warning: no branch or tag reaches commit {short}, which HEAD named before, so gc would remove it\n"
            f"hint: to keep it, run: p2pvc branch NAME {short}",
            err=True,
        )


app.command("switch", help="Same as checkout.")(checkout)


@app.command()
def restore(
    paths: Annotated[list[str], typer.Argument(metavar="PATH...", help="Files or folders to restore.")],
    source: Annotated[str, typer.Option("--source", "-s", help="Revision to take them from.")] = "HEAD",
) -> None:
    """Overwrite paths in the working tree with their version from a revision."""
    from p2pvc.ops.worktree_ops import restore as run_restore

    repo = _open()
    applied = run_restore(repo, [_user_path(p) for p in paths], source, _progress())
    typer.echo(f"Restored {applied.files_written} file(s), {output.human_bytes(applied.bytes_written)} from {source}")


# History --------------------------------------------------------------------------------


def _commit_json(info, refs: list[str] | None = None) -> dict:
    from p2pvc.identity.keys import fingerprint

    c = info.commit
    return {
        "id": info.id.hex(),
        "tree": c.tree.hex(),
        "parents": [p.hex() for p in c.parents],
        "author": c.author.hex(),
        "author_fingerprint": fingerprint(c.author),
        "time_ms": c.time_ms,
        "message": c.message,
        "metadata": dict(c.metadata),
        "signature_valid": info.signature_ok,
        "refs": refs or [],
    }


def _format_time(ms: int) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _print_commit(info, refs: list[str]) -> None:
    from p2pvc.identity.keys import fingerprint

    c = info.commit
    names = ", ".join(r.removeprefix("refs/heads/").removeprefix("refs/tags/") for r in refs)
    mark = "" if info.signature_ok else "  [BAD SIGNATURE]"
    typer.echo(f"commit {info.id.hex()}" + (f" ({names})" if names else "") + mark)
    typer.echo(f"Author: {fingerprint(c.author)}")
    typer.echo(f"Date:   {_format_time(c.time_ms)}")
    if c.metadata:
        typer.echo("Meta:   " + " ".join(f"{k}={v}" for k, v in c.metadata))
    typer.echo("")
    for line in c.message.splitlines() or [""]:
        typer.echo(f"    {line}")
    typer.echo("")


@app.command()
def log(
    revs: Annotated[
        Optional[list[str]],
        typer.Argument(metavar="REV...", help="Revisions to start from (default HEAD)."),
    ] = None,
    limit: Annotated[Optional[int], typer.Option("-n", "--max-count", help="Show at most this many commits.")] = None,
    meta: Annotated[
        Optional[list[str]], typer.Option("--meta", help="Only commits with this metadata KEY=VALUE, repeatable.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Show commit history, newest first; commits whose signature fails are marked."""
    from p2pvc.ops.history import log as run_log
    from p2pvc.ops.history import ref_names_by_commit

    repo = _open()
    infos = run_log(repo, revs, limit=limit, meta_filters=_parse_meta(meta))
    names = ref_names_by_commit(repo)
    if as_json:
        output.emit_json([_commit_json(i, names.get(i.id)) for i in infos])
        return
    merge_commands.echo_conflict_notices(repo)
    for info in infos:
        _print_commit(info, names.get(info.id, []))


@app.command()
def show(
    rev: Annotated[str, typer.Argument(metavar="REV", help="Revision to show.")] = "HEAD",
    as_json: JsonOption = False,
) -> None:
    """Show one commit: message, metadata, signature state and changed files."""
    from p2pvc.ops.history import diff as run_diff
    from p2pvc.ops.history import ref_names_by_commit

    repo = _open()
    with repo.lock():
        oid = repo.resolve(rev)
        info = repo.read_commit(oid)
        names = ref_names_by_commit(repo).get(oid, [])
    parent = info.commit.parents[0].hex() if info.commit.parents else None
    changes = run_diff(repo, parent, oid.hex())  # a root commit is compared with the empty tree
    if as_json:
        value = _commit_json(info, names)
        value["changes"] = [dict(_change_json(e.change), new_bytes=e.new_bytes) for e in changes.entries] if changes else []
        output.emit_json(value)
        return
    _print_commit(info, names)
    if changes:
        _print_diff(changes)


def _print_diff(result) -> None:
    for entry in result.entries:
        c = entry.change
        old_size = output.human_bytes(c.old[3]) if c.old else "-"
        new_size = output.human_bytes(c.new[3]) if c.new else "-"
        typer.echo(
            f"  {c.status:<9} {output.path_text(c.path)}  {old_size} -> {new_size}"
            + (f", {output.human_bytes(entry.new_bytes)} new" if c.new else "")
        )
    typer.echo(f"{len(result.entries)} path(s) changed, {output.human_bytes(result.new_bytes)} new after dedupe")


@app.command()
def diff(
    old: Annotated[Optional[str], typer.Argument(metavar="OLD", help="Old revision (default HEAD).")] = None,
    new: Annotated[
        Optional[str],
        typer.Argument(metavar="NEW", help="New revision (default: the working tree)."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """List files added, removed and modified between two revisions, or a revision and the working tree."""
    from p2pvc.ops.history import diff as run_diff

    repo = _open()
    result = run_diff(repo, old, new, _progress())
    if as_json:
        output.emit_json(
            {
                "old": result.old_label,
                "new": result.new_label,
                "new_bytes": result.new_bytes,
                "changes": [dict(_change_json(e.change), new_bytes=e.new_bytes) for e in result.entries],
            }
        )
        return
    typer.echo(f"{result.old_label} -> {result.new_label}")
    _print_diff(result)


@app.command()
def branch(
    name: Annotated[
        Optional[str],
        typer.Argument(metavar="NAME", help="Branch to create (lists branches when omitted)."),
    ] = None,
    rev: Annotated[str, typer.Argument(metavar="REV", help="Where the new branch starts.")] = "HEAD",
    delete: Annotated[bool, typer.Option("--delete", "-d", help="Delete the named branch.")] = False,
    force: Annotated[
        bool, typer.Option("--force", "-f", help="Delete even if no other ref reaches the branch's commits.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """List branches, create one at a revision, or delete one."""
    from p2pvc.ops.history import create_branch, delete_branch

    repo = _open()
    if name is None:
        _list_refs(repo, "refs/heads/", as_json)
    elif delete:
        target = delete_branch(repo, name, force=force)
        typer.echo(f"Deleted branch {name} (was {target.hex()[:12] if target else 'empty'})")
    else:
        target = create_branch(repo, name, rev)
        typer.echo(f"Created branch {name} at {target.hex()[:12]}")


@app.command()
def tag(
    name: Annotated[
        Optional[str],
        typer.Argument(metavar="NAME", help="Tag to create, e.g. v1.2.3 (lists tags when omitted)."),
    ] = None,
    rev: Annotated[str, typer.Argument(metavar="REV", help="Commit to tag.")] = "HEAD",
    as_json: JsonOption = False,
) -> None:
    """List tags or create one; a tag never moves once created."""
    from p2pvc.ops.history import create_tag

    repo = _open()
    if name is None:
        _list_refs(repo, "refs/tags/", as_json)
        return
    target = create_tag(repo, name, rev)
    typer.echo(f"Tagged {target.hex()[:12]} as {name}")


def _list_refs(repo, prefix: str, as_json: bool) -> None:
    head_ref, _ = repo.head()
    states = repo.ref_states(prefix)
    if as_json:
        output.emit_json(
            [
                {
                    "name": s.name.removeprefix(prefix),
                    "ref": s.name,
                    "target": _hex(s.target),
                    "current": s.name == head_ref,
                    "conflicted": s.conflicted,
                    "heads": [_hex(h.target) for h in s.heads],
                }
                for s in states
            ]
        )
        return
    for s in states:
        mark = "*" if s.name == head_ref else " "
        flag = "  CONFLICT" if s.conflicted else ""
        typer.echo(f"{mark} {s.name.removeprefix(prefix):<30} {s.target.hex()[:12] if s.target else '-'}{flag}")


@member_app.command("list")
def member_list(as_json: JsonOption = False) -> None:
    """List the members: the keys whose commits and ref updates are accepted."""
    from p2pvc.ops.members import list_members

    members = list_members(_open())
    if as_json:
        output.emit_json(
            [{"key": m.key.hex(), "fingerprint": m.fingerprint, "creator": m.creator, "you": m.you} for m in members]
        )
        return
    for m in members:
        notes = ", ".join(n for n, on in (("creator", m.creator), ("you", m.you)) if on)
        typer.echo(f"{m.fingerprint}  {m.key.hex()}" + (f"  ({notes})" if notes else ""))


@member_app.command("add")
def member_add(
    key: Annotated[
        str, typer.Argument(metavar="KEY", help="The new member's public key (64 hex digits, from p2pvc id).")
    ],
) -> None:
    """Add a member; the signed record reaches other peers at the next sync."""
    from p2pvc.ops.members import add_member

    info = add_member(_open(), key)
    typer.echo(f"Added member {info.fingerprint}")


@member_app.command("remove")
def member_remove(
    key: Annotated[str, typer.Argument(metavar="KEY", help="The member's public key (64 hex digits).")],
) -> None:
    """Remove a member; their earlier commits stay valid, new updates are rejected."""
    from p2pvc.ops.members import remove_member

    info = remove_member(_open(), key)
    typer.echo(f"Removed member {info.fingerprint}")


app.add_typer(member_app, name="member")


# Network ------------------------------------------------------------------------------


def _setup_logging(verbose: bool) -> None:
    import logging

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@app.command()
def serve(
    listen: Annotated[str, typer.Option(help="IP address to listen on.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="TCP port to listen on (0 picks a free one).")] = 4730,
    repo_paths: Annotated[
        Optional[list[Path]], typer.Option("--repo", help="Serve this repository (repeatable; default: the current one).")
    ] = None,
    anti_entropy: Annotated[float, typer.Option(help="Seconds between full exchanges with known peers.")] = 30.0,
    mdns: Annotated[bool, typer.Option("--mdns", help="Find and sync with peers on the local network by mDNS.")] = False,
    seed: Annotated[
        bool, typer.Option("--seed", help="Only serve what is stored: never pull, periodically or on announcements.")
    ] = False,
    upload_limit: Annotated[
        float, typer.Option(help="Cap what this node sends to peers, in MiB/s (0: no cap).", min=0)
    ] = 0.0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every request.")] = False,
) -> None:
    """Serve repositories to peers in the foreground until Ctrl-C or SIGTERM."""
    import trio

    from p2pvc.node import runner
    from p2pvc.repo import Repository

    _setup_logging(verbose)
    repos = [Repository.discover(Path(_user_path(p))) for p in repo_paths] if repo_paths else [_open()]

    def ready(addresses: list[str], peer_id: str) -> None:
        for address in addresses:
            typer.echo(f"listening on {address}", err=True)

    trio.run(
        lambda: runner.serve(
            repos, runner.default_listen(listen, port), anti_entropy_s=anti_entropy, mdns=mdns, seed=seed,
            upload_limit=upload_limit * 2**20 or None, on_ready=ready
        )
    )


@app.command()
def sync(
    peers: Annotated[
        Optional[list[str]],
        typer.Argument(metavar="PEER...", help="Peer addresses (default: every known peer)."),
    ] = None,
    content: Annotated[
        bool, typer.Option("--content", help="In a history-only clone: from now on fetch file content too.")
    ] = False,
    checkout: Annotated[
        bool,
        typer.Option(help="Update the working tree when the checked-out branch moved (never over uncommitted work)."),
    ] = True,
    as_json: JsonOption = False,
) -> None:
    """Exchange refs and content with peers in both directions."""
    import trio

    from p2pvc.errors import PeerError
    from p2pvc.node import runner

    repo = _open()
    for address in peers or []:
        _peer_id_of(address)  # a malformed address is a usage mistake, not an unreachable peer
    if content and repo.history_only:
        repo.set_history_only(False)
    head_ref, head_before = repo.head()
    result = trio.run(lambda: runner.sync(repo, list(peers or []), progress=output.TerminalProgress()))
    updated = _update_worktree(repo, head_ref, head_before) if checkout else None
    if as_json:
        value = _sync_json(result)
        value["worktree"] = updated
        output.emit_json(value)
    else:
        _print_sync(result)
        if updated:
            typer.echo(updated)
    failed = [r for r in result.reports if r.error]
    if result.unreachable or failed:
        names = [a for a, _ in result.unreachable] + [r.peer for r in failed]
        synced = len(result.reports) - len(failed)
        if synced:
            hint = f"the other {synced} peer(s) were synced"
        elif as_json:
            hint = "the JSON output gives the reason for each peer"
        else:
            hint = "the line of each peer above gives the reason"
        raise PeerError(f"could not sync with {len(names)} peer(s): {', '.join(names)}", hint=hint)


def _update_worktree(repo, head_ref: str | None, head_before: bytes | None) -> str | None:
    """Check out the branch HEAD follows if a sync moved it; return a line saying what happened."""
    from p2pvc.errors import ConflictError
    from p2pvc.ops.worktree_ops import checkout as run_checkout

    if head_ref is None or repo.history_only:
        return None
    _, head_after = repo.head()
    if head_after is None or head_after == head_before:
        return None
    short = head_ref.removeprefix("refs/heads/")
    try:
        run_checkout(repo, short, progress=output.TerminalProgress())
    except ConflictError:
        return f"{short} moved to {head_after.hex()[:12]}; the working tree has uncommitted changes, so it was left as it is (p2pvc checkout {short} updates it)"
    return f"Updated the working tree to {short} at {head_after.hex()[:12]}"


def _sync_json(result) -> dict:
    return {
        "peers": [
            {
                "peer": r.peer,
                "error": r.error,
                "pushed_records": r.pushed_records,
                "pulled": None
                if r.pulled is None
                else {
                    "updates_applied": r.pulled.updates_applied,
                    "members_applied": r.pulled.members_applied,
                    "objects_fetched": r.pulled.objects_fetched,
                    "chunks_fetched": r.pulled.chunks_fetched,
                    "bytes_fetched": r.pulled.bytes_fetched,
                    "rejected": r.pulled.updates_rejected,
                    "incomplete": r.pulled.incomplete,
                    "changes": [
                        {"ref": c.name, "old": _hex(c.old), "new": _hex(c.new), "conflicted": c.conflicted}
                        for c in r.pulled.changes
                    ],
                },
            }
            for r in result.reports
        ],
        "unreachable": [{"address": a, "reason": why} for a, why in result.unreachable],
    }


def _print_sync(result) -> None:
    for r in result.reports:
        if r.error:
            typer.echo(f"{r.peer}: failed: {r.error}")
            continue
        pulled = r.pulled
        members = f"; {pulled.members_applied} membership record(s) applied" if pulled.members_applied else ""
        typer.echo(
            f"{r.peer}: fetched {pulled.objects_fetched} object(s), {pulled.chunks_fetched} chunk(s), "
            f"{output.human_bytes(pulled.bytes_fetched)}{members}; pushed {r.pushed_records} record(s)"
        )
        for c in pulled.changes:
            old = c.old.hex()[:12] if c.old else "(new)"
            new = c.new.hex()[:12] if c.new else "(deleted)"
            if c.old == c.new and c.conflicted:
                typer.echo(f"  {c.name}: CONFLICT, divergent heads; see p2pvc conflicts, then p2pvc merge")
            else:
                typer.echo(f"  {c.name}: {old} -> {new}" + ("  CONFLICT (see p2pvc conflicts)" if c.conflicted else ""))
        for reason in pulled.updates_rejected:
            typer.echo(f"  rejected: {reason}")
        for name in pulled.incomplete:
            typer.echo(f"  {name}: not updated, the peer lacks part of its content")
    for address, reason in result.unreachable:
        typer.echo(f"{address}: unreachable: {reason}", err=True)


@app.command()
def clone(
    address: Annotated[
        str,
        typer.Argument(metavar="ADDRESS", help="Address of a serving peer, /ip4/HOST/tcp/PORT/p2p/PEER_ID."),
    ],
    directory: Annotated[
        Optional[Path],
        typer.Argument(metavar="DIR", help="Folder to create (default: ./p2pvc-ID, with the repository's short id)."),
    ] = None,
    repo_id: Annotated[Optional[str], typer.Option("--repo", help="Repository id or a prefix of it, if the peer serves several.")] = None,
    no_content: Annotated[
        bool, typer.Option("--no-content", help="Fetch history only; fetch file content later with p2pvc sync --content.")
    ] = False,
) -> None:
    """Copy a repository from a peer: its id, members, refs and the content of every ref."""
    import trio

    from p2pvc.node import runner
    from p2pvc.ops.worktree_ops import checkout as run_checkout

    target = Path(_user_path(directory)).absolute() if directory else None
    if target is not None and target.exists() and any(target.iterdir()):
        raise UserError(f"{target} exists and is not empty", hint=runner.clone_target_hint(target, "pass a new folder"))
    repo, report = trio.run(
        lambda: runner.clone(
            address, target, repo_hex=repo_id, history_only=no_content, progress=output.TerminalProgress()
        )
    )
    state = repo.ref_state("refs/heads/main")
    if state is not None and state.target is not None and not no_content:
        run_checkout(repo, "main", force=True)
    typer.echo(f"Cloned repository {repo.id.hex()[:12]} into {repo.worktree}")
    if report.pulled:
        typer.echo(f"  {repo.live_ref_count()} ref(s), {output.human_bytes(report.pulled.bytes_fetched)} fetched")
    if repo.identity.public_key not in repo.refs.members().current:
        typer.echo(
            "  You are not a member yet: send the key from `p2pvc id` to a member, who runs "
            "`p2pvc member add KEY`; your next sync brings the record."
        )


@peer_app.command("add")
def peer_add(address: Annotated[str, typer.Argument(metavar="ADDRESS", help="/ip4/HOST/tcp/PORT/p2p/PEER_ID")]) -> None:
    """Remember a peer to sync with."""
    from p2pvc.sync.state import SyncState

    peer_id = _peer_id_of(address)
    new = SyncState(_open().db).add_peer(peer_id, address)
    typer.echo(("Added" if new else "Updated") + f" peer {peer_id}")


@peer_app.command("list")
def peer_list(as_json: JsonOption = False) -> None:
    """List known peers with when they were last reached."""
    from p2pvc.sync.state import SyncState

    peers = SyncState(_open().db).peers()
    if as_json:
        output.emit_json([p.__dict__ for p in peers])
        return
    for p in peers:
        seen = _format_time(p.last_seen_ms) if p.last_seen_ms else "never"
        line = f"{p.peer_id}  {p.address}  last seen: {seen}"
        if p.refs is not None:
            line += f", {p.refs} ref(s)"
        if p.last_error:
            line += f"  (last error: {p.last_error})"
        typer.echo(line)


@peer_app.command("remove")
def peer_remove(peer: Annotated[str, typer.Argument(metavar="PEER", help="Peer id or address.")]) -> None:
    """Forget a peer."""
    from p2pvc.sync.state import SyncState

    peer_id = _peer_id_of(peer) if peer.startswith("/") else peer.strip()
    if not SyncState(_open().db).remove_peer(peer_id):
        raise UserError(f"no known peer {peer_id}", hint="p2pvc peer list shows the known peers")
    typer.echo(f"Removed peer {peer_id}")


def _peer_id_of(address: str) -> str:
    """Return the peer id of a full peer address, checking the whole multiaddr and the id."""
    from p2pvc.net.host import parse_peer_address

    try:
        return parse_peer_address(address).peer_id.to_base58()
    except UserError:
        raise
    except Exception as exc:  # multiaddr and base58 raise several unrelated classes
        raise UserError(
            f"invalid peer address {address!r}: {exc}",
            hint="an address looks like /ip4/192.0.2.7/tcp/4730/p2p/12D3KooW...",
        ) from exc


app.add_typer(peer_app, name="peer")


# Maintenance -----------------------------------------------------------------------------


PROBLEMS_SHOWN = 50  # problems listed as text (a damaged pack can give thousands); --json lists all
AFFECTED_SHOWN = 20  # files listed as text; --json lists all
PROBLEM_ORDER = {"commit": 1, "tree": 2, "manifest": 3, "chunk": 4}  # others (signatures, records) come first


@app.command()
def fsck(
    repair: Annotated[
        bool,
        typer.Option(
            "--repair",
            help="Drop corrupt records from the index, so fetch, sync or add can store good copies again.",
        ),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Rehash every stored object and verify every signature; name anything corrupt."""
    from p2pvc.ops.fsck import fsck as run_fsck

    repo = _open()
    report = run_fsck(repo, _progress(), repair=repair)
    if as_json:
        output.emit_json(
            {
                "ok": report.ok,
                "objects_checked": report.objects_checked,
                "bytes_checked": report.bytes_checked,
                "commits": report.commits,
                "ref_updates": report.ref_updates,
                "problems": [p.__dict__ for p in report.problems],
                "affected_files": [a.__dict__ for a in report.affected],
                "forgotten": report.forgotten,
            }
        )
    else:
        # History objects first: one damaged commit matters more than many damaged chunks.
        ordered = sorted(report.problems, key=lambda p: PROBLEM_ORDER.get(p.object_kind or "", 0))
        for p in ordered[:PROBLEMS_SHOWN]:
            typer.echo(f"{p.kind} {p.object}: {p.message}")
            if p.expected is not None or p.actual is not None:
                typer.echo(f"  expected {p.expected}\n  actual   {p.actual}")
        if len(report.problems) > PROBLEMS_SHOWN:
            typer.echo(f"... and {len(report.problems) - PROBLEMS_SHOWN} more problem(s) (fsck --json lists them all)")
        _echo_affected(report.affected)
        typer.echo(
            f"checked {report.objects_checked} object(s), {output.human_bytes(report.bytes_checked)}, "
            f"{report.commits} commit(s), {report.ref_updates} ref update(s): "
            + ("no problems" if report.ok else f"{len(report.problems)} problem(s)")
        )
        damaged = [p for p in report.problems if p.kind in ("corrupt", "missing")]
        if report.repaired:
            typer.echo(f"repair: dropped {report.forgotten} corrupt record(s) from the index")
        if any(p.kind == "corrupt" for p in damaged) and not report.repaired:
            typer.echo("hint: run `p2pvc fsck --repair` so that sync, fetch or add can replace the corrupt records")
        elif damaged:
            where = "run `p2pvc sync` or `p2pvc fetch REV` with a peer that has them"
            if all(p.object_kind == "chunk" for p in damaged):
                where += ", or `p2pvc add PATH` for a file whose copy in the working tree is intact"
            else:
                where += " (only a peer or a bundle can give back history: commits, trees and manifests)"
            typer.echo(f"hint: to store good copies of what is damaged or missing, {where}")
    if not report.ok:
        raise typer.Exit(5)


def _echo_affected(affected) -> None:
    if not affected:
        return
    typer.echo(f"{len(affected)} file version(s) need a damaged or missing object and cannot be checked out:")
    for file in affected[:AFFECTED_SHOWN]:
        older = f" and {len(file.commits) - 1} older commit(s)" if len(file.commits) > 1 else ""
        if file.refs:
            where = f"; current in {', '.join(file.refs)}"
        else:
            where = f"; in the history of {', '.join(file.history_refs)}"
        typer.echo(f"  {file.path} in {file.commits[0][:12]}{older}{where}")
    if len(affected) > AFFECTED_SHOWN:
        typer.echo(f"  ... and {len(affected) - AFFECTED_SHOWN} more (fsck --json lists them all)")


@app.command()
def gc(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only report what would be removed.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Remove stored data that no ref reaches."""
    from p2pvc.ops.maintenance import gc as run_gc

    repo = _open()
    report = run_gc(repo, dry_run=dry_run, progress=_progress())
    if as_json:
        output.emit_json(report.__dict__)
        return
    remove, rewrite = ("would remove", "would rewrite") if dry_run else ("removed", "rewrote")
    typer.echo(
        f"{report.reachable} reachable object(s); {remove} {report.removed_objects} object(s), "
        f"{output.human_bytes(report.freed_bytes)}; {rewrite} {report.packs_rewritten} pack(s); "
        f"{remove} {report.orphan_packs_removed} orphan pack(s)"
    )


@app.command()
def stats(as_json: JsonOption = False) -> None:
    """Show storage figures: logical size, stored size, dedupe and compression ratios."""
    from p2pvc.ops.maintenance import storage_summary

    repo = _open()
    s = storage_summary(repo)
    if as_json:
        value = dict(s.__dict__)
        value["dedupe_ratio"] = s.dedupe_ratio
        value["compression_ratio"] = s.compression_ratio
        output.emit_json(value)
        return
    typer.echo(f"commits:             {s.commits}")
    typer.echo(f"HEAD files:          {output.human_bytes(s.head_logical_bytes)}")
    typer.echo(f"all versions:        {output.human_bytes(s.history_logical_bytes)} (every commit counted in full)")
    typer.echo(f"unique chunks:       {output.human_bytes(s.unique_chunk_bytes)} in {s.chunks} chunk(s)")
    typer.echo(f"stored:              {output.human_bytes(s.pack_bytes)} in packs")
    typer.echo(f"dedupe ratio:        {s.dedupe_ratio:.2f}x")
    typer.echo(f"compression ratio:   {s.compression_ratio:.2f}x")


merge_commands.register(app)
swarm_commands.register(app)


def run() -> None:
    """Console-script entry point: map expected errors to one line and an exit code."""
    try:
        app()
    except P2pvcError as exc:
        output.print_error(exc)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except SystemExit as exc:
        # typer turns Ctrl-C into a silent exit 130, so print the reason here.
        if exc.code == 130 and isinstance(getattr(exc.__context__, "__cause__", None), KeyboardInterrupt):
            sys.stderr.write("interrupted\n")
        raise
    except BrokenPipeError:
        sys.exit(1)


if __name__ == "__main__":
    run()
