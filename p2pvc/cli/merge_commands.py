"""Commands for divergent refs and offline exchange: conflicts, resolve, merge and bundle.

`register(app)` adds them to the `p2pvc` command line. Like the rest of the
CLI, results go to stdout (JSON with --json), and expected failures raise
P2pvcError subclasses that `p2pvc.cli.main.run` turns into one `error:`
line and an exit code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from p2pvc.cli import output

JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]

bundle_app = typer.Typer(
    help="Exchange history through a file, for sites with no network between them.", no_args_is_help=True
)


def register(app: typer.Typer) -> None:
    """Add conflicts, resolve, merge and bundle to `app`. Calling it twice adds them once."""
    if any(info.name == "merge" for info in app.registered_commands):
        return
    app.command("conflicts")(conflicts)
    app.command("resolve")(resolve)
    app.command("merge")(merge)
    app.add_typer(bundle_app, name="bundle")


def _open():
    from p2pvc.cli.main import _open as open_repository  # main is loaded by the time a command runs

    return open_repository()


def _cwd() -> Path:
    from p2pvc.cli.main import _cwd as current_folder

    return current_folder()


def _hex(oid: bytes | None) -> str | None:
    return oid.hex() if oid is not None else None


def _short(oid: bytes | None) -> str:
    return oid.hex()[:12] if oid is not None else "(deleted)"


def _time(ms: int) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def echo_conflict_notices(repo) -> None:
    """Print one line on stderr per conflicted ref, for commands such as log that show one side only."""
    for state in repo.ref_states():
        if state.conflicted:
            typer.echo(f"CONFLICT: {state.name} has divergent heads (p2pvc conflicts)", err=True)


# conflicts --------------------------------------------------------------------------------


def conflicts(as_json: JsonOption = False) -> None:
    """List refs with divergent heads: who wrote each head, when, and how their trees differ."""
    from p2pvc.ops.conflicts import list_conflicts, pending_merge

    repo = _open()
    found = list_conflicts(repo)
    pending = pending_merge(repo)
    if as_json:
        output.emit_json(
            {
                "conflicts": [_conflict_json(c) for c in found],
                "merge_in_progress": None
                if pending is None
                else {
                    "ours": pending.ours.hex(),
                    "theirs": pending.theirs.hex(),
                    "label": pending.label,
                    "conflicts": [output.path_text(p) for p in pending.conflicts],
                },
            }
        )
        return
    if pending is not None:
        typer.echo(
            f"A merge of {pending.label} is in progress. {len(pending.conflicts)} file(s) had conflicts: "
            + ", ".join(output.path_text(p) for p in pending.conflicts)
        )
        typer.echo("  edit them, then run p2pvc commit -m MSG or p2pvc merge --continue (p2pvc merge --abort drops it)\n")
    if not found:
        typer.echo("No conflicted refs.")
    for conflict in found:
        _print_conflict(conflict)


def _head_json(head) -> dict:
    from p2pvc.identity.keys import fingerprint

    update = head.update
    commit = head.commit
    return {
        "update": update.id.hex(),
        "target": _hex(update.target),
        "winner": head.winner,
        "updated_by": fingerprint(update.author),
        "updated_by_key": update.author.hex(),
        "updated_ms": update.clock.wall_ms,
        "clock": str(update.clock),
        "commit": None
        if commit is None
        else {
            "author": commit.author.hex(),
            "author_fingerprint": fingerprint(commit.author),
            "time_ms": commit.time_ms,
            "message": commit.message,
            "parents": [p.hex() for p in commit.parents],
        },
    }


def _difference_json(difference) -> dict:
    from p2pvc.worktree.changes import ADDED, MODIFIED, REMOVED

    return {
        "from": _hex(difference.old),
        "to": _hex(difference.new),
        "complete": difference.complete,
        "added": sum(1 for c in difference.changes if c.status == ADDED),
        "removed": sum(1 for c in difference.changes if c.status == REMOVED),
        "modified": sum(1 for c in difference.changes if c.status == MODIFIED),
        "changes": [
            {
                "path": output.path_text(c.path),
                "status": c.status,
                "old_size": c.old[3] if c.old else None,
                "new_size": c.new[3] if c.new else None,
            }
            for c in difference.changes
        ],
    }


def _conflict_json(conflict) -> dict:
    return {
        "ref": conflict.name,
        "merge_base": _hex(conflict.merge_base),
        "heads": [_head_json(h) for h in conflict.heads],
        "differences": [_difference_json(d) for d in conflict.differences],
    }


def _print_conflict(conflict) -> None:
    from p2pvc.identity.keys import fingerprint

    typer.echo(f"{conflict.name}: {len({h.update.target for h in conflict.heads})} divergent heads")
    for head in conflict.heads:
        mark = "*" if head.winner else " "
        update = head.update
        line = f"  {mark} {_short(update.target)}  set by {fingerprint(update.author)} at {_time(update.clock.wall_ms)}"
        typer.echo(line + ("  (current value)" if head.winner else ""))
        if head.commit is not None:
            first_line = head.commit.message.splitlines()[0] if head.commit.message else ""
            typer.echo(f"      commit by {fingerprint(head.commit.author)} at {_time(head.commit.time_ms)}: {first_line}")
    typer.echo(f"  merge base: {_short(conflict.merge_base) if conflict.merge_base else 'none (unrelated histories)'}")
    for difference in conflict.differences:
        if not difference.complete:
            typer.echo(f"  {_short(difference.new)}: trees not all stored yet, cannot compare")
            continue
        typer.echo(f"  {_short(difference.new)} against {_short(difference.old)}: {len(difference.changes)} path(s) differ")
        for change in difference.changes:
            old = output.human_bytes(change.old[3]) if change.old else "-"
            new = output.human_bytes(change.new[3]) if change.new else "-"
            typer.echo(f"    {change.status:<9} {output.path_text(change.path)}  {old} -> {new}")
    others = [h.update.target for h in conflict.heads if not h.winner and h.update.target is not None]
    short_name = conflict.name.removeprefix("refs/heads/").removeprefix("refs/tags/")
    if conflict.name.startswith("refs/heads/") and others:
        typer.echo(f"  resolve: p2pvc merge {others[0].hex()[:12]} (on {short_name}), or p2pvc resolve {short_name} --take COMMIT")
    else:
        typer.echo(f"  resolve: p2pvc resolve {short_name} --take COMMIT")
    typer.echo("")


# resolve --------------------------------------------------------------------------------


def resolve(
    ref: Annotated[str, typer.Argument(metavar="REF", help="The conflicted branch or tag (short or full name).")],
    take: Annotated[str, typer.Option("--take", help="The commit to keep: one of the heads, or a descendant of one.")],
    as_json: JsonOption = False,
) -> None:
    """Resolve a conflicted ref by taking one commit. The update supersedes every current head."""
    from p2pvc.ops.conflicts import resolve_ref

    repo = _open()
    head_ref, _ = repo.head()
    result = resolve_ref(repo, ref, take)
    worktree = _follow_ref(repo, head_ref) if head_ref == result.name else None
    if as_json:
        output.emit_json(
            {
                "ref": result.name,
                "target": result.target.hex(),
                "superseded": [u.id.hex() for u in result.superseded],
                "unreachable": [c.hex() for c in result.unreachable],
                "worktree": worktree,
            }
        )
        return
    typer.echo(f"{result.name} now points to {result.target.hex()[:12]}, superseding {len(result.superseded)} head(s)")
    for commit_id in result.unreachable:
        typer.echo(
            f"  {commit_id.hex()[:12]} is no longer reachable from {result.name}. "
            f"Keep it with: p2pvc branch NAME {commit_id.hex()[:12]}"
        )
    if worktree:
        typer.echo(worktree)


def _follow_ref(repo, head_ref: str) -> str | None:
    """Check out the branch HEAD follows if the working tree is not at it, and return a line saying what happened."""
    from p2pvc.errors import ConflictError
    from p2pvc.ops.worktree_ops import checkout as run_checkout

    if repo.history_only:
        return None
    _, target = repo.head()
    if target is None or target == repo.worktree_base():
        return None
    short = head_ref.removeprefix("refs/heads/")
    try:
        run_checkout(repo, short, progress=output.TerminalProgress())
    except ConflictError:
        return f"the working tree has uncommitted changes, so it was left as it is (p2pvc checkout {short} updates it)"
    return f"Updated the working tree to {short} at {target.hex()[:12]}"


# merge -----------------------------------------------------------------------------------


def merge(
    rev: Annotated[
        Optional[str],
        typer.Argument(
            metavar="REV",
            help="Branch, tag or commit to merge (default: the other head of a conflicted branch).",
        ),
    ] = None,
    message: Annotated[Optional[str], typer.Option("-m", "--message", help="Message of the merge commit.")] = None,
    continue_merge: Annotated[
        bool, typer.Option("--continue", help="Commit the edited working tree as the merge commit of a stopped merge.")
    ] = False,
    abort: Annotated[bool, typer.Option("--abort", help="Drop a stopped merge and restore the working tree.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Merge REV into the working tree's branch, three-way. Exits with code 4 when files need hand edits."""
    from p2pvc.errors import ConflictError, UserError
    from p2pvc.ops import merge as merge_ops

    repo = _open()
    if continue_merge and abort:
        raise UserError("--continue and --abort cannot be used together")
    if continue_merge or abort:
        if rev is not None:
            raise UserError(f"{'--continue' if continue_merge else '--abort'} takes no revision")
        if abort:
            applied = merge_ops.abort_merge(repo, progress=output.TerminalProgress())
            typer.echo(f"Merge aborted: wrote {applied.files_written} file(s), removed {applied.removed}")
            return
        committed = merge_ops.continue_merge(repo, message, progress=output.TerminalProgress())
        if as_json:
            output.emit_json({"id": committed.id.hex(), "ref": committed.ref, "parents": [p.hex() for p in committed.parents]})
        else:
            where = (committed.ref or "HEAD").removeprefix("refs/heads/")
            typer.echo(f"[{where} {committed.id.hex()[:12]}] merge commit with parents " + ", ".join(p.hex()[:12] for p in committed.parents))
        return
    result = merge_ops.merge(repo, rev, message=message, progress=output.TerminalProgress())
    if as_json:
        output.emit_json(_merge_json(result))
    else:
        _print_merge(result)
    if result.status == "conflicts":
        raise ConflictError(
            f"merge stopped: {len(result.conflicts)} file(s) have conflicting changes, first: "
            f"{output.path_text(result.conflicts[0])}",
            hint="edit them to keep the lines you want and delete the <<<<<<< ======= >>>>>>> lines, then run "
            "p2pvc commit -m MSG or p2pvc merge --continue. p2pvc merge --abort drops the merge",
        )


