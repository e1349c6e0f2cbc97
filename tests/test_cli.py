"""End-to-end tests of every p2pvc command, run as real subprocesses.

Each test has its own repository and signing key in temporary folders,
usually a copy of a template built once per module. An expected failure must
exit with the code of its category (see docs/cli.md) and print exactly one
`error:` line and no traceback.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

from p2pvc.identity.keys import KEY_FILE_NAME, SEED_SIZE, Identity, load_or_create
from p2pvc.objects import model
from p2pvc.objects.chunker import MAX_CHUNK

from conftest import (
    EXIT_CONFLICT,
    EXIT_CORRUPTION,
    EXIT_STORAGE,
    EXIT_USER,
    Cli,
    RepoTemplate,
    build_template,
    clear_worktree,
    damage_chunk,
    damage_every_chunk,
    hash_file,
    open_repository,
    random_bytes,
    snapshot_tree,
    write_file,
)

KIB = 1024


def by_path(changes: list[dict]) -> dict[str, dict]:
    return {c["path"]: c for c in changes}


def statuses(changes: list[dict]) -> dict[str, str]:
    return {c["path"]: c["status"] for c in changes}


def head_of(cli: Cli) -> tuple[str | None, str | None]:
    """Return (ref, head commit id) from status --json."""
    status = cli.json("status")
    return status["ref"], status["head"]


def build_two_commits(cli: Cli) -> dict[str, str]:
    """Commit `a` = "one" and `b`, then `a` = "two", on main."""
    (cli.cwd / "a").write_text("one")
    (cli.cwd / "b").write_text("b")
    first = cli.commit("first")
    (cli.cwd / "a").write_text("two")
    return {"first": first, "second": cli.commit("second")}


@pytest.fixture(scope="module")
def two_commits_template(tmp_path_factory: pytest.TempPathFactory) -> RepoTemplate:
    return build_template(tmp_path_factory, "two-commits", build_two_commits)


@pytest.fixture
def two_commits(two_commits_template: RepoTemplate, worktree: Path, home: Path) -> tuple[Cli, str, str]:
    """A repository where `a` is "one" in the first commit and "two" in the second (main)."""
    cli = two_commits_template.copy_to(worktree, home)
    return cli, two_commits_template.ids["first"], two_commits_template.ids["second"]


# init --------------------------------------------------------------------------------


def test_version_matches_package(cli: Cli) -> None:
    from importlib.metadata import version

    result = cli.ok("--version")
    assert result.stdout == f"p2pvc {version('p2pvc')}\n"
    assert "--version" in cli.ok("--help").stdout


def test_init_json_fields(cli: Cli, worktree: Path) -> None:
    result = cli.json("init")
    assert result["path"] == str(worktree)
    assert len(bytes.fromhex(result["repository"])) == 32
    assert result["branch"] == "main"
    assert (worktree / ".p2pvc" / "index.sqlite").is_file()


def test_init_directory_argument(cli: Cli, worktree: Path) -> None:
    cli.ok("init", "sub")
    assert (worktree / "sub" / ".p2pvc").is_dir()


def test_init_twice_fails(repo_cli: Cli) -> None:
    repo_cli.fail(EXIT_USER, "init")


def test_init_blocked_path_fails(cli: Cli, worktree: Path) -> None:
    (worktree / "file").write_text("not a folder")
    cli.fail(EXIT_STORAGE, "init", "file/sub")


# id ------------------------------------------------------------------------------------


def test_id_key_file_mode(cli: Cli, home: Path) -> None:
    cli.ok("id")
    assert (home / KEY_FILE_NAME).stat().st_mode & 0o777 == 0o600


def test_id_json_matches_key(cli: Cli, home: Path) -> None:
    identity_json = cli.json("id")
    seed = (home / KEY_FILE_NAME).read_bytes()[-SEED_SIZE:]
    assert identity_json["public_key"] == Identity.from_seed(seed).public_key.hex()
    assert identity_json["fingerprint"] == Identity.from_seed(seed).fingerprint
    assert identity_json["key_file"] == str(home / KEY_FILE_NAME)


def test_seed_never_printed(cli: Cli, home: Path, worktree: Path) -> None:
    outputs = [cli.ok("init"), cli.ok("id"), cli.ok("id", "--json")]
    (worktree / "a").write_text("a")
    outputs += [cli.ok("commit", "-m", "x", "--json"), cli.ok("log", "--json")]
    seed = (home / KEY_FILE_NAME).read_bytes()[-SEED_SIZE:]
    text = "".join(r.stdout + r.stderr for r in outputs)
    for encoded in (seed.hex(), seed.hex().upper(), base64.b64encode(seed).decode(), base64.b64encode(seed)[:20].decode()):
        assert encoded not in text


@pytest.mark.parametrize(
    ("damage", "exit_code"),
    [
        pytest.param("mode-0644", EXIT_USER, id="readable-by-others"),
        pytest.param("garbage", EXIT_USER, id="not-a-key-file"),
        pytest.param("folder", EXIT_STORAGE, id="unreadable"),
    ],
)
def test_id_damaged_key_fails(cli: Cli, home: Path, damage: str, exit_code: int) -> None:
    load_or_create(home)
    key = home / KEY_FILE_NAME
    if damage == "mode-0644":
        key.chmod(0o644)
    elif damage == "garbage":
        key.write_bytes(b"not a key")
    else:
        key.unlink()
        key.mkdir()
    cli.fail(exit_code, "id")


# Repository discovery ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("status",),
        ("add", "a"),
        ("commit", "-m", "x"),
        ("log",),
        ("show",),
        ("diff",),
        ("checkout", "main"),
        ("restore", "a"),
        ("branch",),
        ("tag",),
        ("fsck",),
        ("gc",),
        ("stats",),
    ],
    ids=lambda args: args[0],
)
def test_command_outside_repository(cli: Cli, args: tuple[str, ...]) -> None:
    cli.fail(EXIT_USER, *args)


def test_directory_option_status(repo_cli: Cli, tmp_path: Path, worktree: Path) -> None:
    assert repo_cli.json("-C", str(worktree), "status", cwd=tmp_path)["ref"] == "refs/heads/main"


@pytest.mark.parametrize(
    ("args", "is_applied"),
    [
        pytest.param(("restore", "a"), lambda worktree: (worktree / "a").read_text() == "two", id="restore"),
        pytest.param(("add", "a"), lambda worktree: True, id="add"),
        pytest.param(("init", "sub"), lambda worktree: (worktree / "sub" / ".p2pvc").is_dir(), id="init"),
    ],
)
def test_directory_option_paths(two_commits, tmp_path: Path, worktree: Path, args: tuple[str, ...], is_applied) -> None:
    """Relative path arguments are relative to the -C folder."""
    cli, _first, _second = two_commits
    (worktree / "a").write_text("edited")
    result = cli.run("-C", str(worktree), *args, cwd=tmp_path)
    assert result.returncode == 0, result.describe()
    assert is_applied(worktree)


def test_subfolder_finds_repository(repo_cli: Cli, worktree: Path) -> None:
    (worktree / "sub").mkdir()
    assert repo_cli.json("status", cwd=worktree / "sub")["ref"] == "refs/heads/main"


def test_format_mismatch_fails(repo_cli: Cli, worktree: Path) -> None:
    with contextlib.closing(sqlite3.connect(worktree / ".p2pvc" / "index.sqlite")) as conn:
        with conn:
            conn.execute("UPDATE meta SET value = ? WHERE key = 'format'", (b"2",))
    repo_cli.fail(EXIT_STORAGE, "status")


# status --------------------------------------------------------------------------------------


def test_status_no_commits(repo_cli: Cli, worktree: Path) -> None:
    (worktree / "a").write_text("a")
    status = repo_cli.json("status")
    assert status["head"] is None
    assert status["ref"] == "refs/heads/main"
    assert statuses(status["changes"]) == {"a": "added"}


def test_status_clean_tree(two_commits) -> None:
    cli, _first, second = two_commits
    assert cli.json("status") == {
        "ref": "refs/heads/main",
        "head": second,
        "base": second,
        "changes": [],
        "skipped": [],
        "conflicted_refs": [],
    }
    assert "Nothing changed." in cli.ok("status").stdout


def test_status_lists_changes(two_commits, worktree: Path) -> None:
    cli, _first, _second = two_commits
    (worktree / "a").write_text("three")
    (worktree / "b").unlink()
    (worktree / "c").write_text("new")
    changes = by_path(cli.json("status")["changes"])
    assert statuses(changes.values()) == {"a": "modified", "b": "removed", "c": "added"}
    assert changes["a"]["old"]["size"] == 3
    assert changes["a"]["new"]["size"] == 5
    assert changes["b"]["new"] is None


def test_status_text_lines(two_commits, worktree: Path) -> None:
    cli, _first, second = two_commits
    (worktree / "a").write_text("three")
    lines = cli.ok("status").stdout.splitlines()
    assert lines[0] == f"On main at {second[:12]}"
    assert lines[1].split() == ["modified", "a"]


def test_status_executable_change(two_commits, worktree: Path) -> None:
    cli, _first, _second = two_commits
    (worktree / "a").chmod(0o755)
    changes = cli.json("status")["changes"]
    assert statuses(changes) == {"a": "modified"}
    assert changes[0]["new"]["executable"] is True


def test_status_skips_fifo(two_commits, worktree: Path) -> None:
    cli, _first, _second = two_commits
    os.mkfifo(worktree / "pipe")
    status = cli.json("status")
    assert [s["path"] for s in status["skipped"]] == ["pipe"]
    assert status["changes"] == []


# add -------------------------------------------------------------------------------------------


def test_add_stores_content(repo_cli: Cli, worktree: Path) -> None:
    write_file(worktree / "data.bin", random_bytes(300 * KIB, "add"))
    assert repo_cli.ok("add", "data.bin").stdout.startswith("Stored 1 file(s)")
    assert repo_cli.json("stats")["unique_chunk_bytes"] == 300 * KIB
    assert repo_cli.json("commit", "-m", "after add")["new_bytes"] == 0


def test_add_folder_counts_files(repo_cli: Cli, worktree: Path) -> None:
    for name in ("d/x", "d/y", "d/e/z"):
        write_file(worktree / name, name.encode())
    assert repo_cli.ok("add", "d").stdout.startswith("Stored 3 file(s)")


def test_add_root_folder(repo_cli: Cli, worktree: Path) -> None:
    write_file(worktree / "a", b"a")
    write_file(worktree / "d" / "b", b"b")
    assert repo_cli.ok("add", ".").stdout.startswith("Stored 2 file(s)")


@pytest.mark.parametrize("path", ["missing", "ignored.log", "../outside"])
def test_add_bad_path_fails(repo_cli: Cli, worktree: Path, path: str) -> None:
    (worktree / ".p2pvcignore").write_text("*.log\n")
    (worktree / "ignored.log").write_text("x")
    (worktree.parent / "outside").write_text("x")
    repo_cli.fail(EXIT_USER, "add", path)


# commit -----------------------------------------------------------------------------------------


def test_commit_json_fields(repo_cli: Cli, worktree: Path) -> None:
    write_file(worktree / "a", b"12345")
    write_file(worktree / "d/b", random_bytes(100 * KIB, "b"))
    result = repo_cli.json("commit", "-m", "first")
    assert result["ref"] == "refs/heads/main"
    assert result["parents"] == []
    assert result["files"] == 2
    assert result["logical_bytes"] == 5 + 100 * KIB
    assert result["new_bytes"] == 5 + 100 * KIB
    assert result["files_read"] == 2
    assert statuses(result["changes"]) == {"a": "added", "d/b": "added"}


def test_commit_second_parent_link(two_commits) -> None:
    cli, first, second = two_commits
    assert cli.json("show", second)["parents"] == [first]


def test_commit_text_output(repo_cli: Cli, worktree: Path) -> None:
    (worktree / "a").write_text("a")
    first_line = repo_cli.ok("commit", "-m", "hello\nbody").stdout.splitlines()[0]
    assert first_line.startswith("[main ")
    assert first_line.endswith("] hello")


def test_commit_meta_repeated(repo_cli: Cli, worktree: Path) -> None:
    (worktree / "a").write_text("a")
    repo_cli.ok("commit", "-m", "m", "--meta", "step=12000", "--meta", "lr=0.1", "--meta", "note=a=b")
    assert repo_cli.json("log")[0]["metadata"] == {"lr": "0.1", "note": "a=b", "step": "12000"}
    assert "Meta:   lr=0.1 note=a=b step=12000" in repo_cli.ok("log").stdout


def test_commit_nothing_fails(two_commits) -> None:
    cli, _first, second = two_commits
    cli.fail(EXIT_USER, "commit", "-m", "again")
    assert head_of(cli)[1] == second


def test_commit_allow_empty(two_commits) -> None:
    cli, _first, second = two_commits
    empty = cli.json("commit", "-m", "again", "--allow-empty")
    assert empty["parents"] == [second]
    assert empty["changes"] == []
    assert cli.json("show", empty["id"])["tree"] == cli.json("show", second)["tree"]


def test_commit_first_empty_tree(repo_cli: Cli) -> None:
    """The first commit of an empty tree needs no --allow-empty."""
    assert repo_cli.json("commit", "-m", "empty")["files"] == 0


@pytest.mark.parametrize("item", ["novalue", "=v", ""])
def test_commit_meta_syntax_fails(repo_cli: Cli, worktree: Path, item: str) -> None:
    (worktree / "a").write_text("a")
    repo_cli.fail(EXIT_USER, "commit", "-m", "m", "--meta", item)


@pytest.mark.parametrize("item", ["\x01key=v", "k=" + "v" * 4097, "k" * 129 + "=v"], ids=["control-key", "long-value", "long-key"])
def test_commit_meta_invalid_user_error(repo_cli: Cli, worktree: Path, item: str) -> None:
    (worktree / "a").write_text("a")
    repo_cli.fail(EXIT_USER, "commit", "-m", "m", "--meta", item)


def test_commit_long_message_rejected(two_commits, worktree: Path) -> None:
    cli, _first, second = two_commits
    (worktree / "a").write_text("three")
    result = cli.run("commit", "-m", "m" * (model.MAX_MESSAGE_BYTES + 1))
    assert result.returncode == EXIT_USER, result.describe()
    assert cli.json("log", "-n", "1")[0]["id"] == second


def test_commit_detached_head(two_commits, worktree: Path) -> None:
    cli, first, second = two_commits
    cli.ok("checkout", first)
    (worktree / "c").write_text("c")
    detached = cli.json("commit", "-m", "detached")
    assert detached["ref"] is None
    assert detached["parents"] == [first]
    assert head_of(cli) == (None, detached["id"])
    assert cli.json("log", "main", "-n", "1")[0]["id"] == second


# log ---------------------------------------------------------------------------------------------


def build_history(cli: Cli) -> dict[str, str]:
    ids = {}
    for step in (1, 2, 3):
        (cli.cwd / "a").write_text(str(step))
        meta = ["--meta", f"step={step}"] + (["--meta", "run=a"] if step < 3 else [])
        ids[str(step)] = cli.commit(f"step {step}", *meta)
    return ids


@pytest.fixture(scope="module")
def history_template(tmp_path_factory: pytest.TempPathFactory) -> RepoTemplate:
    return build_template(tmp_path_factory, "history", build_history)


@pytest.fixture
def history(history_template: RepoTemplate, worktree: Path, home: Path) -> tuple[Cli, list[str]]:
    """Three commits on main with metadata step=1..3, and run=a on the first two."""
    cli = history_template.copy_to(worktree, home)
    return cli, [history_template.ids[str(step)] for step in (1, 2, 3)]


def test_log_newest_first(history) -> None:
    cli, ids = history
    assert [c["id"] for c in cli.json("log")] == ids[::-1]


def test_log_max_count(history) -> None:
    cli, ids = history
    assert [c["id"] for c in cli.json("log", "-n", "2")] == [ids[2], ids[1]]


def test_log_max_count_zero(history) -> None:
    cli, _ids = history
    assert cli.json("log", "-n", "0") == []


@pytest.mark.parametrize(
    ("filters", "steps"),
    [
        pytest.param(["step=2"], [2], id="one-key"),
        pytest.param(["run=a"], [2, 1], id="shared-value"),
        pytest.param(["run=a", "step=1"], [1], id="all-must-match"),
        pytest.param(["step=9"], [], id="no-match"),
    ],
)
def test_log_meta_filter(history, filters: list[str], steps: list[int]) -> None:
    cli, ids = history
    args = [arg for f in filters for arg in ("--meta", f)]
    assert [c["id"] for c in cli.json("log", *args)] == [ids[s - 1] for s in steps]


def test_log_json_fields(history, home: Path) -> None:
    cli, ids = history
    entry = cli.json("log", "-n", "1")[0]
    assert entry["parents"] == [ids[1]]
    assert entry["message"] == "step 3"
    assert entry["signature_valid"] is True
    assert entry["refs"] == ["refs/heads/main"]
    assert entry["author"] == cli.json("id")["public_key"]


def test_log_text_format(history) -> None:
    cli, ids = history
    lines = cli.ok("log", "-n", "1").stdout.splitlines()
    assert lines[0] == f"commit {ids[2]} (main)"
    assert lines[1].startswith("Author: ")
    assert "    step 3" in lines


def test_log_from_revision(history) -> None:
    cli, ids = history
    assert [c["id"] for c in cli.json("log", "HEAD~1")] == [ids[1], ids[0]]


def test_log_unknown_revision(history) -> None:
    cli, _ids = history
    cli.fail(EXIT_USER, "log", "nope")


def test_log_no_commits_fails(repo_cli: Cli) -> None:
    repo_cli.fail(EXIT_USER, "log")


def forge_commit(root: Path) -> str:
    """Put a commit whose signature does not verify on top of main, through the library."""
    with open_repository(root) as repo:
        head = repo.resolve("HEAD")
        parent = repo.read_commit(head).commit
        signed = repo.sign_commit(replace(parent, parents=(head,), message="signed text", time_ms=parent.time_ms + 1))
        forged = replace(signed, message="changed after signing")
        with repo.store.session() as session:
            forged_id = session.put_object(forged)
        repo.set_ref("refs/heads/main", forged_id, expected=head)
    return forged_id.hex()


def test_log_marks_bad_signature(two_commits, worktree: Path) -> None:
    cli, _first, second = two_commits
    forged = forge_commit(worktree)
    lines = cli.ok("log").stdout.splitlines()
    assert f"commit {forged} (main)  [BAD SIGNATURE]" in lines
    assert f"commit {second}" in lines


def test_log_json_bad_signature(two_commits, worktree: Path) -> None:
    cli, _first, second = two_commits
    forged = forge_commit(worktree)
    valid = {c["id"]: c["signature_valid"] for c in cli.json("log")}
    assert valid[forged] is False
    assert valid[second] is True


def test_fsck_reports_bad_signature(two_commits, worktree: Path) -> None:
    cli, _first, _second = two_commits
    forged = forge_commit(worktree)
    result = cli.run("fsck", "--json")
    assert result.returncode == EXIT_CORRUPTION, result.describe()
    assert [(p["kind"], p["object"]) for p in result.json()["problems"]] == [("bad-signature", forged)]


# show ----------------------------------------------------------------------------------------------


def test_show_json_fields(two_commits) -> None:
    cli, first, second = two_commits
    commit_json = cli.json("show")
    assert commit_json["id"] == second
    assert commit_json["parents"] == [first]
    assert commit_json["message"] == "second"
    assert commit_json["signature_valid"] is True
    assert commit_json["refs"] == ["refs/heads/main"]
    assert statuses(commit_json["changes"]) == {"a": "modified"}
    assert commit_json["changes"][0]["new_bytes"] == 3


def test_show_text_lists_change(two_commits) -> None:
    cli, _first, second = two_commits
    lines = cli.ok("show", second[:10]).stdout.splitlines()
    assert lines[0] == f"commit {second} (main)"
    assert lines[-2].split()[:2] == ["modified", "a"]


def test_show_root_commit_files(two_commits) -> None:
    cli, first, _second = two_commits
    assert statuses(cli.json("show", first)["changes"]) == {"a": "added", "b": "added"}


def test_show_unknown_revision(two_commits) -> None:
    cli, _first, _second = two_commits
    cli.fail(EXIT_USER, "show", "0000000000")


@pytest.mark.parametrize("rev", ["HEAD~1", "@~1", "main^", "main~1", "old", "v1", "FIRST_PREFIX"])
def test_revision_syntax_forms(targets, rev: str) -> None:
    cli, first, _second = targets
    rev = first[:8] if rev == "FIRST_PREFIX" else rev
    assert cli.json("show", rev)["id"] == first


@pytest.mark.parametrize("rev", ["HEAD~2", "HEAD^^", "main~5"])
def test_revision_past_root_fails(two_commits, rev: str) -> None:
    cli, _first, _second = two_commits
    cli.fail(EXIT_USER, "show", rev)


# diff -------------------------------------------------------------------------------------------------


def build_diff_repo(cli: Cli) -> dict[str, str]:
    worktree = cli.cwd
    write_file(worktree / "keep", random_bytes(300 * KIB, "keep"))
    write_file(worktree / "grow", random_bytes(600 * KIB, "grow"))
    write_file(worktree / "gone", b"gone")
    base = cli.commit("base")
    with open(worktree / "grow", "ab") as f:
        f.write(random_bytes(100 * KIB, "appended"))
    shutil.copyfile(worktree / "keep", worktree / "copy")
    write_file(worktree / "fresh", random_bytes(200 * KIB, "fresh"))
    (worktree / "gone").unlink()
    return {"base": base}


@pytest.fixture(scope="module")
def diff_template(tmp_path_factory: pytest.TempPathFactory) -> RepoTemplate:
    return build_template(tmp_path_factory, "diff", build_diff_repo)


@pytest.fixture
def diff_repo(diff_template: RepoTemplate, worktree: Path, home: Path) -> tuple[Cli, str]:
    """A commit with keep, grow and gone; then the working tree grows `grow`, copies `keep`,
    adds `fresh` and deletes `gone`."""
    return diff_template.copy_to(worktree, home), diff_template.ids["base"]


def check_diff_entries(changes: dict[str, dict]) -> None:
    assert statuses(changes.values()) == {"copy": "added", "fresh": "added", "gone": "removed", "grow": "modified"}
    assert changes["grow"]["old"]["size"] == 600 * KIB
    assert changes["grow"]["new"]["size"] == 700 * KIB
    assert 100 * KIB <= changes["grow"]["new_bytes"] <= 100 * KIB + 2 * MAX_CHUNK
    assert changes["copy"]["new_bytes"] == 0
    assert changes["fresh"]["new_bytes"] == 200 * KIB
    assert changes["gone"]["new_bytes"] == 0


def test_diff_worktree_json(diff_repo) -> None:
    cli, _base = diff_repo
    result = cli.json("diff")
    changes = by_path(result["changes"])
    check_diff_entries(changes)
    assert result["old"] == "HEAD"
    assert result["new"] == "working tree"
    assert result["new_bytes"] == sum(c["new_bytes"] for c in changes.values())


def test_diff_two_revisions(diff_repo) -> None:
    cli, base = diff_repo
    after = cli.commit("after")
    result = cli.json("diff", base, after)
    check_diff_entries(by_path(result["changes"]))
    assert result["new"] == after


def test_diff_reversed_revisions(diff_repo) -> None:
    cli, base = diff_repo
    after = cli.commit("after")
    changes = cli.json("diff", after, base)["changes"]
    assert statuses(changes) == {"copy": "removed", "fresh": "removed", "gone": "added", "grow": "modified"}


def test_diff_predicts_commit_bytes(diff_repo) -> None:
    """Without earlier `add`, the working-tree diff's new bytes are what the commit stores."""
    cli, _base = diff_repo
    assert cli.json("diff")["new_bytes"] == cli.json("commit", "-m", "after")["new_bytes"]


