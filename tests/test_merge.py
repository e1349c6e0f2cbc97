"""Tests for three-way merge: the line merge, the tree merge, the merge commit and conflicted refs.

Most cases run the library in this process on a real repository in a
temporary folder. The command-line cases run `python -m
p2pvc.cli.merge_commands`, which is the whole p2pvc command line with the
merge commands added.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pvc.errors import ConflictError, UserError
from p2pvc.identity.keys import Identity, load_or_create
from p2pvc.objects import model
from p2pvc.ops import fsck, history, maintenance, worktree_ops
from p2pvc.ops import merge as merge_ops
from p2pvc.ops.conflicts import list_conflicts, pending_merge, resolve_ref
from p2pvc.repo import Repository
from p2pvc.worktree import merge3

CLI = [sys.executable, "-m", "p2pvc.cli.merge_commands"]
CLI_TIMEOUT_S = 120
MAIN = "refs/heads/main"

# Line merge (pure) -------------------------------------------------------------------------

BASE_LINES = b"".join(b"line %d\n" % i for i in range(1, 11))


def edit(text: bytes, line: int, new: bytes) -> bytes:
    lines = text.splitlines(keepends=True)
    lines[line - 1] = new
    return b"".join(lines)


LINE_CASES = [
    pytest.param(BASE_LINES, edit(BASE_LINES, 2, b"ours\n"), BASE_LINES, edit(BASE_LINES, 2, b"ours\n"), 0, id="ours-only"),
    pytest.param(BASE_LINES, BASE_LINES, edit(BASE_LINES, 9, b"theirs\n"), edit(BASE_LINES, 9, b"theirs\n"), 0, id="theirs-only"),
    pytest.param(
        BASE_LINES,
        edit(BASE_LINES, 2, b"ours\n"),
        edit(BASE_LINES, 9, b"theirs\n"),
        edit(edit(BASE_LINES, 2, b"ours\n"), 9, b"theirs\n"),
        0,
        id="apart",
    ),
    pytest.param(BASE_LINES, edit(BASE_LINES, 5, b"same\n"), edit(BASE_LINES, 5, b"same\n"), edit(BASE_LINES, 5, b"same\n"), 0, id="same-change"),
    pytest.param(
        BASE_LINES,
        edit(BASE_LINES, 5, b"ours\n"),
        edit(BASE_LINES, 5, b"theirs\n"),
        edit(BASE_LINES, 5, b"<<<<<<< HEAD\nours\n=======\ntheirs\n>>>>>>> other\n"),
        1,
        id="overlap",
    ),
    pytest.param(
        b"a\nb\n", b"a\nb\nours\n", b"a\nb\ntheirs\n", b"a\nb\n<<<<<<< HEAD\nours\n=======\ntheirs\n>>>>>>> other\n", 1, id="both-append"
    ),
    pytest.param(b"a\nb\nc\n", b"a\nc\n", b"a\nb\nc\nd\n", b"a\nc\nd\n", 0, id="delete-and-append"),
    pytest.param(b"", b"x\ny\n", b"x\nz\n", b"x\n<<<<<<< HEAD\ny\n=======\nz\n>>>>>>> other\n", 1, id="empty-base-shared-prefix"),
    pytest.param(b"a\nb", b"a\nc", b"a\nd", b"a\n<<<<<<< HEAD\nc\n=======\nd\n>>>>>>> other\n", 1, id="no-final-newline"),
    pytest.param(b"a\r\nb\r\nc\r\n", b"A\r\nb\r\nc\r\n", b"a\r\nb\r\nC\r\n", b"A\r\nb\r\nC\r\n", 0, id="crlf-kept"),
]


@pytest.mark.parametrize(("base", "ours", "theirs", "expected", "conflicts"), LINE_CASES)
def test_merge_text_table(base: bytes, ours: bytes, theirs: bytes, expected: bytes, conflicts: int) -> None:
    merged = merge3.merge_text(base, ours, theirs, theirs_label="other")
    assert merged.data == expected
    assert merged.conflicts == conflicts


def test_merge_text_adjacent_edits_conflict() -> None:
    """Edits on neighbouring lines with no unchanged line between them conflict, as in diff3."""
    merged = merge3.merge_text(BASE_LINES, edit(BASE_LINES, 4, b"ours\n"), edit(BASE_LINES, 5, b"theirs\n"))
    assert merged.conflicts == 1


@pytest.mark.parametrize(
    ("data", "expected"),
    [(b"plain text\n", True), ("naïve\n".encode(), True), (b"a\x00b", False), (b"\xff\xfe", False), (b"", True)],
)
def test_is_text(data: bytes, expected: bool) -> None:
    assert merge3.is_text(data) is expected


COPY_NAME_CASES = [
    (b"model.safetensors", 1, b"model.theirs-0123456789ab.safetensors"),
    (b"data.tar.gz", 1, b"data.tar.theirs-0123456789ab.gz"),
    (b".bashrc", 1, b".bashrc.theirs-0123456789ab"),
    (b"README", 1, b"README.theirs-0123456789ab"),
    (b"ckpt.pt", 2, b"ckpt.theirs-0123456789ab-2.pt"),
]


@pytest.mark.parametrize(("name", "attempt", "expected"), COPY_NAME_CASES)
def test_conflict_copy_name_table(name: bytes, attempt: int, expected: bytes) -> None:
    copy = merge3.conflict_copy_name(name, "0123456789abcdef" * 4, attempt)
    assert copy == expected
    assert merge3.is_conflict_copy(copy)
    assert not merge3.is_conflict_copy(name)


def test_conflict_copy_name_fits_name_limit() -> None:
    copy = merge3.conflict_copy_name(b"x" * 250 + b".safetensors", "ab" * 32)
    assert len(copy) <= merge3.MAX_NAME_BYTES
    assert copy.endswith(b".theirs-abababababab.safetensors")


# Repositories --------------------------------------------------------------------------------


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Repository]:
    monkeypatch.setenv("P2PVC_HOME", str(tmp_path / "home"))
    # The key file in P2PVC_HOME, so command-line runs in this repository sign as its creator.
    repository = Repository.init(tmp_path / "work", load_or_create(tmp_path / "home"))
    try:
        yield repository
    finally:
        repository.close()


Files = dict[str, bytes]


def write_files(root: Path, files: Files) -> None:
    """Make the working tree hold exactly `files` (apart from .p2pvc)."""
    for entry in root.iterdir():
        if entry.name == ".p2pvc":
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def read_files(root: Path) -> Files:
    result = {}
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d != ".p2pvc"]
        for name in names:
            path = Path(folder, name)
            result[path.relative_to(root).as_posix()] = path.read_bytes()
    return result


def commit_files(repo: Repository, files: Files, message: str = "commit") -> bytes:
    write_files(repo.worktree, files)
    return worktree_ops.commit(repo, message).id


def diverge(repo: Repository, base: Files, ours: Files, theirs: Files) -> tuple[bytes, bytes, bytes]:
    """Commit `base` on main, `theirs` on branch other and `ours` on main; leave main checked out.

    Returns the commit ids (base, ours, theirs).
    """
    base_id = commit_files(repo, base, "base")
    history.create_branch(repo, "other")
    ours_id = commit_files(repo, ours, "ours")
    worktree_ops.checkout(repo, "other")
    theirs_id = commit_files(repo, theirs, "theirs")
    worktree_ops.checkout(repo, "main")
    return base_id, ours_id, theirs_id


def random_bytes(size: int, seed: int) -> bytes:
    import random

    return random.Random(seed).randbytes(size)


CHECKPOINT_A = random_bytes(70_000, 1)
CHECKPOINT_B = random_bytes(70_000, 2)
CHECKPOINT_C = random_bytes(70_000, 3)

# Tree merge --------------------------------------------------------------------------------

TEN_LINES = BASE_LINES

TREE_CASES = [
    pytest.param(
        {"a.txt": b"1\n", "b.txt": b"x\n"},
        {"a.txt": b"1\n", "b.txt": b"x\n", "c.txt": b"ours\n"},
        {"a.txt": b"2\n", "b.txt": b"x\n"},
        {"a.txt": b"2\n", "b.txt": b"x\n", "c.txt": b"ours\n"},
        id="one-sided-changes",
    ),
    pytest.param(
        {"a.txt": b"1\n", "gone.txt": b"x\n"},
        {"a.txt": b"1\n", "gone.txt": b"x\n", "new.txt": b"n\n"},
        {"a.txt": b"1\n"},
        {"a.txt": b"1\n", "new.txt": b"n\n"},
        id="one-sided-removal",
    ),
    pytest.param(
        {"a.txt": b"1\n", "m.bin": CHECKPOINT_A},
        {"a.txt": b"2\n", "m.bin": CHECKPOINT_B},
        {"a.txt": b"2\n", "m.bin": CHECKPOINT_B, "x.txt": b"x\n"},
        {"a.txt": b"2\n", "m.bin": CHECKPOINT_B, "x.txt": b"x\n"},
        id="same-change-both-sides",
    ),
    pytest.param(
        {"src/train.py": TEN_LINES},
        {"src/train.py": edit(TEN_LINES, 2, b"ours\n")},
        {"src/train.py": edit(TEN_LINES, 9, b"theirs\n")},
        {"src/train.py": edit(edit(TEN_LINES, 2, b"ours\n"), 9, b"theirs\n")},
        id="text-edits-apart",
    ),
    pytest.param(
        {"a.txt": b"1\n", "b.txt": b"x\n"},
        {"a.txt": b"changed\n", "b.txt": b"x\n"},
        {"b.txt": b"x\n"},
        {"a.txt": b"changed\n", "b.txt": b"x\n"},
        id="modified-here-removed-there",
    ),
    pytest.param(
        {"a.txt": b"1\n"},
        {"a.txt": b"1\n", "data": b"a file\n"},
        {"a.txt": b"1\n", "data/x.csv": b"1,2\n"},
        {"a.txt": b"1\n", "data": b"a file\n", "data.theirs-{theirs}/x.csv": b"1,2\n"},
        id="file-here-folder-there",
    ),
]


@pytest.mark.parametrize(("base", "ours", "theirs", "expected"), TREE_CASES)
def test_merge_tree_table(repo: Repository, base: Files, ours: Files, theirs: Files, expected: Files) -> None:
    _base_id, ours_id, theirs_id = diverge(repo, base, ours, theirs)
    result = merge_ops.merge(repo, "other")
    short = theirs_id.hex()[:12]
    assert result.status == "merged"
    assert read_files(repo.worktree) == {k.replace("{theirs}", short): v for k, v in expected.items()}
    assert result.commit is not None
    assert repo.read_commit(result.commit).commit.parents == (ours_id, theirs_id)
    assert repo.head() == (MAIN, result.commit)
    assert worktree_ops.status(repo).changes == []


def test_merge_overlapping_edits_stop(repo: Repository) -> None:
    _base_id, ours_id, theirs_id = diverge(
        repo, {"t.py": TEN_LINES}, {"t.py": edit(TEN_LINES, 5, b"ours\n")}, {"t.py": edit(TEN_LINES, 5, b"theirs\n")}
    )
    result = merge_ops.merge(repo, "other")
    assert result.status == "conflicts"
    assert result.conflicts == [b"t.py"]
    assert (repo.worktree / "t.py").read_bytes() == edit(TEN_LINES, 5, b"<<<<<<< HEAD\nours\n=======\ntheirs\n>>>>>>> other\n")
    assert repo.head() == (MAIN, ours_id)
    pending = pending_merge(repo)
    assert pending is not None
    assert (pending.ours, pending.theirs) == (ours_id, theirs_id)
    assert repo.db.get_meta("merge_head") == theirs_id


def test_continue_refuses_markers(repo: Repository) -> None:
    diverge(repo, {"t.py": TEN_LINES}, {"t.py": edit(TEN_LINES, 5, b"ours\n")}, {"t.py": edit(TEN_LINES, 5, b"theirs\n")})
    merge_ops.merge(repo, "other")
    with pytest.raises(ConflictError, match="conflict markers"):
        merge_ops.continue_merge(repo, "merge")


def test_continue_records_both_parents(repo: Repository) -> None:
    _base, ours_id, theirs_id = diverge(
        repo, {"t.py": TEN_LINES}, {"t.py": edit(TEN_LINES, 5, b"ours\n")}, {"t.py": edit(TEN_LINES, 5, b"theirs\n")}
    )
    merge_ops.merge(repo, "other")
    (repo.worktree / "t.py").write_bytes(edit(TEN_LINES, 5, b"both\n"))
    committed = merge_ops.continue_merge(repo, "merge by hand")
    assert repo.read_commit(committed.id).commit.parents == (ours_id, theirs_id)
    assert repo.head() == (MAIN, committed.id)
    assert pending_merge(repo) is None
    assert repo.worktree_base() == committed.id


def test_pending_merge_blocks_new_merge(repo: Repository) -> None:
    diverge(repo, {"t.py": TEN_LINES}, {"t.py": edit(TEN_LINES, 5, b"ours\n")}, {"t.py": edit(TEN_LINES, 5, b"theirs\n")})
    merge_ops.merge(repo, "other")
    with pytest.raises(ConflictError, match="merge is in progress"):
        merge_ops.merge(repo, "other")


def test_abort_restores_ours(repo: Repository) -> None:
    ours = {"t.py": edit(TEN_LINES, 5, b"ours\n")}
    diverge(repo, {"t.py": TEN_LINES}, ours, {"t.py": edit(TEN_LINES, 5, b"theirs\n"), "added.txt": b"new\n"})
    merge_ops.merge(repo, "other")
    merge_ops.abort_merge(repo)
    assert read_files(repo.worktree) == ours
    assert pending_merge(repo) is None
    assert worktree_ops.status(repo).changes == []


def test_binary_both_changed_keeps_copy(repo: Repository) -> None:
    _base, _ours, theirs_id = diverge(
        repo, {"model.safetensors": CHECKPOINT_A}, {"model.safetensors": CHECKPOINT_B}, {"model.safetensors": CHECKPOINT_C}
    )
    result = merge_ops.merge(repo, "other")
    copy = f"model.theirs-{theirs_id.hex()[:12]}.safetensors"
    assert result.status == "merged"
    assert result.copies == [(b"model.safetensors", copy.encode())]
    assert read_files(repo.worktree) == {"model.safetensors": CHECKPOINT_B, copy: CHECKPOINT_C}


def test_conflict_copy_not_copied_again(repo: Repository) -> None:
    copy = "model.theirs-0123456789ab.safetensors"
    diverge(repo, {copy: CHECKPOINT_A}, {copy: CHECKPOINT_B}, {copy: CHECKPOINT_C})
    result = merge_ops.merge(repo, "other")
    assert result.status == "merged"
    assert result.copies == []
    assert read_files(repo.worktree) == {copy: CHECKPOINT_B}
    assert [n.path for n in result.notes] == [copy.encode()]


def test_executable_bit_merges(repo: Repository) -> None:
    """Their side only made the file executable, ours only edited it: the result has both."""
    commit_files(repo, {"run.sh": b"echo 1\n"})
    history.create_branch(repo, "other")
    commit_files(repo, {"run.sh": b"echo 2\n"})
    worktree_ops.checkout(repo, "other")
    (repo.worktree / "run.sh").chmod(0o755)
    worktree_ops.commit(repo, "make it executable")
    worktree_ops.checkout(repo, "main")
    merge_ops.merge(repo, "other")
    assert (repo.worktree / "run.sh").read_bytes() == b"echo 2\n"
    assert os.access(repo.worktree / "run.sh", os.X_OK)


def _orphan_branch(repo: Repository, name: str, files: Files) -> bytes:
    """Commit `files` as the first commit of a new branch with no parent; return its id."""
    repo.set_head("refs/heads/" + name)
    commit_id = commit_files(repo, files, "unrelated start")
    worktree_ops.checkout(repo, "main", force=True)
    return commit_id


def test_unrelated_histories_keep_all(repo: Repository) -> None:
    commit_files(repo, {"ours.txt": b"o\n", "model.bin": CHECKPOINT_A})
    theirs_id = _orphan_branch(repo, "other", {"theirs.txt": b"t\n", "model.bin": CHECKPOINT_B})
    result = merge_ops.merge(repo, "other")
    copy = f"model.theirs-{theirs_id.hex()[:12]}.bin"
    assert result.status == "merged"
    assert result.base is None
    assert read_files(repo.worktree) == {"ours.txt": b"o\n", "theirs.txt": b"t\n", "model.bin": CHECKPOINT_A, copy: CHECKPOINT_B}


def test_unrelated_histories_text_conflict(repo: Repository) -> None:
    commit_files(repo, {"notes.txt": b"ours\n"})
    _orphan_branch(repo, "other", {"notes.txt": b"theirs\n"})
    result = merge_ops.merge(repo, "other")
    assert result.status == "conflicts"
    assert (repo.worktree / "notes.txt").read_bytes() == b"<<<<<<< HEAD\nours\n=======\ntheirs\n>>>>>>> other\n"


def test_merge_keeps_both_heads_reachable(repo: Repository) -> None:
    _base, ours_id, theirs_id = diverge(repo, {"a.txt": b"1\n"}, {"a.txt": b"1\n", "o": b"o"}, {"a.txt": b"1\n", "t": b"t"})
    result = merge_ops.merge(repo, "other")
    history.delete_branch(repo, "other")
    maintenance.gc(repo)
    assert result.commit is not None
    assert repo.store.has(ours_id)
    assert repo.store.has(theirs_id)
    assert repo.is_ancestor(theirs_id, result.commit)
    assert fsck.fsck(repo).ok


def test_merge_up_to_date_and_fast_forward(repo: Repository) -> None:
    commit_files(repo, {"a.txt": b"1\n"})
    history.create_branch(repo, "other")
    second = commit_files(repo, {"a.txt": b"2\n"})
    assert merge_ops.merge(repo, "other").status == "up-to-date"
    worktree_ops.checkout(repo, "other")
    result = merge_ops.merge(repo, "main")
    assert result.status == "fast-forward"
    assert repo.head() == ("refs/heads/other", second)
    assert read_files(repo.worktree) == {"a.txt": b"2\n"}


def test_merge_refuses_uncommitted_changes(repo: Repository) -> None:
    diverge(repo, {"a.txt": b"1\n"}, {"a.txt": b"2\n"}, {"a.txt": b"1\n", "b.txt": b"b\n"})
    (repo.worktree / "a.txt").write_bytes(b"uncommitted\n")
    with pytest.raises(ConflictError, match="uncommitted changes"):
        merge_ops.merge(repo, "other")
    assert (repo.worktree / "a.txt").read_bytes() == b"uncommitted\n"


# Merge base ----------------------------------------------------------------------------------


def _raw_commit(repo: Repository, parents: tuple[bytes, ...], time_ms: int) -> bytes:
    with repo.store.session() as session:
        tree = session.put_object(model.Tree(()))
        unsigned = model.Commit(tree, parents, repo.identity.public_key, time_ms, f"at {time_ms}")
        return session.put_object(repo.sign_commit(unsigned))


def test_merge_base_criss_cross_pick() -> None:
    """With two lowest common ancestors, the one with the later commit time is the base."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        repo = Repository.init(Path(folder), Identity.generate())
        try:
            root = _raw_commit(repo, (), 1000)
            left = _raw_commit(repo, (root,), 2000)
            right = _raw_commit(repo, (root,), 3000)
            left_merge = _raw_commit(repo, (left, right), 4000)
            right_merge = _raw_commit(repo, (right, left), 5000)
            assert set(merge_ops.merge_bases(repo, left_merge, right_merge)) == {left, right}
            assert merge_ops.merge_base(repo, left_merge, right_merge) == right
            assert merge_ops.merge_base(repo, right_merge, left_merge) == right
            assert merge_ops.merge_base(repo, left, right) == root
        finally:
            repo.close()