def _merge_json(result) -> dict:
    return {
        "status": result.status,
        "ref": result.ref,
        "ours": result.ours.hex(),
        "theirs": result.theirs.hex(),
        "base": _hex(result.base),
        "commit": _hex(result.commit),
        "merged": [output.path_text(p) for p in result.merged],
        "conflicts": [output.path_text(p) for p in result.conflicts],
        "copies": [{"path": output.path_text(p), "theirs": output.path_text(c)} for p, c in result.copies],
        "notes": [{"path": output.path_text(n.path), "note": n.text} for n in result.notes],
        "was_conflicted": result.was_conflicted,
        "still_conflicted": result.still_conflicted,
    }


def _print_merge(result) -> None:
    where = (result.ref or "HEAD").removeprefix("refs/heads/")
    if result.status == "up-to-date":
        typer.echo(f"Already up to date: {result.theirs.hex()[:12]} is part of {where}.")
        return
    if result.status == "fast-forward":
        typer.echo(f"Fast-forwarded {where} to {result.theirs.hex()[:12]}")
    elif result.status == "merged":
        assert result.commit is not None
        typer.echo(
            f"Merged {result.theirs.hex()[:12]} into {where}: commit {result.commit.hex()[:12]} "
            f"(merge base {_short(result.base) if result.base else 'none'})"
        )
    else:
        typer.echo(f"Merging {result.theirs.hex()[:12]} into {where} stopped with conflicts (merge base {_short(result.base)})")
    for path in result.merged:
        typer.echo(f"  merged    {output.path_text(path)}")
    for path in result.conflicts:
        typer.echo(f"  CONFLICT  {output.path_text(path)}: edit the lines between <<<<<<< HEAD and >>>>>>>")
    for path, copy in result.copies:
        typer.echo(f"  both      {output.path_text(path)}: ours kept, theirs written to {output.path_text(copy)}")
    for note in result.notes:
        typer.echo(f"  note      {output.path_text(note.path)}: {note.text}")
    if result.applied is not None:
        typer.echo(f"  wrote {result.applied.files_written} file(s), removed {result.applied.removed}")
    if result.was_conflicted and not result.still_conflicted and result.status != "conflicts":
        typer.echo(f"{where} has a single head again: the conflict is resolved.")
    elif result.still_conflicted and result.status != "conflicts":
        typer.echo(f"{where} still has divergent heads (p2pvc conflicts lists them).")


