"""A full disk during commit, on a small tmpfs mounted for each test.

A failed commit must exit with the storage code 6 and an error containing "disk
full", and leave the previous commit, the log and fsck as they were. The next
commit must work once space is freed. Mounting needs root; without it the tests are skipped.
"""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.procs import Repo, Result, cli_env, driver_argv, error_lines, finish, kill, start, wait_for_file
from support.repo_files import branch_target, commit_files, worktree_files, write_random

MiB = 1024 * 1024
DISK_SIZE = "20m"
EXIT_STORAGE = 6
# Bytes that SQLite and page rounding may still take after gc, far below the big file.
FREE_SPACE_SLACK = MiB // 4


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """Mount a 20 MiB tmpfs for the test and unmount it afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE}", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs at {mount_point}: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        unmounted = subprocess.run(["umount", str(mount_point)], capture_output=True, text=True, timeout=30)
        if unmounted.returncode != 0:
            subprocess.run(["umount", "--lazy", str(mount_point)], check=True, timeout=30)


@pytest.fixture
def repo(small_disk: Path, tmp_path: Path) -> Repo:
    """Return a repository on the small disk with one commit; the identity lives outside it."""
    root = small_disk / "work"
    root.mkdir()
    repo = Repo(root, cli_env(tmp_path / "home"))
    write_random(root / "a.bin", MiB, random.Random(21))
    (root / "notes.txt").write_text("one\n")
    result = repo.cli("init")
    assert result.returncode == 0, result.describe()
    repo.commit("base")
    return repo


def free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def fill_disk(path: Path) -> None:
    """Write `path` until the file system reports ENOSPC."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for block in (MiB, 4096, 1):
            data = b"\xa5" * block
            while True:
                try:
                    os.write(fd, data)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)


def logged_ids(repo: Repo) -> list[str]:
    result = repo.cli("log", "--json")
    assert result.returncode == 0, result.describe()
    return [entry["id"] for entry in json.loads(result.stdout)]


def add_big_file(repo: Repo) -> Path:
    """Write a file that fits on the disk but leaves less free space than its own size."""
    big = repo.root / "big.bin"
    write_random(big, free_bytes(repo.root) * 6 // 10, random.Random(22))
    return big


def test_big_file_disk_full(repo: Repo) -> None:
    head = branch_target(repo.root)
    expected = worktree_files(repo.root)
    history = logged_ids(repo)
    big = add_big_file(repo)

    failed = repo.cli("commit", "-m", "too big")

    assert failed.returncode == EXIT_STORAGE, failed.describe()
    assert "Traceback" not in failed.stderr, failed.describe()
    assert failed.stderr.startswith("error: disk full"), failed.describe()
    assert len(error_lines(failed.stderr)) == 1, failed.describe()
    fsck = repo.cli("fsck")
    assert fsck.returncode == 0, fsck.describe()
    assert logged_ids(repo) == history
    assert branch_target(repo.root) == head
    assert commit_files(repo.root, head) == expected

    big.unlink()
    (repo.root / "a.bin").unlink()
    restored = repo.cli("restore", "a.bin")
    assert restored.returncode == 0, restored.describe()
    assert worktree_files(repo.root) == expected
    (repo.root / "notes.txt").write_text("two\n")
    after = repo.commit("after freeing space")
    assert commit_files(repo.root, after) == worktree_files(repo.root)
    assert logged_ids(repo) == [after.hex(), *history]
    fsck = repo.cli("fsck")
    assert fsck.returncode == 0, fsck.describe()


def test_big_file_gc_frees_space(repo: Repo) -> None:
    add_big_file(repo)
    free_before = free_bytes(repo.root)
    failed = repo.cli("commit", "-m", "too big")
    assert failed.returncode == EXIT_STORAGE, failed.describe()

    gc = repo.cli("gc")
    assert gc.returncode == 0, gc.describe()
    assert free_bytes(repo.root) >= free_before - FREE_SPACE_SLACK


def commit_with_full_index(repo: Repo, tmp_path: Path) -> tuple[Result, Path]:
    """Run a commit that pauses after its pack is synced, fill the disk, and let it
    continue, so the index transaction is the write that fails.

    Returns (result, filler path).
    """
    (repo.root / "notes.txt").write_text("changed\n")
    ready = tmp_path / "ready"
    go = tmp_path / "go"
    hooks = ["--pause-after=p2pvc.store.pack:PackAppender.sync", "--ready-file", str(ready), "--go-file", str(go)]
    args = ["commit", "-m", "index full"]
    proc = start(driver_argv(hooks, args), repo.root, repo.env)
    filler = repo.root.parent / "filler"
    try:
        wait_for_file(ready, proc)
        fill_disk(filler)
        go.touch()
        result = finish(proc, args)
    finally:
        kill(proc)
    return result, filler


def test_index_disk_full_recovers(repo: Repo, tmp_path: Path) -> None:
    head = branch_target(repo.root)
    history = logged_ids(repo)

    failed, filler = commit_with_full_index(repo, tmp_path)

    assert failed.returncode == EXIT_STORAGE, failed.describe()
    assert "Traceback" not in failed.stderr, failed.describe()
    assert failed.stderr.startswith("error: "), failed.describe()
    assert len(error_lines(failed.stderr)) == 1, failed.describe()
    filler.unlink()
    fsck = repo.cli("fsck")
    assert fsck.returncode == 0, fsck.describe()
    assert logged_ids(repo) == history
    assert branch_target(repo.root) == head
    after = repo.commit("after freeing space")
    assert commit_files(repo.root, after) == worktree_files(repo.root)


def test_index_disk_full_message(repo: Repo, tmp_path: Path) -> None:
    failed, _filler = commit_with_full_index(repo, tmp_path)

    assert failed.returncode == EXIT_STORAGE, failed.describe()
    assert failed.stderr.startswith("error: disk full"), failed.describe()
    assert "hint: free some space" in failed.stderr, failed.describe()