# Conflicted refs ---------------------------------------------------------------------------


def _conflicted_main(repo: Repository) -> tuple[bytes, bytes, bytes]:
    """Give main two divergent heads in one repository; return (base, first head, second head).

    The second head is written without `expected`, like an update that was
    made on another replica, so it supersedes nothing.
    """
    base = commit_files(repo, {"a.txt": TEN_LINES}, "base")
    first = commit_files(repo, {"a.txt": edit(TEN_LINES, 2, b"first\n")}, "first")
    worktree_ops.checkout(repo, base.hex())
    second = commit_files(repo, {"a.txt": edit(TEN_LINES, 9, b"second\n"), "b.txt": b"b\n"}, "second")
    repo.set_ref(MAIN, second)
    worktree_ops.checkout(repo, "main")
    return base, first, second


def test_conflicts_lists_heads(repo: Repository) -> None:
    base, first, second = _conflicted_main(repo)
    [conflict] = list_conflicts(repo)
    assert conflict.name == MAIN
    assert {h.update.target for h in conflict.heads} == {first, second}
    assert [h.update.target for h in conflict.heads if h.winner] == [second]
    assert conflict.merge_base == base
    [difference] = conflict.differences
    assert {(c.path, c.status) for c in difference.changes} == {(b"a.txt", "modified"), (b"b.txt", "removed")}