def test_diff_total_counts_once(repo_cli: Cli, worktree: Path) -> None:
    data = random_bytes(200 * KIB, "twice")
    write_file(worktree / "one", data)
    write_file(worktree / "two", data)
    assert repo_cli.json("diff")["new_bytes"] == len(data)


def test_diff_text_summary(diff_repo) -> None:
    cli, _base = diff_repo
    lines = cli.ok("diff").stdout.splitlines()
    assert lines[0] == "HEAD -> working tree"
    assert lines[-1].startswith("4 path(s) changed, ")


def test_diff_writes_nothing(diff_repo) -> None:
    cli, _base = diff_repo
    before = cli.json("stats")
    cli.ok("diff")
    assert cli.json("stats") == before


def test_diff_unknown_revision(diff_repo) -> None:
    cli, _base = diff_repo
    cli.fail(EXIT_USER, "diff", "nope")


# checkout and switch --------------------------------------------------------------------------------


def build_targets(cli: Cli) -> dict[str, str]:
    ids = build_two_commits(cli)
    cli.ok("branch", "old", ids["first"])
    cli.ok("tag", "v1", ids["first"])
    return ids


@pytest.fixture(scope="module")
def targets_template(tmp_path_factory: pytest.TempPathFactory) -> RepoTemplate:
    return build_template(tmp_path_factory, "targets", build_targets)


