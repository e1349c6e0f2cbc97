"""Shared fixtures and helpers for the p2pvc tests.

The CLI helpers run the real command line as a subprocess
(`python -m p2pvc.cli.main`) in temporary folders, with `P2PVC_HOME` set to a
per-test folder, so each test gets its own signing key. Repository templates
are built once and copied into each test that needs content. The tree helpers
describe a working tree byte for byte (content hash, executable bit, symlink
target) without following symlinks, so two trees can be compared with ==.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import pytest

from p2pvc.objects.compress import CODEC_RAW
from p2pvc.repo import Repository
from p2pvc.store.pack import KIND_CHUNK, RECORD_HEADER
from p2pvc.worktree.statcache import RACY_WINDOW_COARSE_NS

# CLI -----------------------------------------------------------------------------

CLI_COMMAND = [sys.executable, "-m", "p2pvc.cli.main"]
CLI_TIMEOUT_S = 300  # the multi-GiB file cases hash 4 GiB in one command

# Exit codes by error category, as docs/cli.md lists them.
EXIT_USER = 3
EXIT_CONFLICT = 4
EXIT_CORRUPTION = 5
EXIT_STORAGE = 6

Arg = str | bytes | os.PathLike


@dataclass(frozen=True)
class CliResult:
    args: tuple[Arg, ...]
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)

    def describe(self) -> str:
        """Return the command, exit code and output, for assertion messages."""
        command = " ".join(os.fsdecode(a) if isinstance(a, bytes) else str(a) for a in self.args)
        return f"p2pvc {command} exited {self.returncode}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


class Cli:
    """The p2pvc command line, run as a subprocess in `cwd` with its own P2PVC_HOME."""

    def __init__(self, cwd: Path, home: Path) -> None:
        self.cwd = cwd
        self.home = home

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["P2PVC_HOME"] = str(self.home)
        return env

    def start(self, *args: Arg, cwd: Path | None = None) -> subprocess.Popen:
        """Start a command without waiting; the caller must wait for it or kill it."""
        return subprocess.Popen(
            [*CLI_COMMAND, *args],
            cwd=cwd or self.cwd,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def run(
        self,
        *args: Arg,
        cwd: Path | None = None,
        timeout: float = CLI_TIMEOUT_S,
        max_open_files: int | None = None,
    ) -> CliResult:
        """Run a command to its end; subprocess.run kills it when the timeout passes.

        `max_open_files` sets the command's soft RLIMIT_NOFILE, like `ulimit -n`.
        """
        done = subprocess.run(
            [*CLI_COMMAND, *args],
            cwd=cwd or self.cwd,
            env=self.env,
            capture_output=True,
            timeout=timeout,
            preexec_fn=None if max_open_files is None else lambda: _limit_open_files(max_open_files),
        )
        return CliResult(
            args,
            done.returncode,
            done.stdout.decode("utf-8", "backslashreplace"),
            done.stderr.decode("utf-8", "backslashreplace"),
        )

    def ok(self, *args: Arg, cwd: Path | None = None) -> CliResult:
        """Run a command that must succeed."""
        result = self.run(*args, cwd=cwd)
        assert result.returncode == 0, result.describe()
        return result

    def json(self, *args: Arg, cwd: Path | None = None) -> Any:
        """Run a command with --json that must succeed, and parse its output."""
        return self.ok(*args, "--json", cwd=cwd).json()

    def fail(self, exit_code: int, *args: Arg, cwd: Path | None = None) -> CliResult:
        """Run a command that must fail cleanly with `exit_code`."""
        result = self.run(*args, cwd=cwd)
        assert_clean_error(result, exit_code)
        return result

    def commit(self, message: str = "commit", *options: Arg) -> str:
        """Commit the working tree and return the new commit id in hex."""
        return self.json("commit", "-m", message, *options)["id"]


def _limit_open_files(limit: int) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_clean_error(result: CliResult, exit_code: int) -> None:
    """Check that an expected failure exits with its category code, prints one error line and no traceback."""
    assert result.returncode == exit_code, result.describe()
    assert len(error_lines(result.stderr)) == 1, result.describe()
    assert "Traceback" not in result.stderr, result.describe()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The P2PVC_HOME of this test, for in-process library calls and every CLI subprocess."""
    path = tmp_path / "home"
    monkeypatch.setenv("P2PVC_HOME", str(path))
    return path