# bundle -------------------------------------------------------------------------------------


@bundle_app.command("create")
def bundle_create(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="The bundle file to write.")],
    revs: Annotated[
        Optional[list[str]],
        typer.Argument(metavar="REV...", help="Branches, tags or commits to include (default: every ref)."),
    ] = None,
    since: Annotated[
        Optional[Path],
        typer.Option("--since", help="Heads file from the receiving replica (p2pvc bundle heads): leave out what it has."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Write signed records and the objects they reach to one file."""
    from p2pvc.ops.bundle import create_bundle

    repo = _open()
    report = create_bundle(repo, file.absolute(), revs, since=since, progress=output.TerminalProgress())
    if as_json:
        value = dict(report.__dict__)
        value["path"] = str(report.path)
        output.emit_json(value)
        return
    typer.echo(
        f"Wrote {file}: {len(report.refs)} ref(s), {report.records} record(s), {report.commits} commit(s), "
        f"{report.objects} tree(s) and manifest(s), {report.chunks} chunk(s), {output.human_bytes(report.bytes)}"
    )
    if report.missing:
        typer.echo(
            f"  left out {report.missing} object(s) this replica does not store (a history-only clone?). "
            "Refs that need them will not be applied on the other side.",
            err=True,
        )


@bundle_app.command("heads")
def bundle_heads() -> None:
    """Print this replica's ref digests and complete commits as JSON, for bundle create --since."""
    from p2pvc.ops.bundle import local_heads

    output.emit_json(local_heads(_open()))


@bundle_app.command("apply")
def bundle_apply(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="The bundle file to read.")],
    checkout: Annotated[
        bool, typer.Option(help="Update the working tree when the checked-out branch moved (never over uncommitted work).")
    ] = True,
    as_json: JsonOption = False,
) -> None:
    """Verify a bundle as a sync would, store what it carries, and print what changed per ref."""
    from p2pvc.ops.bundle import apply_bundle

    repo = _open()
    head_ref, head_before = repo.head()
    report = apply_bundle(repo, file, progress=output.TerminalProgress())
    moved = head_ref is not None and repo.head()[1] != head_before
    worktree = None
    if checkout and moved and head_before is None:
        worktree = _first_checkout(repo, head_ref)
    elif checkout and moved:
        worktree = _follow_ref(repo, head_ref)
    if as_json:
        value = _apply_json(report)
        value["worktree"] = worktree
        output.emit_json(value)
        return
    _print_apply(file, report)
    if worktree:
        typer.echo(worktree)