@pytest.fixture
def targets(targets_template: RepoTemplate, worktree: Path, home: Path) -> tuple[Cli, str, str]:
    """two_commits plus branch `old` and tag `v1` at the first commit."""
    cli = targets_template.copy_to(worktree, home)
    return cli, targets_template.ids["first"], targets_template.ids["second"]


TARGET_KINDS = ["commit", "branch", "tag"]


def target_rev(kind: str, first: str) -> str:
    return {"commit": first, "branch": "old", "tag": "v1"}[kind]


@pytest.mark.parametrize("kind", TARGET_KINDS)
def test_checkout_rejects_uncommitted(targets, worktree: Path, kind: str) -> None:
    cli, first, second = targets
    (worktree / "a").write_text("local edit")
    cli.fail(EXIT_CONFLICT, "checkout", target_rev(kind, first))
    cli.fail(EXIT_CONFLICT, "switch", target_rev(kind, first))
    assert (worktree / "a").read_text() == "local edit"
    assert head_of(cli) == ("refs/heads/main", second)


@pytest.mark.parametrize(
    ("kind", "command"), [("commit", "checkout"), ("branch", "switch"), ("tag", "checkout")]
)
def test_checkout_force_discards(targets, worktree: Path, kind: str, command: str) -> None:
    cli, first, _second = targets
    (worktree / "a").write_text("local edit")
    cli.ok(command, "--force", target_rev(kind, first))
    assert (worktree / "a").read_text() == "one"
    assert head_of(cli) == (("refs/heads/old" if kind == "branch" else None), first)