def test_merge_without_rev_resolves(repo: Repository) -> None:
    _base, first, second = _conflicted_main(repo)
    result = merge_ops.merge(repo, None)
    assert result.status == "merged"
    assert result.was_conflicted
    assert not result.still_conflicted
    assert result.commit is not None
    assert repo.read_commit(result.commit).commit.parents == (second, first)
    assert (repo.worktree / "a.txt").read_bytes() == edit(edit(TEN_LINES, 2, b"first\n"), 9, b"second\n")
    state = repo.ref_state(MAIN)
    assert state is not None
    assert [h.target for h in state.heads] == [result.commit]


def test_merge_leaves_third_head(repo: Repository) -> None:
    base, first, second = _conflicted_main(repo)
    worktree_ops.checkout(repo, base.hex())
    third = commit_files(repo, {"a.txt": TEN_LINES, "c.txt": b"c\n"}, "third")
    repo.set_ref(MAIN, third)
    worktree_ops.checkout(repo, "main")
    result = merge_ops.merge(repo, first.hex())
    assert result.still_conflicted
    state = repo.ref_state(MAIN)
    assert state is not None
    assert {h.target for h in state.heads} == {result.commit, second}


def test_resolve_takes_one_head(repo: Repository) -> None:
    _base, first, second = _conflicted_main(repo)
    result = resolve_ref(repo, "main", first.hex())
    assert result.unreachable == [second]
    state = repo.ref_state(MAIN)
    assert state is not None
    assert not state.conflicted
    assert state.target == first