def _first_checkout(repo, head_ref: str) -> str:
    """Check out a branch that had no commits here before, but only into a working tree without files."""
    from p2pvc.ops.worktree_ops import checkout as run_checkout

    short = head_ref.removeprefix("refs/heads/")
    if any(entry.name != ".p2pvc" for entry in repo.worktree.iterdir()):
        return f"{short} arrived, but the working tree already has files, so it was left as it is (p2pvc checkout --force {short} writes it)"
    run_checkout(repo, short, force=True)
    return f"Checked out {short} at {repo.head()[1].hex()[:12]}"


@bundle_app.command("clone")
def bundle_clone(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="The bundle file to read.")],
    directory: Annotated[
        Optional[Path],
        typer.Argument(metavar="DIR", help="Folder to create (default: ./p2pvc-REPOID)."),
    ] = None,
) -> None:
    """Create a replica of the bundle's repository and apply the bundle to it."""
    from p2pvc.errors import UserError
    from p2pvc.ops.bundle import clone_from_bundle, read_repository_record
    from p2pvc.ops.worktree_ops import checkout as run_checkout
    from p2pvc.objects.ids import object_id

    if directory is None:
        directory = _cwd() / f"p2pvc-{object_id(read_repository_record(file)).hex()[:12]}"
    target = directory.absolute()
    if target.exists() and any(target.iterdir()):
        raise UserError(f"{target} exists and is not empty", hint="pass a new folder")
    repo, report = clone_from_bundle(file, target)
    state = repo.ref_state("refs/heads/main")
    if state is not None and state.target is not None:
        run_checkout(repo, "main", force=True)
    typer.echo(f"Created a replica of repository {repo.id.hex()[:12]} in {target}")
    _print_apply(file, report)
    if repo.identity.public_key not in repo.refs.members().current:
        typer.echo(
            "  You are not a member yet: send the key from `p2pvc id` to a member, who runs "
            "`p2pvc member add KEY` and sends you a new bundle."
        )