@pytest.mark.parametrize("kind", TARGET_KINDS)
def test_checkout_clean_switches(targets, worktree: Path, kind: str) -> None:
    cli, first, _second = targets
    output = cli.ok("switch", target_rev(kind, first)).stdout
    assert (worktree / "a").read_text() == "one"
    assert output.startswith("Switched to branch old" if kind == "branch" else "Switched to detached HEAD")
    assert cli.json("status")["changes"] == []


def test_switch_branch_commit_moves_branch(targets, worktree: Path) -> None:
    cli, first, second = targets
    cli.ok("switch", "old")
    (worktree / "c").write_text("c")
    new = cli.commit("on old")
    assert cli.json("show", "old")["id"] == new
    assert cli.json("show", "main")["id"] == second
    assert cli.json("show", new)["parents"] == [first]


def test_checkout_untracked_in_way(two_commits, worktree: Path) -> None:
    cli, first, _second = two_commits
    (worktree / "c").write_text("committed c")
    third = cli.commit("add c")
    cli.ok("checkout", first)
    (worktree / "c").write_text("untracked c")
    cli.fail(EXIT_CONFLICT, "checkout", third)
    assert (worktree / "c").read_text() == "untracked c"
    cli.ok("checkout", "--force", third)
    assert (worktree / "c").read_text() == "committed c"