@pytest.fixture
def worktree(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


@pytest.fixture
def cli(worktree: Path, home: Path) -> Cli:
    """The CLI in an empty folder that is not a repository yet."""
    return Cli(worktree, home)


# Repository templates ----------------------------------------------------------------
#
# Building a repository takes several CLI runs, and each commit waits for
# fsync. A template is built once per module or session and copied into
# each test (working tree, .p2pvc folder and signing key, like `cp -a`), so
# every test still gets its own repository and key.


@dataclass(frozen=True)
class RepoTemplate:
    worktree: Path
    home: Path
    ids: dict[str, str]  # commit ids in hex, by the labels the build function chose

    def copy_to(self, worktree: Path, home: Path) -> Cli:
        """Copy the repository, its working tree and its signing key; return a CLI on the copy."""
        shutil.copytree(self.home, home, symlinks=True, dirs_exist_ok=True)
        shutil.copytree(self.worktree, worktree, symlinks=True, dirs_exist_ok=True)
        return Cli(worktree, home)


def build_template(
    factory: pytest.TempPathFactory, name: str, build: Callable[[Cli], dict[str, str]] | None = None
) -> RepoTemplate:
    """Initialize a repository, let `build` add content and return commit ids, and keep it as a template."""
    base = factory.mktemp(name)
    cli = Cli(base / "work", base / "home")
    cli.cwd.mkdir()
    cli.ok("init")
    ids = build(cli) if build is not None else {}
    return RepoTemplate(cli.cwd, cli.home, ids)


@pytest.fixture(scope="session")
def empty_repo_template(tmp_path_factory: pytest.TempPathFactory) -> RepoTemplate:
    return build_template(tmp_path_factory, "empty-repo")


@pytest.fixture
def repo_cli(empty_repo_template: RepoTemplate, worktree: Path, home: Path) -> Cli:
    """The CLI in a freshly initialized repository without commits."""
    return empty_repo_template.copy_to(worktree, home)


# Library -------------------------------------------------------------------------


@contextlib.contextmanager
def open_repository(root: Path) -> Iterator[Repository]:
    """Open the repository at `root` in this process and close it afterwards."""
    repo = Repository.discover(root)
    try:
        yield repo
    finally:
        repo.close()


def damage_every_chunk(root: Path) -> int:
    """Flip one byte in the stored data of every chunk kept uncompressed; return how many were damaged."""
    with open_repository(root) as repo:
        entries = [e for e in repo.store.iter_entries() if e.kind == KIND_CHUNK and e.codec == CODEC_RAW]
        packs_dir = repo.store.packs_dir
    for entry in entries:
        with open(packs_dir / entry.pack_name, "r+b") as pack:
            pack.seek(entry.offset + RECORD_HEADER.size)
            byte = pack.read(1)
            pack.seek(entry.offset + RECORD_HEADER.size)
            pack.write(bytes([byte[0] ^ 0xFF]))
    return len(entries)


def damage_chunk(root: Path) -> tuple[bytes, str]:
    """Flip one byte inside the stored data of a chunk kept uncompressed, and return
    the chunk id and the BLAKE3 hex digest of the damaged bytes.

    The repository must contain such a chunk: any file of random bytes gives one.
    """
    with open_repository(root) as repo:
        entries = [e for e in repo.store.iter_entries() if e.kind == KIND_CHUNK and e.codec == CODEC_RAW]
        assert entries, "no uncompressed chunk to damage"
        entry = entries[0]
        path = repo.store.packs_dir / entry.pack_name
    data_offset = entry.offset + RECORD_HEADER.size
    with open(path, "r+b") as pack:
        pack.seek(data_offset)
        data = bytearray(pack.read(entry.stored_size))
        data[len(data) // 2] ^= 0xFF
        pack.seek(data_offset)
        pack.write(data)
    return entry.id, blake3.blake3(bytes(data)).hexdigest()


def wait_past_racy_window() -> None:
    """Sleep until files written before this call are older than the stat cache's racy window."""
    time.sleep(RACY_WINDOW_COARSE_NS / 1e9 + 0.1)


# Files and trees -------------------------------------------------------------------

HASH_BLOCK = 4 * 1024 * 1024  # bytes read at a time when hashing


def random_bytes(size: int, seed: int | str) -> bytes:
    """Return reproducible incompressible bytes."""
    return random.Random(seed).randbytes(size)


def write_file(path: Path, data: bytes, *, executable: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(0o755 if executable else 0o644)
    return path


def hash_file(path: str | bytes | os.PathLike) -> str:
    """Return the BLAKE3 hex digest of a file, read in blocks so large files never sit in memory."""
    digest = blake3.blake3()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def snapshot_tree(root: Path) -> dict[bytes, tuple]:
    """Describe every path below `root` except the `.p2pvc` folder, without following symlinks.

    Keys are paths relative to `root` as bytes with b"/" separators. Values are
    ("file", executable, size, content hash), ("symlink", target) or ("dir",).
    """
    result: dict[bytes, tuple] = {}
    base = os.fsencode(root)
    stack = [b""]
    while stack:
        rel_dir = stack.pop()
        with os.scandir(os.path.join(base, rel_dir) if rel_dir else base) as entries:
            for entry in entries:
                if entry.name == b".p2pvc":
                    continue
                rel = rel_dir + b"/" + entry.name if rel_dir else entry.name
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    result[rel] = ("symlink", os.readlink(entry.path))
                elif stat.S_ISDIR(st.st_mode):
                    result[rel] = ("dir",)
                    stack.append(rel)
                elif stat.S_ISREG(st.st_mode):
                    result[rel] = ("file", bool(st.st_mode & stat.S_IXUSR), st.st_size, hash_file(entry.path))
                else:
                    result[rel] = ("other", stat.S_IFMT(st.st_mode))
    return result


def clear_worktree(root: Path) -> None:
    """Delete everything below `root` except the `.p2pvc` folder, without following symlinks."""
    base = os.fsencode(root)
    for name in os.listdir(base):
        if name == b".p2pvc":
            continue
        path = os.path.join(base, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)  # removes symlinks inside without following them
        else:
            os.unlink(path)


# Nodes as separate processes (tests/netproc) --------------------------------------------------


@pytest.fixture
def registry():
    """The processes a test starts; each one still running is killed by pid when the test ends."""
    from netproc.nodes import ProcessRegistry

    registry = ProcessRegistry()
    try:
        yield registry
    finally:
        registry.kill_all()


@pytest.fixture
def make_node(tmp_path: Path, registry):
    """Return a factory of p2pvc nodes, each in its own folder below tmp_path with its own identity."""
    from netproc.nodes import Node

    def make(name: str):
        return Node(name, tmp_path, registry)

    return make