def test_resolve_rejects_unrelated(repo: Repository) -> None:
    _conflicted_main(repo)
    stranger = _orphan_branch(repo, "stranger", {"x": b"x"})
    with pytest.raises(UserError, match="neither a head"):
        resolve_ref(repo, "main", stranger.hex())


def test_resolve_rejects_clean_ref(repo: Repository) -> None:
    commit_files(repo, {"a.txt": b"1\n"})
    with pytest.raises(UserError, match="not conflicted"):
        resolve_ref(repo, "main", "HEAD")


# Command line ------------------------------------------------------------------------------


def run_cli(cwd: Path, home: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, P2PVC_HOME=str(home))
    return subprocess.run([*CLI, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S)


def test_cli_conflict_exit_code(repo: Repository, tmp_path: Path) -> None:
    diverge(repo, {"t.py": TEN_LINES}, {"t.py": edit(TEN_LINES, 5, b"ours\n")}, {"t.py": edit(TEN_LINES, 5, b"theirs\n")})
    done = run_cli(repo.worktree, tmp_path / "home", "merge", "other")
    assert done.returncode == 4, done.stderr
    assert "CONFLICT  t.py" in done.stdout
    assert "error: merge stopped: 1 file(s) have conflicting changes" in done.stderr
    assert "p2pvc commit -m MSG" in done.stderr
    assert "Traceback" not in done.stderr
    (repo.worktree / "t.py").write_bytes(TEN_LINES)
    finished = run_cli(repo.worktree, tmp_path / "home", "merge", "--continue", "-m", "resolved")
    assert finished.returncode == 0, finished.stderr


def test_cli_commit_finishes_merge(repo: Repository, tmp_path: Path) -> None:
    _base, ours_id, theirs_id = diverge(
        repo, {"t.py": TEN_LINES}, {"t.py": edit(TEN_LINES, 5, b"ours\n")}, {"t.py": edit(TEN_LINES, 5, b"theirs\n")}
    )
    assert run_cli(repo.worktree, tmp_path / "home", "merge", "other").returncode == 4
    (repo.worktree / "t.py").write_bytes(TEN_LINES)
    done = run_cli(repo.worktree, tmp_path / "home", "commit", "-m", "resolved", "--json")
    assert done.returncode == 0, done.stderr
    import json

    assert json.loads(done.stdout)["parents"] == [ours_id.hex(), theirs_id.hex()]