def test_checkout_keeps_unrelated_untracked(two_commits, worktree: Path) -> None:
    cli, first, _second = two_commits
    (worktree / "notes.txt").write_text("mine")
    cli.ok("checkout", first)
    assert (worktree / "notes.txt").read_text() == "mine"


def test_checkout_rejects_removing_modified(two_commits, worktree: Path) -> None:
    """A modified file that the target does not have blocks the checkout."""
    cli, first, _second = two_commits
    (worktree / "c").write_text("c")
    cli.commit("add c")
    (worktree / "c").write_text("edited")
    cli.fail(EXIT_CONFLICT, "checkout", first)
    assert (worktree / "c").read_text() == "edited"


def test_checkout_unknown_revision(two_commits) -> None:
    cli, _first, _second = two_commits
    cli.fail(EXIT_USER, "checkout", "nope")


# restore -------------------------------------------------------------------------------------------


def test_restore_from_revision(two_commits, worktree: Path) -> None:
    cli, _first, _second = two_commits
    (worktree / "b").write_text("local b")
    cli.ok("restore", "a", "--source", "HEAD~1")
    assert (worktree / "a").read_text() == "one"
    assert (worktree / "b").read_text() == "local b"
    assert statuses(cli.json("status")["changes"]) == {"a": "modified", "b": "modified"}


@pytest.mark.parametrize("damage", ["edit", "delete"])
def test_restore_default_head(two_commits, worktree: Path, damage: str) -> None:
    cli, _first, _second = two_commits
    if damage == "edit":
        (worktree / "a").write_text("local edit")
    else:
        (worktree / "a").unlink()
    cli.ok("restore", "a")
    assert (worktree / "a").read_text() == "two"


def test_restore_whole_folder(repo_cli: Cli, worktree: Path) -> None:
    write_file(worktree / "d/x", b"x")
    write_file(worktree / "d/e/y", b"y", executable=True)
    repo_cli.commit("folder")
    before = snapshot_tree(worktree)
    shutil.rmtree(worktree / "d")
    repo_cli.ok("restore", "d")
    assert snapshot_tree(worktree) == before


def test_restore_removes_nothing(two_commits, worktree: Path) -> None:
    cli, first, _second = two_commits
    (worktree / "c").write_text("c")
    cli.commit("add c")
    cli.ok("restore", ".", "--source", first)
    assert (worktree / "c").read_text() == "c"


@pytest.mark.parametrize(
    "args",
    [("missing",), ("a", "--source", "nope"), ("../outside",)],
    ids=["path-not-in-source", "unknown-source", "outside-worktree"],
)
def test_restore_bad_input_fails(two_commits, args: tuple[str, ...]) -> None:
    cli, _first, _second = two_commits
    cli.fail(EXIT_USER, "restore", *args)


# branch ----------------------------------------------------------------------------------------------


