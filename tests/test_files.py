"""Round trips of file kinds and names through commit and checkout, path safety,
the stat cache, and files that change while they are committed.

A round trip commits the working tree, deletes everything but `.p2pvc`,
checks the commit out again with --force and compares the tree byte for
byte: content, executable bit, symlink targets and empty folders.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

import blake3
import pytest

from p2pvc.ops.worktree_ops import status
from p2pvc.worktree.ingest import Ingester

from conftest import (
    CLI_TIMEOUT_S,
    EXIT_CONFLICT,
    Cli,
    CliResult,
    assert_clean_error,
    clear_worktree,
    hash_file,
    open_repository,
    random_bytes,
    snapshot_tree,
    wait_past_racy_window,
    write_file,
)

KIB = 1024
MIB = 1024 * KIB


def round_trip(cli: Cli, worktree: Path) -> dict[bytes, tuple]:
    """Commit the working tree, empty it, and check the commit out again; return the tree before."""
    before = snapshot_tree(worktree)
    cli.commit("round trip")
    clear_worktree(worktree)
    assert snapshot_tree(worktree) == {}
    cli.ok("checkout", "--force", "main")  # without --force, checkout keeps deleted files deleted
    return before


def committed_paths(result: dict) -> set[str]:
    return {c["path"] for c in result["changes"]}


# File kinds and names --------------------------------------------------------------------


def make_empty_files(root: Path) -> None:
    write_file(root / "empty", b"")
    write_file(root / "d" / "empty", b"")


def make_empty_folders(root: Path) -> None:
    (root / "e1").mkdir()
    (root / "e2" / "sub" / "subsub").mkdir(parents=True)
    write_file(root / "e3" / "file", b"x")
    (root / "e3" / "empty").mkdir()


def make_executables(root: Path) -> None:
    write_file(root / "run.sh", b"#!/bin/sh\necho hi\n", executable=True)
    write_file(root / "data.txt", b"plain")
    write_file(root / "bin" / "tool", random_bytes(100 * KIB, "tool"), executable=True)


def make_symlinks(root: Path) -> None:
    write_file(root / "target.txt", b"target")
    write_file(root / "sub" / "inner", b"inner")
    os.symlink("target.txt", root / "relative")
    os.symlink("/nonexistent/absolute/path", root / "absolute")
    os.symlink("missing", root / "dangling")
    os.symlink("sub", root / "dirlink")
    os.symlink("../target.txt", root / "sub" / "up")
    os.symlink("loop", root / "loop")


def make_spaces(root: Path) -> None:
    write_file(root / "with space", b"1")
    write_file(root / " leading", b"2")
    write_file(root / "trailing ", b"3")
    write_file(root / "dir with space" / "file name", b"4")


def make_non_ascii(root: Path) -> None:
    write_file(root / "ünïcødé.txt", b"1")
    write_file(root / "日本語" / "ファイル", b"2")
    write_file(root / "emoji 🙂", b"3")
    write_file(root / "e\u0301", b"decomposed")  # differs from the composed "é" below
    write_file(root / "\u00e9", b"composed")


def make_leading_dashes(root: Path) -> None:
    write_file(root / "-rf", b"1")
    write_file(root / "--force", b"2")
    write_file(root / "-d" / "-x", b"3")


def make_non_utf8(root: Path) -> None:
    base = os.fsencode(root)
    with open(os.path.join(base, b"bad\xff"), "wb") as f:
        f.write(b"1")
    os.mkdir(os.path.join(base, b"\xe9t\xe9"))
    with open(os.path.join(base, b"\xe9t\xe9", b"\xff\xfe"), "wb") as f:
        f.write(b"2")
    os.symlink(b"bad\xff", os.path.join(base, b"link\xfe"))


def make_odd_characters(root: Path) -> None:
    for name in ("line\nbreak", "tab\there", "back\\slash", "*?[glob]", ".hidden", "..dots", "a:b;c"):
        write_file(root / name, name.encode())


FILE_CASES = [
    pytest.param(make_empty_files, id="empty-files"),
    pytest.param(make_empty_folders, id="empty-folders"),
    pytest.param(make_executables, id="executable-bit"),
    pytest.param(make_symlinks, id="symlinks"),
    pytest.param(make_spaces, id="spaces"),
    pytest.param(make_non_ascii, id="non-ascii"),
    pytest.param(make_leading_dashes, id="leading-dashes"),
    pytest.param(make_non_utf8, id="non-utf8-bytes"),
    pytest.param(make_odd_characters, id="odd-characters"),
]


@pytest.mark.parametrize("make", FILE_CASES)
def test_round_trip_case(repo_cli: Cli, worktree: Path, make: Callable[[Path], None]) -> None:
    make(worktree)
    before = round_trip(repo_cli, worktree)
    assert snapshot_tree(worktree) == before


def test_round_trip_all_cases(repo_cli: Cli, worktree: Path) -> None:
    """All cases in one tree, through a checkout that removes them and one that writes them back."""
    repo_cli.ok("commit", "--allow-empty", "-m", "empty")
    repo_cli.ok("tag", "empty")
    for index, param in enumerate(FILE_CASES):
        folder = worktree / f"case{index}"
        folder.mkdir()
        param.values[0](folder)
    before = snapshot_tree(worktree)
    repo_cli.commit("all cases")
    repo_cli.ok("checkout", "empty")
    assert snapshot_tree(worktree) == {}
    repo_cli.ok("checkout", "main")
    assert snapshot_tree(worktree) == before
    assert repo_cli.json("status")["changes"] == []


def test_symlink_stored_as_link(repo_cli: Cli, worktree: Path) -> None:
    write_file(worktree / "target.txt", b"target")
    os.symlink("target.txt", worktree / "link")
    change = {c["path"]: c for c in repo_cli.json("commit", "-m", "link")["changes"]}["link"]
    assert change["new"] == {"kind": "symlink", "size": len("target.txt"), "executable": False, "link_target": "target.txt"}


def test_symlink_outside_not_followed(repo_cli: Cli, worktree: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    write_file(outside / "secret.txt", b"secret")
    write_file(outside / "nested" / "more.txt", b"more")
    outside_before = snapshot_tree(outside)
    os.symlink(outside, worktree / "out")
    result = repo_cli.json("commit", "-m", "link out")
    assert committed_paths(result) == {"out"}
    assert result["files"] == 0
    assert result["new_bytes"] == 0
    clear_worktree(worktree)
    repo_cli.ok("checkout", "--force", "main")
    assert snapshot_tree(worktree) == {b"out": ("symlink", os.fsencode(outside))}
    assert snapshot_tree(outside) == outside_before


def test_non_utf8_name_display(repo_cli: Cli, worktree: Path) -> None:
    with open(os.path.join(os.fsencode(worktree), b"bad\xff"), "wb") as f:
        f.write(b"1")
    assert [c["path"] for c in repo_cli.json("status")["changes"]] == ["bad\\xff"]


def test_non_utf8_path_argument(repo_cli: Cli, worktree: Path) -> None:
    """A path argument that is not UTF-8 reaches the file it names."""
    name = os.path.join(os.fsencode(worktree), b"bad\xff")
    with open(name, "wb") as f:
        f.write(b"committed")
    repo_cli.commit("bad name")
    with open(name, "wb") as f:
        f.write(b"edited")
    repo_cli.ok("restore", b"bad\xff")
    with open(name, "rb") as f:
        assert f.read() == b"committed"


def test_leading_dash_path_argument(repo_cli: Cli, worktree: Path) -> None:
    write_file(worktree / "-rf", b"committed")
    repo_cli.commit("dash")
    write_file(worktree / "-rf", b"edited")
    repo_cli.ok("restore", "--", "-rf")
    assert (worktree / "-rf").read_bytes() == b"committed"


def test_type_changes_between_commits(repo_cli: Cli, worktree: Path) -> None:
    """Each path changes kind between two commits: file, folder, symlink."""
    write_file(worktree / "x", b"file x")
    write_file(worktree / "y" / "inner", b"inner y")
    os.symlink("x", worktree / "z")
    (worktree / "w").mkdir()
    first_tree = snapshot_tree(worktree)
    first = repo_cli.commit("first kinds")

    clear_worktree(worktree)
    write_file(worktree / "x" / "inner", b"inner x")
    write_file(worktree / "y", b"file y")
    write_file(worktree / "z", b"file z", executable=True)
    os.symlink("y", worktree / "w")
    second_tree = snapshot_tree(worktree)
    repo_cli.commit("second kinds")

    repo_cli.ok("checkout", first)
    assert snapshot_tree(worktree) == first_tree
    repo_cli.ok("checkout", "main")
    assert snapshot_tree(worktree) == second_tree


def test_mode_change_round_trip(repo_cli: Cli, worktree: Path) -> None:
    write_file(worktree / "tool", b"#!/bin/sh\n")
    first = repo_cli.commit("plain")
    (worktree / "tool").chmod(0o755)
    assert [c["status"] for c in repo_cli.json("status")["changes"]] == ["modified"]
    repo_cli.commit("executable")
    repo_cli.ok("checkout", first)
    assert not os.access(worktree / "tool", os.X_OK)
    repo_cli.ok("checkout", "main")
    assert os.access(worktree / "tool", os.X_OK)


# Ignore rules --------------------------------------------------------------------------------

IGNORE_TREE = {
    ".p2pvcignore": "*.log\n!keep.log\nbuild/\n/top-only.txt\n",
    "a.log": "ignored by *.log",
    "keep.log": "re-included by !keep.log",
    "top-only.txt": "ignored by the anchored /top-only.txt",
    "build/out.o": "ignored with its folder",
    "build/keep.log": "stays ignored: its folder is ignored",
    "sub/.p2pvcignore": "*.tmp\n!*.log\n",
    "sub/x.log": "re-included by the deeper !*.log",
    "sub/x.tmp": "ignored by the deeper *.tmp",
    "sub/top-only.txt": "kept: the root pattern is anchored",
    "sub/deeper/y.tmp": "ignored at any depth below sub",
    "sub/deeper/z.txt": "kept",
}
KEPT_FILES = {
    ".p2pvcignore",
    "keep.log",
    "sub/.p2pvcignore",
    "sub/x.log",
    "sub/top-only.txt",
    "sub/deeper/z.txt",
}


def make_ignore_tree(root: Path) -> None:
    for name, text in IGNORE_TREE.items():
        write_file(root / name, text.encode())


def test_ignore_rules_commit(repo_cli: Cli, worktree: Path) -> None:
    make_ignore_tree(worktree)
    assert committed_paths(repo_cli.json("commit", "-m", "ignore")) == KEPT_FILES


def test_ignore_rules_round_trip(repo_cli: Cli, worktree: Path) -> None:
    make_ignore_tree(worktree)
    before = round_trip(repo_cli, worktree)
    kept_paths = {p.encode() for p in KEPT_FILES} | {b"sub", b"sub/deeper"}
    assert snapshot_tree(worktree) == {p: v for p, v in before.items() if p in kept_paths}


def test_ignored_changes_not_status(repo_cli: Cli, worktree: Path) -> None:
    make_ignore_tree(worktree)
    repo_cli.commit("ignore")
    write_file(worktree / "new.log", b"ignored")
    write_file(worktree / "sub" / "deeper" / "new.tmp", b"ignored")
    write_file(worktree / "build" / "more.o", b"ignored")
    assert repo_cli.json("status")["changes"] == []


# Path safety at checkout ------------------------------------------------------------------------


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """An empty folder outside the working tree that checkout must never write to."""
    path = tmp_path / "outside"
    path.mkdir()
    return path


def test_checkout_rejects_symlink_folder(repo_cli: Cli, worktree: Path, outside: Path) -> None:
    """A symlink d -> outside where the commit has a folder d blocks the checkout."""
    write_file(worktree / "d" / "f", b"committed")
    with_folder = repo_cli.commit("folder d")
    clear_worktree(worktree)
    write_file(worktree / "other", b"other")
    repo_cli.commit("no d")
    os.symlink(outside, worktree / "d")
    assert_clean_error(repo_cli.run("checkout", with_folder), EXIT_CONFLICT)
    assert list(outside.iterdir()) == []
    assert os.readlink(worktree / "d") == str(outside)


def test_checkout_force_replaces_symlink(repo_cli: Cli, worktree: Path, outside: Path) -> None:
    write_file(worktree / "d" / "f", b"committed")
    with_folder = repo_cli.commit("folder d")
    clear_worktree(worktree)
    write_file(worktree / "other", b"other")
    repo_cli.commit("no d")
    os.symlink(outside, worktree / "d")
    repo_cli.ok("checkout", "--force", with_folder)
    assert list(outside.iterdir()) == []
    assert not (worktree / "d").is_symlink()
    assert (worktree / "d" / "f").read_bytes() == b"committed"


def test_checkout_tracked_symlink_to_folder(repo_cli: Cli, worktree: Path, outside: Path) -> None:
    """A committed symlink d -> outside that the next commit turns into a folder is replaced, not followed."""
    os.symlink(outside, worktree / "d")
    with_link = repo_cli.commit("link d")
    (worktree / "d").unlink()
    write_file(worktree / "d" / "f", b"in folder")
    repo_cli.commit("folder d")
    repo_cli.ok("checkout", with_link)
    repo_cli.ok("checkout", "main")
    assert list(outside.iterdir()) == []
    assert (worktree / "d" / "f").read_bytes() == b"in folder"


def test_checkout_new_file_under_symlink(repo_cli: Cli, worktree: Path, outside: Path) -> None:
    """The target adds d/g in a folder d that the working tree replaced by a symlink to outside."""
    write_file(worktree / "d" / "f", b"f")
    first = repo_cli.commit("d/f")
    write_file(worktree / "d" / "g", b"g")
    repo_cli.commit("d/g")
    repo_cli.ok("checkout", first)
    clear_worktree(worktree)
    os.symlink(outside, worktree / "d")
    assert_clean_error(repo_cli.run("checkout", "main"), EXIT_CONFLICT)
    assert list(outside.iterdir()) == []


def test_restore_rejects_symlink_parent(repo_cli: Cli, worktree: Path, outside: Path) -> None:
    write_file(worktree / "d" / "f", b"committed")
    repo_cli.commit("folder d")
    clear_worktree(worktree)
    os.symlink(outside, worktree / "d")
    assert_clean_error(repo_cli.run("restore", "d/f"), EXIT_CONFLICT)
    assert list(outside.iterdir()) == []


def build_folder_to_file(cli: Cli, worktree: Path) -> None:
    """Leave HEAD at a commit with folder x/, and an untracked file in x/, where main has a file x."""
    write_file(worktree / "a", b"a1")
    write_file(worktree / "x" / "k", b"keep")
    folder_commit = cli.commit("folder x")
    write_file(worktree / "a", b"a2")
    (worktree / "x" / "k").unlink()
    (worktree / "x").rmdir()
    write_file(worktree / "x", b"file x")
    cli.commit("file x")
    cli.ok("checkout", folder_commit)
    write_file(worktree / "x" / "untracked", b"mine")


def test_checkout_conflict_changes_nothing(repo_cli: Cli, worktree: Path) -> None:
    build_folder_to_file(repo_cli, worktree)
    before = snapshot_tree(worktree)
    assert_clean_error(repo_cli.run("checkout", "--force", "main"), EXIT_CONFLICT)
    assert snapshot_tree(worktree) == before


def test_checkout_conflict_no_temp_file(repo_cli: Cli, worktree: Path) -> None:
    build_folder_to_file(repo_cli, worktree)
    repo_cli.run("checkout", "--force", "main")
    assert [p for p in snapshot_tree(worktree) if b".p2pvc-tmp-" in p] == []


LINUX_DEFAULT_OPEN_FILES = 1024  # the usual soft `ulimit -n`


def test_checkout_many_folders(repo_cli: Cli, worktree: Path) -> None:
    for index in range(LINUX_DEFAULT_OPEN_FILES + 100):
        write_file(worktree / f"d{index:04}" / "f", str(index).encode())
    before = round_trip_commit_only(repo_cli, worktree)
    result = repo_cli.run("checkout", "--force", "main", max_open_files=LINUX_DEFAULT_OPEN_FILES)
    assert result.returncode == 0, result.describe()
    assert snapshot_tree(worktree) == before


def round_trip_commit_only(cli: Cli, worktree: Path) -> dict[bytes, tuple]:
    """Commit the working tree and empty it; return the tree before."""
    before = snapshot_tree(worktree)
    cli.commit("tree")
    clear_worktree(worktree)
    return before


def make_deep_tree(root: Path, depth: int) -> None:
    """Create folders a/a/.../a `depth` levels deep with a file at the bottom, relative to open
    descriptors so that no Python call recurses."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("a", dir_fd=fd)
            child = os.open("a", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        file_fd = os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.close(file_fd)
    finally:
        os.close(fd)


def remove_deep_tree(root: Path) -> None:
    """Remove what make_deep_tree created, bottom up, without recursion."""
    path = root
    depth = 0
    while (path / "a").is_dir():
        path = path / "a"
        depth += 1
    (path / "f").unlink(missing_ok=True)
    for _ in range(depth):
        path.rmdir()
        path = path.parent


def test_status_deep_tree(repo_cli: Cli, worktree: Path) -> None:
    make_deep_tree(worktree, 1200)
    try:
        result = repo_cli.run("status")
    finally:
        remove_deep_tree(worktree)
    assert "Traceback" not in result.stderr, result.describe()


# Stat cache ----------------------------------------------------------------------------------------


@pytest.fixture
def ingest_calls(monkeypatch: pytest.MonkeyPatch) -> list:
    """Record every Ingester.ingest call in this process (each one reads a whole file)."""
    calls = []
    original = Ingester.ingest

    def spy(self, path, previous=None):
        calls.append(os.fsdecode(path))
        return original(self, path, previous)

    monkeypatch.setattr(Ingester, "ingest", spy)
    return calls


def make_stat_tree(root: Path) -> None:
    write_file(root / "a.bin", random_bytes(200 * KIB, "a"))
    write_file(root / "d" / "b.txt", b"b")
    write_file(root / "d" / "empty", b"")


def status_in_process(worktree: Path):
    with open_repository(worktree) as repo:
        return status(repo)


def test_status_reads_nothing_unchanged(repo_cli: Cli, worktree: Path, ingest_calls: list) -> None:
    """Files older than the racy window at commit time are never read again by status."""
    make_stat_tree(worktree)
    wait_past_racy_window()
    repo_cli.commit("stat cache")
    result = status_in_process(worktree)
    assert result.changes == []
    assert ingest_calls == []


def test_status_after_racy_window(repo_cli: Cli, worktree: Path, ingest_calls: list) -> None:
    make_stat_tree(worktree)
    repo_cli.commit("stat cache")
    wait_past_racy_window()
    status_in_process(worktree)
    ingest_calls.clear()
    result = status_in_process(worktree)
    assert result.changes == []
    assert ingest_calls == []


def test_status_sees_hidden_rewrites(repo_cli: Cli, worktree: Path) -> None:
    """Rewrites that keep size and mtime are still found: a.bin's ctime changed, d/b.txt's inode changed."""
    make_stat_tree(worktree)
    wait_past_racy_window()
    repo_cli.commit("stat cache")

    rewritten = worktree / "a.bin"
    old = rewritten.stat()
    rewritten.write_bytes(random_bytes(200 * KIB, "rewritten"))
    os.utime(rewritten, ns=(old.st_atime_ns, old.st_mtime_ns))

    replaced = worktree / "d" / "b.txt"
    old = replaced.stat()
    write_file(worktree / "d" / "new", b"c")
    os.utime(worktree / "d" / "new", ns=(old.st_atime_ns, old.st_mtime_ns))
    os.replace(worktree / "d" / "new", replaced)

    assert [c["path"] for c in repo_cli.json("status")["changes"]] == ["a.bin", "d/b.txt"]


# Files that change during a commit ----------------------------------------------------------------

RACE_FILE_SIZE = 32 * MIB


def rewrite_until(path: Path, versions: list[bytes], stop: threading.Event, pause_s: float, seed: int) -> None:
    """Rewrite the whole file in place with alternating versions until `stop` is set."""
    rng = random.Random(seed)
    fd = os.open(path, os.O_WRONLY)
    try:
        index = 1
        while not stop.is_set():
            os.pwrite(fd, versions[index % len(versions)], 0)
            index += 1
            time.sleep(rng.uniform(0, pause_s))
    finally:
        os.close(fd)


@pytest.mark.parametrize("pause_s", [0.0, 0.3], ids=["continuous", "paced"])
def test_commit_during_rewrite(repo_cli: Cli, worktree: Path, pause_s: float) -> None:
    """The commit fails cleanly or stores exactly one real version of the file; fsck passes after."""
    versions = [random_bytes(RACE_FILE_SIZE, f"version-{i}") for i in range(2)]
    version_hashes = {blake3.blake3(v).hexdigest() for v in versions}
    path = worktree / "big.bin"
    path.write_bytes(versions[0])

    stop = threading.Event()
    writer = threading.Thread(target=rewrite_until, args=(path, versions, stop, pause_s, int(pause_s * 10)))
    process = repo_cli.start("commit", "-m", "racing", "--json")
    writer.start()
    try:
        stdout, stderr = process.communicate(timeout=CLI_TIMEOUT_S)
    finally:
        stop.set()
        writer.join()
        if process.poll() is None:
            process.kill()
            process.wait()
    result = CliResult(("commit", "-m", "racing", "--json"), process.returncode, stdout.decode(), stderr.decode())

    if result.returncode == 0:
        final_hash = hash_file(path)
        changed = [c["path"] for c in repo_cli.json("status")["changes"]]
        path.unlink()
        repo_cli.ok("restore", "big.bin")
        committed_hash = hash_file(path)
        assert committed_hash in version_hashes
        assert changed == ([] if final_hash == committed_hash else ["big.bin"])
    else:
        assert_clean_error(result, EXIT_CONFLICT)
    assert repo_cli.json("fsck")["ok"] is True


# Large sparse files ----------------------------------------------------------------------------------

SPARSE_SIZES = [2**32 - 1, 2**32, 2**32 + 1]


def make_sparse(path: Path, size: int) -> None:
    """Create a sparse file of `size` bytes with a few marker bytes at offsets around 2 and 4 GiB."""
    offsets = [0, MIB + 7, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1, 2**32, size - 1]
    with open(path, "wb") as f:
        f.truncate(size)
        for offset in offsets:
            if offset < size:
                f.seek(offset)
                f.write(offset.to_bytes(8, "little")[: size - offset])


@pytest.mark.slow
@pytest.mark.parametrize("size", SPARSE_SIZES, ids=lambda s: f"2^32{s - 2**32:+d}")
def test_sparse_file_round_trip(repo_cli: Cli, worktree: Path, size: int) -> None:
    path = worktree / "sparse.bin"
    make_sparse(path, size)
    expected = hash_file(path)
    result = repo_cli.json("commit", "-m", "sparse")
    assert result["logical_bytes"] == size
    path.unlink()
    repo_cli.ok("checkout", "--force", "main")
    assert path.stat().st_size == size
    assert hash_file(path) == expected
    assert path.stat().st_blocks * 512 < 64 * MIB  # runs of zeros are written as holes
    assert repo_cli.json("fsck")["ok"] is True