def _apply_json(report) -> dict:
    return {
        "repository": report.repository.hex(),
        "members_applied": report.members_applied,
        "updates_received": report.updates_received,
        "updates_applied": report.updates_applied,
        "updates_present": report.updates_present,
        "rejected": report.rejected,
        "incomplete": report.incomplete,
        "objects_stored": report.objects_stored,
        "chunks_stored": report.chunks_stored,
        "bytes_stored": report.bytes_stored,
        "skipped": report.skipped,
        "changes": [
            {"ref": c.name, "old": _hex(c.old), "new": _hex(c.new), "conflicted": c.conflicted} for c in report.changes
        ],
    }


def _print_apply(file: Path, report) -> None:
    typer.echo(
        f"{file}: stored {report.objects_stored} object(s), {report.chunks_stored} chunk(s), "
        f"{output.human_bytes(report.bytes_stored)}; {report.updates_applied} ref update(s), "
        f"{report.members_applied} membership record(s)"
    )
    for change in report.changes:
        old = change.old.hex()[:12] if change.old else "(new)"
        new = change.new.hex()[:12] if change.new else "(deleted)"
        typer.echo(f"  {change.name}: {old} -> {new}" + ("  CONFLICT" if change.conflicted else ""))
    for reason in report.rejected:
        typer.echo(f"  rejected: {reason}")
    for name in report.incomplete:
        typer.echo(f"  {name}: not updated, the bundle lacks part of its content")


if __name__ == "__main__":
    # `python -m p2pvc.cli.merge_commands ARGS...` runs the whole command line with these
    # commands added, for trying them before p2pvc.cli.main calls register itself.
    from p2pvc.cli import main as cli_main

    register(cli_main.app)
    cli_main.run()
