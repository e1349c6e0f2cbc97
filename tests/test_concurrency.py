"""Concurrent p2pvc processes on one repository.

Commits race on one branch: each process must either succeed or fail with the
conflict exit code 4 and one error line, and the branch must keep every success.
gc must not run while a command uses the repository, because it deletes and moves
records: it fails clearly while a commit runs, and a commit waits while gc runs.

The processes run `support/hook_driver.py`, which imports p2pvc, then waits for a
start file or pauses inside a named call, so the tests control the interleaving.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from support.procs import (
    Repo,
    Result,
    cli_argv,
    cli_env,
    driver_argv,
    error_lines,
    finish,
    kill,
    start,
    wait_for_file,
)
from support.repo_files import branch_target, commit_files, worktree_files, write_random

MiB = 1024 * 1024
WRITERS = 4
SHORT_RACE_ROUNDS = 3
LONG_RACE_ROUNDS = 25
EXIT_USER = 3
EXIT_CONFLICT = 4
# Seconds a commit blocked by gc must still be running. An unblocked commit of this
# small tree ends in about 0.3 s on a 2-core VM.
BLOCKED_CHECK_S = 1.5


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Return a folder with `work`, a repository with two commits of about 3 MiB, and `home`."""
    base = tmp_path_factory.mktemp("template")
    root = base / "work"
    root.mkdir()
    repo = Repo(root, cli_env(base / "home"))
    rng = random.Random(11)
    write_random(root / "a.bin", 2 * MiB, rng)
    write_random(root / "sub" / "b.bin", MiB, rng)
    (root / "notes.txt").write_text("one\n")
    result = repo.cli("init")
    assert result.returncode == 0, result.describe()
    repo.commit("base")
    (root / "notes.txt").write_text("two\n")
    repo.commit("second")
    return base


@pytest.fixture
def repo(template: Path, tmp_path: Path) -> Repo:
    shutil.copytree(template / "work", tmp_path / "work", symlinks=True)
    shutil.copytree(template / "home", tmp_path / "home")
    return Repo(tmp_path / "work", cli_env(tmp_path / "home"))


def log_entries(repo: Repo) -> list[dict]:
    result = repo.cli("log", "--json")
    assert result.returncode == 0, result.describe()
    return json.loads(result.stdout)


class Paused:
    """A p2pvc process stopped inside a named call until `resume()`."""

    def __init__(self, repo: Repo, tmp_path: Path, name: str, hook: str, args: list[str]) -> None:
        self.args = args
        self.ready = tmp_path / f"{name}.ready"
        self.go = tmp_path / f"{name}.go"
        hooks = [hook, "--ready-file", str(self.ready), "--go-file", str(self.go)]
        self.proc = start(driver_argv(hooks, args), repo.root, repo.env)
        try:
            wait_for_file(self.ready, self.proc)
        except BaseException:
            self.stop()
            raise

    def resume(self) -> Result:
        self.go.touch()
        return finish(self.proc, self.args)

    def stop(self) -> None:
        """Kill the process unless it has ended; safe to call after `resume()`."""
        if self.proc.returncode is None:
            kill(self.proc)
            self.proc.communicate()


# Commits racing on one branch ---------------------------------------------------------


def race_commits(repo: Repo, tmp_path: Path, round_number: int) -> list[tuple[str, Result]]:
    """Start WRITERS commits at the same moment; return (writer metadata value, result) of each."""
    start_file = tmp_path / f"start-{round_number}"
    procs: list[tuple[str, subprocess.Popen, list[str]]] = []
    try:
        for writer in range(WRITERS):
            value = f"{round_number}-{writer}"
            ready = tmp_path / f"ready-{value}"
            args = ["commit", "-m", f"writer {value}", "--meta", f"writer={value}", "--allow-empty", "--json"]
            hooks = ["--start-file", str(start_file), "--ready-file", str(ready)]
            proc = start(driver_argv(hooks, args), repo.root, repo.env)
            procs.append((value, proc, args))
            wait_for_file(ready, proc)
        start_file.touch()
        return [(value, finish(proc, args)) for value, proc, args in procs]
    finally:
        for _value, proc, _args in procs:
            if proc.returncode is None:
                kill(proc)


# NOTE: until WriteSession._reuse_pack reads a pack's size under the pack's lock (see
# test_pack_reuse_race), a round can fail at log or fsck with "damaged record header":
# 1 of 3 runs of the long test failed that way on a 2-core VM.
def run_race_rounds(repo: Repo, tmp_path: Path, rounds: int) -> None:
    """Race commits for `rounds` rounds, each on new content. The writers pass
    --allow-empty, because a writer that starts after another one finished finds no change."""
    rng = random.Random(12)
    expected_count = len(log_entries(repo))
    winners: dict[str, str] = {}  # commit id -> writer metadata value
    for round_number in range(rounds):
        write_random(repo.root / "a.bin", 2 * MiB, rng)
        results = race_commits(repo, tmp_path, round_number)

        for value, result in results:
            assert result.returncode in (0, EXIT_CONFLICT), result.describe()
            assert "Traceback" not in result.stderr, result.describe()
            if result.returncode == EXIT_CONFLICT:
                assert result.stderr.startswith("error: "), result.describe()
                assert " moved to " in result.stderr.splitlines()[0], result.describe()
                assert len(error_lines(result.stderr)) == 1, result.describe()
            else:
                winners[json.loads(result.stdout)["id"]] = value
        successes = sum(1 for _value, r in results if r.returncode == 0)
        assert successes >= 1, "\n".join(r.describe() for _value, r in results)
        expected_count += successes

        entries = log_entries(repo)
        assert len(entries) == expected_count, f"round {round_number}"
        logged = {e["id"]: e["metadata"].get("writer") for e in entries}
        for commit_id, value in winners.items():
            assert logged.get(commit_id) == value, f"round {round_number}: commit {commit_id}"
        fsck = repo.cli("fsck")
        assert fsck.returncode == 0, fsck.describe()
    assert commit_files(repo.root, branch_target(repo.root)) == worktree_files(repo.root)