def test_branch_create_and_list(two_commits) -> None:
    cli, first, second = two_commits
    assert cli.ok("branch", "side", "HEAD~1").stdout.startswith(f"Created branch side at {first[:12]}")
    listed = {b["name"]: (b["target"], b["current"]) for b in cli.json("branch")}
    assert listed == {"main": (second, True), "side": (first, False)}


def test_branch_text_marks_current(two_commits) -> None:
    cli, _first, _second = two_commits
    cli.ok("branch", "side")
    lines = [line.split()[:2] for line in cli.ok("branch").stdout.splitlines()]
    assert lines == [["*", "main"], ["side", lines[1][1]]]


def test_branch_delete_removes(two_commits) -> None:
    cli, _first, _second = two_commits
    cli.ok("branch", "side")
    cli.ok("branch", "-d", "side")
    assert [b["name"] for b in cli.json("branch")] == ["main"]
    cli.fail(EXIT_USER, "show", "side")


@pytest.mark.parametrize("args", [("side", "-d"), ("side", "--delete"), ("--delete", "side", "--force")])
def test_branch_delete_options_after_name(two_commits, args: tuple[str, ...]) -> None:
    cli, _first, _second = two_commits
    cli.ok("branch", "side")
    assert cli.ok("branch", *args).stdout.startswith("Deleted branch side")
    assert [b["name"] for b in cli.json("branch")] == ["main"]


def test_branch_recreate_after_delete(two_commits) -> None:
    cli, first, _second = two_commits
    cli.ok("branch", "side")
    cli.ok("branch", "-d", "side")
    cli.ok("branch", "side", first)
    assert cli.json("show", "side")["id"] == first


@pytest.mark.parametrize("name", ["HEAD", "@"])
def test_branch_reserved_name_fails(two_commits, name: str) -> None:
    cli, _first, _second = two_commits
    cli.fail(EXIT_USER, "branch", name, "HEAD~1")


def test_branch_delete_current_fails(two_commits) -> None:
    cli, _first, _second = two_commits
    cli.fail(EXIT_USER, "branch", "-d", "main")
    assert [b["name"] for b in cli.json("branch")] == ["main"]


def test_branch_existing_fails(two_commits) -> None:
    cli, first, second = two_commits
    cli.ok("branch", "side", first)
    cli.fail(EXIT_USER, "branch", "side", second)
    assert cli.json("show", "side")["id"] == first


@pytest.mark.parametrize(
    "args", [("-d", "missing"), ("bad..name",), (".hidden",), ("a b",), ("x/",), ("side", "nope"), ("refs/tags/v1",)]
)
def test_branch_bad_input_fails(two_commits, args: tuple[str, ...]) -> None:
    cli, _first, _second = two_commits
    cli.fail(EXIT_USER, "branch", *args)


# tag ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["v1.2.3", "v0.0.1-rc.1+build.5", "release/v3"])
def test_tag_version_names(two_commits, name: str) -> None:
    cli, first, _second = two_commits
    assert cli.ok("tag", name, first).stdout.strip() == f"Tagged {first[:12]} as {name}"
    assert [(t["name"], t["target"]) for t in cli.json("tag")] == [(name, first)]


def test_tag_text_list(two_commits) -> None:
    cli, _first, second = two_commits
    cli.ok("tag", "v1.2.3")
    assert cli.ok("tag").stdout.split() == ["v1.2.3", second[:12]]


def test_tag_duplicate_fails(two_commits) -> None:
    cli, first, second = two_commits
    cli.ok("tag", "v1.2.3", first)
    cli.fail(EXIT_USER, "tag", "v1.2.3", second)
    assert cli.json("show", "v1.2.3")["id"] == first


def test_tag_stays_when_branch_moves(two_commits, worktree: Path) -> None:
    cli, _first, second = two_commits
    cli.ok("tag", "v1")
    (worktree / "a").write_text("three")
    cli.commit("third")
    assert cli.json("show", "v1")["id"] == second


@pytest.mark.parametrize("args", [("--", "-v1"), (".v1",), ("v1..2",), ("v1", "nope"), ("refs/heads/v1",)])
def test_tag_bad_input_fails(two_commits, args: tuple[str, ...]) -> None:
    cli, _first, _second = two_commits
    cli.fail(EXIT_USER, "tag", *args)


def test_branch_named_like_tag_fails(two_commits) -> None:
    cli, first, second = two_commits
    cli.ok("tag", "v1.0.0", first)
    result = cli.fail(EXIT_USER, "branch", "v1.0.0", second)
    assert "v1.0.0 is already a tag" in result.stderr
    assert cli.json("show", "v1.0.0")["id"] == first


def test_tag_named_like_branch_fails(two_commits) -> None:
    cli, first, second = two_commits
    result = cli.fail(EXIT_USER, "tag", "main", first)
    assert "main is already a branch" in result.stderr
    assert cli.json("show", "main")["id"] == second


@pytest.mark.parametrize("command", ["branch", "tag"])
def test_name_like_commit_id_fails(two_commits, command: str) -> None:
    cli, first, _second = two_commits
    result = cli.fail(EXIT_USER, command, first[:8])
    assert "looks like an abbreviated commit id" in result.stderr


def test_branch_and_tag_same_name_ambiguous(two_commits, worktree: Path) -> None:
    """A peer's records can create both; a revision must then name one explicitly."""
    cli, first, second = two_commits
    with open_repository(worktree) as repo:
        repo.set_ref("refs/tags/v2", bytes.fromhex(first), expected=None)
        repo.set_ref("refs/heads/v2", bytes.fromhex(second), expected=None)
    result = cli.fail(EXIT_USER, "checkout", "v2")
    assert "is both a branch and a tag" in result.stderr
    assert cli.json("show", "refs/tags/v2")["id"] == first
    assert cli.json("show", "refs/heads/v2")["id"] == second


# fsck --------------------------------------------------------------------------------------------------


def build_stored_repo(cli: Cli) -> dict[str, str]:
    write_file(cli.cwd / "data.bin", random_bytes(200 * KIB, "fsck"))
    return {"data": cli.commit("data")}


@pytest.fixture(scope="module")
def stored_template(tmp_path_factory: pytest.TempPathFactory) -> RepoTemplate:
    return build_template(tmp_path_factory, "stored", build_stored_repo)


@pytest.fixture
def stored_repo(stored_template: RepoTemplate, worktree: Path, home: Path) -> Cli:
    """A commit with a file of random bytes, whose chunks are stored uncompressed."""
    return stored_template.copy_to(worktree, home)


