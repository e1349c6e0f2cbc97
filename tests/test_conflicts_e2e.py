"""End to end: two nodes commit to main while apart, see the conflict, and one merge resolves it everywhere.

Every step is a real `p2pvc` process (`python -m p2pvc.cli.merge_commands`,
the whole command line with the merge commands added). Each node has its
own folder and signing key (P2PVC_HOME). The network case runs `p2pvc
serve` on 127.0.0.1 only; the bundle case uses no network at all. Every
process a test starts is ended by its pid in a `finally` block.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CLI = [sys.executable, "-m", "p2pvc.cli.merge_commands"]
COMMAND_TIMEOUT_S = 120
START_TIMEOUT_S = 30.0  # serve prints "listening on" after 1-2 s on a loaded 2-core machine
SYNC_WAIT_S = 30.0  # for a serving node to finish pulling what a sync announced to it
STOP_TIMEOUT_S = 10.0
LOCALHOST = "127.0.0.1"
MAIN = "refs/heads/main"

NOTES = b"".join(b"line %d\n" % i for i in range(1, 11))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOCALHOST, 0))
        return sock.getsockname()[1]


class Node:
    """One peer: a working tree and its own signing key."""

    def __init__(self, name: str, base: Path, processes: list[subprocess.Popen]) -> None:
        self.name = name
        self.root = base / name
        self.home = base / f"{name}-home"
        self.base = base
        self.processes = processes
        self._id: dict[str, str] | None = None

    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ, P2PVC_HOME=str(self.home), PYTHONUNBUFFERED="1")

    def run(self, *args: str | os.PathLike) -> subprocess.CompletedProcess:
        cwd = self.root if self.root.exists() else self.base
        return subprocess.run(
            [*CLI, *map(str, args)], cwd=cwd, env=self.env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S
        )

    def ok(self, *args: str | os.PathLike) -> str:
        done = self.run(*args)
        assert done.returncode == 0, f"[{self.name}] p2pvc {' '.join(map(str, args))} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def json(self, *args: str | os.PathLike) -> Any:
        return json.loads(self.ok(*args, "--json"))

    @property
    def identity(self) -> dict[str, str]:
        if self._id is None:
            self._id = self.json("id")
        return self._id

    def write(self, name: str, data: bytes) -> None:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def main_state(self) -> dict[str, Any]:
        [state] = [b for b in self.json("branch") if b["ref"] == MAIN]
        return state

    def conflicts(self) -> list[dict[str, Any]]:
        return self.json("conflicts")["conflicts"]

    def serve(self) -> tuple[subprocess.Popen, str]:
        """Start `p2pvc serve` on 127.0.0.1; return the process and its address once it listens."""
        port = free_port()
        log_path = self.base / f"{self.name}-serve-{port}.log"
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                [*CLI, "serve", "--listen", LOCALHOST, "--port", str(port), "--anti-entropy", "3600"],
                cwd=self.root,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.processes.append(process)
        deadline = time.monotonic() + START_TIMEOUT_S
        while "listening on" not in log_path.read_text():
            assert process.poll() is None, f"[{self.name}] serve exited: {log_path.read_text()}"
            assert time.monotonic() < deadline, f"[{self.name}] serve did not listen: {log_path.read_text()}"
            time.sleep(0.05)
        return process, f"/ip4/{LOCALHOST}/tcp/{port}/p2p/{self.identity['peer_id']}"


def stop(process: subprocess.Popen) -> None:
    """End a process we started, by its pid: SIGTERM, then SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=STOP_TIMEOUT_S)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    try:
        yield started
    finally:
        for process in started:
            stop(process)


def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def assert_conflict(node: Node, heads: set[str], authors: set[str]) -> dict[str, Any]:
    [conflict] = node.conflicts()
    assert conflict["ref"] == MAIN
    assert {h["target"] for h in conflict["heads"]} == heads
    assert {h["updated_by"] for h in conflict["heads"]} == authors
    assert {h["commit"]["author_fingerprint"] for h in conflict["heads"]} == authors
    assert conflict["differences"], "the heads' trees should differ"
    return conflict


def edit_line(text: bytes, line: int, new: bytes) -> bytes:
    lines = text.splitlines(keepends=True)
    lines[line - 1] = new
    return b"".join(lines)