def test_commits_race_short(repo: Repo, tmp_path: Path) -> None:
    run_race_rounds(repo, tmp_path, SHORT_RACE_ROUNDS)


@pytest.mark.slow
def test_commits_race_long(repo: Repo, tmp_path: Path) -> None:
    run_race_rounds(repo, tmp_path, LONG_RACE_ROUNDS)


# gc against a running command -----------------------------------------------------------


def add_unreachable(repo: Repo) -> None:
    """Store a file's chunks with `p2pvc add`, then delete the file, so gc has records to drop."""
    write_random(repo.root / "scratch.bin", MiB, random.Random(13))
    result = repo.cli("add", "scratch.bin")
    assert result.returncode == 0, result.describe()
    (repo.root / "scratch.bin").unlink()


def test_gc_during_commit_fails(repo: Repo, tmp_path: Path) -> None:
    """gc started while a commit has stored its objects but not yet moved the branch
    must fail with one clear line and leave the commit's objects alone."""
    add_unreachable(repo)
    write_random(repo.root / "a.bin", 2 * MiB, random.Random(14))
    expected = worktree_files(repo.root)
    hook = "--pause-before=p2pvc.refs.refdb:RefDB.set"
    commit = Paused(repo, tmp_path, "commit", hook, ["commit", "-m", "during gc", "--json"])
    try:
        gc = repo.cli("gc")
        committed = commit.resume()
    finally:
        commit.stop()

    assert gc.returncode == EXIT_USER, gc.describe()
    assert "Traceback" not in gc.stderr, gc.describe()
    assert gc.stderr.startswith("error: another p2pvc command is using this repository"), gc.describe()
    assert committed.returncode == 0, committed.describe()
    head = bytes.fromhex(json.loads(committed.stdout)["id"])
    assert branch_target(repo.root) == head
    assert commit_files(repo.root, head) == expected
    fsck = repo.cli("fsck")
    assert fsck.returncode == 0, fsck.describe()


def test_commit_waits_for_gc(repo: Repo, tmp_path: Path) -> None:
    add_unreachable(repo)
    gc = Paused(repo, tmp_path, "gc", "--pause-before=p2pvc.ops.maintenance:_rewrite_pack", ["gc"])
    write_random(repo.root / "a.bin", 2 * MiB, random.Random(15))
    expected = worktree_files(repo.root)
    args = ["commit", "-m", "after gc", "--json"]
    commit = start(cli_argv(args), repo.root, repo.env)
    try:
        time.sleep(BLOCKED_CHECK_S)
        blocked = commit.poll() is None
        collected = gc.resume()
        committed = finish(commit, args)
    finally:
        gc.stop()
        kill(commit)

    assert blocked
    assert collected.returncode == 0, collected.describe()
    assert committed.returncode == 0, committed.describe()
    head = bytes.fromhex(json.loads(committed.stdout)["id"])
    assert commit_files(repo.root, head) == expected
    fsck = repo.cli("fsck")
    assert fsck.returncode == 0, fsck.describe()


def test_commit_between_ref_and_base(repo: Repo, tmp_path: Path) -> None:
    """A second commit that starts while the first has moved the branch but not yet
    recorded the working tree's base must commit on top of the first."""
    write_random(repo.root / "a.bin", 2 * MiB, random.Random(18))
    hook = "--pause-after=p2pvc.refs.refdb:RefDB.set"
    first = Paused(repo, tmp_path, "first", hook, ["commit", "-m", "first", "--json"])
    try:
        second = repo.cli("commit", "-m", "second", "--allow-empty", "--json")
        first_result = first.resume()
    finally:
        first.stop()

    assert first_result.returncode == 0, first_result.describe()
    assert second.returncode == 0, second.describe()


def test_log_during_gc(repo: Repo, tmp_path: Path) -> None:
    add_unreachable(repo)
    hook = "--pause-after=p2pvc.store.objectstore:ObjectStore.entry"
    log = Paused(repo, tmp_path, "log", hook, ["log"])
    try:
        gc = repo.cli("gc")
        logged = log.resume()
    finally:
        log.stop()

    assert gc.returncode in (0, EXIT_USER), gc.describe()
    assert logged.returncode == 0, logged.describe()
    fsck = repo.cli("fsck")
    assert fsck.returncode == 0, fsck.describe()


def test_pack_reuse_race(repo: Repo, tmp_path: Path) -> None:
    """A commit pauses after choosing a pack to append to and before locking it, and
    `p2pvc add` appends to that pack and commits in the meantime."""
    write_random(repo.root / "a.bin", 2 * MiB, random.Random(16))
    hook = "--pause-before=p2pvc.store.pack:PackAppender.__init__"
    commit = Paused(repo, tmp_path, "commit", hook, ["commit", "-m", "slow"])
    try:
        write_random(repo.root / "other.bin", MiB, random.Random(17))
        added = repo.cli("add", "other.bin")
        committed = commit.resume()
    finally:
        commit.stop()

    assert added.returncode == 0, added.describe()
    assert committed.returncode == 0, committed.describe()
    fsck = repo.cli("fsck")
    assert fsck.returncode == 0, fsck.describe()