def test_fsck_clean_repository(stored_repo: Cli) -> None:
    report = stored_repo.json("fsck")
    assert report["ok"] is True
    assert report["problems"] == []
    assert report["commits"] == 1
    assert report["bytes_checked"] >= 200 * KIB
    assert stored_repo.ok("fsck").stdout.strip().endswith("no problems")


def test_fsck_flipped_byte(stored_repo: Cli, worktree: Path) -> None:
    chunk, actual = damage_chunk(worktree)
    result = stored_repo.run("fsck")
    assert result.returncode == EXIT_CORRUPTION, result.describe()
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"corrupt {chunk.hex()}: ")
    assert lines[1].split() == ["expected", chunk.hex()]
    assert lines[2].split() == ["actual", actual]


def test_fsck_json_flipped_byte(stored_repo: Cli, worktree: Path) -> None:
    chunk, actual = damage_chunk(worktree)
    result = stored_repo.run("fsck", "--json")
    assert result.returncode == EXIT_CORRUPTION, result.describe()
    [problem] = result.json()["problems"]
    assert (problem["kind"], problem["object"]) == ("corrupt", chunk.hex())
    assert problem["expected"] == chunk.hex()
    assert problem["actual"] == actual


def test_fsck_names_files_of_damaged_chunk(stored_repo: Cli, worktree: Path) -> None:
    first = stored_repo.json("log")[0]["id"]
    write_file(worktree / "notes.txt", b"unrelated\n")
    second = stored_repo.commit("notes")
    stored_repo.ok("branch", "old", first)
    damage_chunk(worktree)

    result = stored_repo.run("fsck", "--json")
    assert result.returncode == EXIT_CORRUPTION, result.describe()
    [affected] = result.json()["affected_files"]
    assert affected["path"] == "data.bin"
    assert affected["commits"] == [second, first]
    assert affected["refs"] == ["refs/heads/main", "refs/heads/old"]
    assert affected["history_refs"] == ["refs/heads/main", "refs/heads/old"]

    text = stored_repo.run("fsck").stdout
    assert "1 file version(s) need a damaged or missing object" in text
    expected = f"  data.bin in {second[:12]} and 1 older commit(s); current in refs/heads/main, refs/heads/old"
    assert expected in text.splitlines()


def test_fsck_names_refs_of_old_version(stored_repo: Cli, worktree: Path) -> None:
    first = stored_repo.json("log")[0]["id"]
    write_file(worktree / "data.bin", random_bytes(200 * KIB, "newer"))
    stored_repo.commit("newer data")
    damage_chunk(worktree)  # the first stored raw chunk: one of the older data.bin

    text = stored_repo.run("fsck").stdout
    assert f"  data.bin in {first[:12]}; in the history of refs/heads/main" in text.splitlines()


def test_fsck_text_limits_long_lists(repo_cli: Cli, worktree: Path) -> None:
    for index in range(60):
        write_file(worktree / f"shard-{index:02}.bin", random_bytes(2 * KIB, f"shard {index}"))
    repo_cli.commit("sixty shards")
    damaged = damage_every_chunk(worktree)
    assert damaged >= 60

    text = repo_cli.run("fsck").stdout.splitlines()
    assert sum(line.startswith("corrupt ") for line in text) == 50
    assert f"... and {damaged - 50} more problem(s) (fsck --json lists them all)" in text
    assert f"  ... and {damaged - 20} more (fsck --json lists them all)" in text
    assert len(repo_cli.run("fsck", "--json").json()["problems"]) == damaged


def test_fsck_repair_then_add_restores(stored_repo: Cli, worktree: Path) -> None:
    stored_repo.ok("branch", "copy")
    damage_chunk(worktree)
    repaired = stored_repo.run("fsck", "--repair", "--json")
    assert repaired.returncode == EXIT_CORRUPTION, repaired.describe()
    assert repaired.json()["forgotten"] == 1
    missing = stored_repo.run("fsck", "--json")
    [problem] = missing.json()["problems"]
    assert (problem["kind"], problem["object_kind"]) == ("missing", "chunk")
    assert problem["message"] == "chunk reachable from refs/heads/copy, refs/heads/main is missing"
    assert "or `p2pvc add PATH` for a file whose copy in the working tree is intact" in stored_repo.run("fsck").stdout

    # status must not record the file as stored while its chunk is missing, or add would skip it.
    assert stored_repo.json("status")["changes"] == []
    stored_repo.ok("add", "data.bin")
    assert stored_repo.json("fsck")["ok"] is True
    clear_worktree(worktree)
    stored_repo.ok("checkout", "--force", "main")
    assert (worktree / "data.bin").read_bytes() == random_bytes(200 * KIB, "fsck")


def test_fsck_repair_clean_repository(stored_repo: Cli) -> None:
    report = stored_repo.json("fsck", "--repair")
    assert report["ok"] is True
    assert report["forgotten"] == 0


def test_leaving_detached_commit_warns(two_commits, worktree: Path) -> None:
    cli, first, _second = two_commits
    cli.ok("checkout", first)
    assert "warning" not in cli.ok("switch", "main").stderr  # main reaches the first commit

    cli.ok("checkout", first)
    (worktree / "a").write_text("detached work")
    detached = cli.commit("on a detached HEAD")
    result = cli.ok("switch", "main")
    assert f"warning: no branch or tag reaches commit {detached[:12]}" in result.stderr
    assert f"p2pvc branch NAME {detached[:12]}" in result.stderr


def test_checkout_failure_names_partial_change(stored_repo: Cli, worktree: Path) -> None:
    first = stored_repo.json("log")[0]["id"]
    (worktree / "data.bin").unlink()
    write_file(worktree / "notes.txt", b"notes\n")
    stored_repo.commit("replace data with notes")
    damage_chunk(worktree)

    result = stored_repo.fail(EXIT_CORRUPTION, "checkout", first)
    assert "the working tree is partly changed (1 path(s) already removed or written)" in result.stderr
    assert "HEAD still names main: `p2pvc checkout --force main` goes back to it" in result.stderr
    assert not (worktree / "notes.txt").exists()
    stored_repo.ok("checkout", "--force", "main")
    assert (worktree / "notes.txt").read_bytes() == b"notes\n"