def test_conflict_resolved_over_network(tmp_path: Path, processes: list[subprocess.Popen]) -> None:
    a, b = Node("a", tmp_path, processes), Node("b", tmp_path, processes)
    a.root.mkdir()
    a.write("notes.txt", NOTES)
    a.write("model.bin", os.urandom(200_000))
    a.ok("init")
    a.ok("commit", "-m", "base")
    server, address = a.serve()
    b.ok("clone", address, b.root)
    a.ok("member", "add", b.identity["public_key"])
    b.ok("sync", address)
    stop(server)

    # Apart: both commit to main.
    a.write("notes.txt", edit_line(NOTES, 1, b"from a\n"))
    commit_a = a.json("commit", "-m", "a's change")["id"]
    b.write("notes.txt", edit_line(NOTES, 10, b"from b\n"))
    b.write("model.bin", os.urandom(200_000))
    commit_b = b.json("commit", "-m", "b's change")["id"]

    server, address = a.serve()
    b.ok("sync", address)
    assert wait_until(lambda: bool(a.conflicts()), SYNC_WAIT_S), "a never saw b's head"
    authors = {a.identity["fingerprint"], b.identity["fingerprint"]}
    assert_conflict(a, {commit_a, commit_b}, authors)
    assert_conflict(b, {commit_a, commit_b}, authors)
    assert "CONFLICT: refs/heads/main" in b.ok("status")

    merged = a.json("merge", commit_b)
    assert merged["status"] == "merged"
    assert merged["was_conflicted"] and not merged["still_conflicted"]
    assert a.conflicts() == []
    assert (a.root / "notes.txt").read_bytes() == edit_line(edit_line(NOTES, 1, b"from a\n"), 10, b"from b\n")

    b.ok("sync", address)
    assert b.conflicts() == []
    assert b.main_state()["target"] == merged["commit"]
    assert b.main_state()["heads"] == [merged["commit"]]
    assert (b.root / "notes.txt").read_bytes() == (a.root / "notes.txt").read_bytes()
    assert (b.root / "model.bin").read_bytes() == (a.root / "model.bin").read_bytes()
    stop(server)
    a.ok("fsck")
    b.ok("fsck")


def test_conflict_resolved_by_bundles(tmp_path: Path, processes: list[subprocess.Popen]) -> None:
    a, b = Node("a", tmp_path, processes), Node("b", tmp_path, processes)
    a.root.mkdir()
    a.write("notes.txt", NOTES)
    a.write("data/train.csv", b"x,y\n1,2\n")
    a.ok("init")
    a.ok("commit", "-m", "base")
    a.ok("member", "add", b.identity["public_key"])
    a.ok("bundle", "create", tmp_path / "1-full.p2b")
    b.ok("bundle", "clone", tmp_path / "1-full.p2b", b.root)
    assert (b.root / "notes.txt").read_bytes() == NOTES

    a.write("notes.txt", edit_line(NOTES, 2, b"from a\n"))
    commit_a = a.json("commit", "-m", "a's change")["id"]
    b.write("notes.txt", edit_line(NOTES, 9, b"from b\n"))
    b.write("data/extra.csv", b"z\n")
    commit_b = b.json("commit", "-m", "b's change")["id"]

    # Each side writes what it holds; the other sends only what that lacks.
    (tmp_path / "b-heads.json").write_text(b.ok("bundle", "heads"))
    (tmp_path / "a-heads.json").write_text(a.ok("bundle", "heads"))
    a.ok("bundle", "create", tmp_path / "2-a.p2b", "--since", tmp_path / "b-heads.json")
    b.ok("bundle", "create", tmp_path / "3-b.p2b", "--since", tmp_path / "a-heads.json")
    applied = b.json("bundle", "apply", tmp_path / "2-a.p2b")
    assert applied["changes"][0]["conflicted"]
    a.json("bundle", "apply", tmp_path / "3-b.p2b")
    authors = {a.identity["fingerprint"], b.identity["fingerprint"]}
    assert_conflict(a, {commit_a, commit_b}, authors)
    assert_conflict(b, {commit_a, commit_b}, authors)

    merged = b.json("merge")  # without a revision: the other head of the conflicted branch
    assert merged["status"] == "merged"
    assert b.conflicts() == []

    (tmp_path / "a-heads-2.json").write_text(a.ok("bundle", "heads"))
    b.ok("bundle", "create", tmp_path / "4-b.p2b", "--since", tmp_path / "a-heads-2.json")
    applied = a.json("bundle", "apply", tmp_path / "4-b.p2b")
    assert applied["updates_applied"] == 1
    assert a.conflicts() == []
    assert a.main_state()["target"] == merged["commit"]
    assert (a.root / "notes.txt").read_bytes() == edit_line(edit_line(NOTES, 2, b"from a\n"), 9, b"from b\n")
    assert (a.root / "data" / "extra.csv").read_bytes() == b"z\n"
    assert processes == []  # no process was started: no network at all