def test_checkout_corrupt_chunk_fails(stored_repo: Cli, worktree: Path) -> None:
    chunk, actual = damage_chunk(worktree)
    clear_worktree(worktree)
    result = stored_repo.fail(EXIT_CORRUPTION, "checkout", "--force", "main")
    assert f"expected: {chunk.hex()}" in result.stderr
    assert f"actual:   {actual}" in result.stderr
    assert snapshot_tree(worktree) == {}


# gc ------------------------------------------------------------------------------------------------------


def test_gc_removes_only_unreachable(repo_cli: Cli, worktree: Path) -> None:
    cli = repo_cli
    write_file(worktree / "base.bin", random_bytes(300 * KIB, "base"))
    cli.commit("base")
    main_tree = snapshot_tree(worktree)
    cli.ok("switch", "-f", "main")  # a no-op that must not disturb anything

    cli.ok("branch", "side")
    cli.ok("switch", "side")
    write_file(worktree / "side.bin", random_bytes(400 * KIB, "side"))
    side = cli.commit("side")

    cli.ok("branch", "release", "main")
    cli.ok("switch", "release")
    write_file(worktree / "release.bin", random_bytes(200 * KIB, "release"))
    release = cli.commit("release")
    cli.ok("tag", "v1.0.0")
    release_hash = hash_file(worktree / "release.bin")

    cli.ok("switch", "main")
    cli.ok("branch", "-d", "--force", "side")
    cli.ok("branch", "-d", "release")
    report = cli.json("gc")
    assert report["removed_objects"] >= 4  # side's commit, tree, manifest and chunks
    assert report["freed_bytes"] >= 400 * KIB
    assert cli.json("gc")["removed_objects"] == 0
    assert cli.json("fsck")["ok"] is True

    cli.fail(EXIT_USER, "show", side)
    assert cli.json("show", "v1.0.0")["id"] == release
    cli.ok("checkout", "v1.0.0")
    assert hash_file(worktree / "release.bin") == release_hash

    cli.ok("switch", "main")
    clear_worktree(worktree)
    cli.ok("checkout", "--force", "main")
    assert snapshot_tree(worktree) == main_tree


def test_gc_dry_run_removes_nothing(repo_cli: Cli, worktree: Path) -> None:
    write_file(worktree / "loose.bin", random_bytes(100 * KIB, "loose"))
    repo_cli.ok("add", "loose.bin")
    stats = repo_cli.json("stats")
    report = repo_cli.json("gc", "--dry-run")
    assert report["dry_run"] is True
    assert report["removed_objects"] >= 2
    assert repo_cli.json("stats") == stats


def test_gc_removes_added_content(repo_cli: Cli, worktree: Path) -> None:
    """Content stored by add but never committed is unreachable; a later commit stores it again."""
    write_file(worktree / "loose.bin", random_bytes(100 * KIB, "loose"))
    repo_cli.ok("add", "loose.bin")
    repo_cli.ok("gc")
    assert repo_cli.json("stats")["chunks"] == 0
    assert repo_cli.json("commit", "-m", "now")["new_bytes"] == 100 * KIB
    assert repo_cli.json("fsck")["ok"] is True


def test_gc_keeps_detached_head(two_commits, worktree: Path) -> None:
    cli, first, _second = two_commits
    cli.ok("checkout", first)
    (worktree / "c").write_text("detached only")
    detached = cli.commit("detached")
    cli.ok("gc")
    assert cli.json("show", detached)["id"] == detached
    assert cli.json("fsck")["ok"] is True


# stats ----------------------------------------------------------------------------------------------------


def test_stats_empty_repository(repo_cli: Cli) -> None:
    stats = repo_cli.json("stats")
    assert stats["commits"] == 0
    assert stats["dedupe_ratio"] == 1.0
    assert stats["compression_ratio"] == 1.0


def test_stats_dedupe_ratio(repo_cli: Cli, worktree: Path) -> None:
    data = random_bytes(1024 * KIB, "dedupe")
    write_file(worktree / "a.bin", data)
    repo_cli.commit("one copy")
    write_file(worktree / "b.bin", data)
    repo_cli.commit("two copies")
    stats = repo_cli.json("stats")
    assert stats["commits"] == 2
    assert stats["head_logical_bytes"] == 2 * len(data)
    assert stats["history_logical_bytes"] == 3 * len(data)
    assert stats["unique_chunk_bytes"] == len(data)
    assert stats["dedupe_ratio"] == 3.0
    assert stats["compression_ratio"] == 1.0  # random bytes are stored uncompressed


def test_stats_compression_ratio(repo_cli: Cli, worktree: Path) -> None:
    text = b"".join(b"step %d loss %.4f\n" % (i, 1 / (i + 1)) for i in range(50_000))
    write_file(worktree / "log.txt", text)
    repo_cli.commit("log")
    stats = repo_cli.json("stats")
    assert stats["unique_chunk_bytes"] == len(text)
    assert stats["compression_ratio"] > 2
    assert stats["compression_ratio"] == stats["unique_chunk_bytes"] / stats["stored_chunk_bytes"]


def test_stats_text_output(repo_cli: Cli, worktree: Path) -> None:
    write_file(worktree / "a.bin", random_bytes(10 * KIB, "text"))
    repo_cli.commit("a")
    lines = repo_cli.ok("stats").stdout.splitlines()
    assert lines[0].split() == ["commits:", "1"]
    assert lines[-2].split() == ["dedupe", "ratio:", "1.00x"]


def test_branch_delete_unmerged_needs_force(two_commits) -> None:
    cli, first, _second = two_commits
    cli.ok("branch", "side")
    cli.ok("switch", "side")
    (cli.cwd / "side.txt").write_text("only on side\n")
    cli.commit("side only")
    cli.ok("switch", "main")
    cli.fail(EXIT_USER, "branch", "-d", "side")
    cli.ok("branch", "-d", "--force", "side")
    assert [b["name"] for b in cli.json("branch")] == ["main"]


def test_commit_empty_message_fails(repo_cli) -> None:
    repo_cli.fail(EXIT_USER, "commit", "-m", "   ", "--allow-empty")


def test_commit_meta_twice_fails(repo_cli) -> None:
    repo_cli.fail(EXIT_USER, "commit", "-m", "x", "--allow-empty", "--meta", "step=1", "--meta", "step=2")
