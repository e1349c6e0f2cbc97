"""p2pvc nodes as separate processes: each with its own folder, signing key and port.

Every process a test starts goes through a `ProcessRegistry`, and the test
ends each one that is still running by its pid in a `finally` block. All
addresses are on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLI_COMMAND = [sys.executable, "-m", "p2pvc.cli.main"]
COMMAND_TIMEOUT_S = 120.0  # bounds a hung command, while a network command takes about 2 s here
START_TIMEOUT_S = 30.0  # `serve` prints "listening on" after about 1-2 s on a loaded 2-core machine
STOP_LIMIT_S = 2.0  # `serve` must exit this soon after SIGTERM (p2pvc.node.runner.STOP_TIMEOUT_S)
STOP_GRACE_S = 5.0  # extra wait past STOP_LIMIT_S before a server is killed and the stop counts as failed
POLL_INTERVAL_S = 0.05
LOCALHOST = "127.0.0.1"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, then release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        return sock.getsockname()[1]


def peer_address(port: int, peer_id: str) -> str:
    return f"/ip4/{LOCALHOST}/tcp/{port}/p2p/{peer_id}"


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    """Call `condition` until it returns True or `timeout` seconds pass, and return its last result."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def wait_for_pack_bytes(node: Node, started: Started, target: int, timeout: float, interval: float = 0.005) -> int:
    """Wait until the node's pack files hold `target` bytes while `started` runs, and return their size then.

    Raises AssertionError if the command ends first or `timeout` seconds pass.
    The short default interval lets a caller act (kill a process) soon after the size is reached.
    """
    deadline = time.monotonic() + timeout
    while True:
        size = node.pack_bytes()
        if size >= target:
            return size
        if started.process.poll() is not None:
            raise AssertionError(
                f"the command ended with {size} of {target} pack bytes:\n{started.result().describe()}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"{node.name} reached {size} of {target} pack bytes within {timeout} s")
        time.sleep(interval)


class ProcessRegistry:
    """The processes one test started, so the test can end each one by pid whatever happens."""

    def __init__(self) -> None:
        self._processes: list[subprocess.Popen] = []

    def add(self, process: subprocess.Popen) -> subprocess.Popen:
        self._processes.append(process)
        return process

    def kill_all(self) -> None:
        """Send SIGKILL to every registered process that is still running, and reap it."""
        for process in self._processes:
            kill(process)


def kill(process: subprocess.Popen) -> None:
    """Send SIGKILL to one process by its pid unless it has ended, and reap it."""
    if process.poll() is None:
        try:
            os.kill(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=COMMAND_TIMEOUT_S)


@dataclass(frozen=True)
class CliResult:
    node: str
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)

    def describe(self) -> str:
        """Return the node, command, exit code and output, for assertion messages."""
        return (
            f"[{self.node}] p2pvc {' '.join(self.args)} exited {self.returncode}\n"
            f"stdout:\n{self.stdout[-4000:]}\nstderr:\n{self.stderr[-4000:]}"
        )


@dataclass(frozen=True)
class Started:
    """A command started in the background by `Node.start`."""

    node: str
    args: tuple[str, ...]
    process: subprocess.Popen
    stdout_path: Path
    stderr_path: Path

    def result(self) -> CliResult:
        """Return the exit code and output of the ended process."""
        return CliResult(
            self.node, self.args, self.process.returncode, self.stdout_path.read_text(), self.stderr_path.read_text()
        )

    def stop(self) -> float:
        """Send SIGTERM and return the seconds until the process exited.

        Returns infinity, and kills the process, if it still runs STOP_LIMIT_S +
        STOP_GRACE_S seconds later. Raises AssertionError if it had already exited.
        """
        if self.process.poll() is not None:
            raise AssertionError(f"process had ended before SIGTERM:\n{self.result().describe()}")
        started = time.monotonic()
        os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_LIMIT_S + STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            kill(self.process)
            return float("inf")
        return time.monotonic() - started


class Node:
    """One peer: a working tree with its repository, and its own P2PVC_HOME (signing key)."""

    def __init__(self, name: str, base: Path, registry: ProcessRegistry) -> None:
        self.name = name
        self.root = base / name
        self.home = base / f"{name}-home"
        self.logs = base / "logs"
        self.registry = registry
        self._identity: dict[str, str] | None = None

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["P2PVC_HOME"] = str(self.home)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    # Commands -------------------------------------------------------------

    def run(self, *args: str, timeout: float = COMMAND_TIMEOUT_S) -> CliResult:
        """Run one command in the node's folder and wait for it. subprocess.run kills it past `timeout`."""
        cwd = self.root if self.root.exists() else self.root.parent
        done = subprocess.run(
            [*CLI_COMMAND, *args], cwd=cwd, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        return CliResult(self.name, tuple(args), done.returncode, done.stdout, done.stderr)

    def ok(self, *args: str, timeout: float = COMMAND_TIMEOUT_S) -> CliResult:
        """Run a command that must succeed."""
        result = self.run(*args, timeout=timeout)
        assert result.returncode == 0, result.describe()
        return result

    def json(self, *args: str, timeout: float = COMMAND_TIMEOUT_S) -> Any:
        """Run a command with --json that must succeed, and parse its output."""
        return self.ok(*args, "--json", timeout=timeout).json()

    def start(self, *args: str) -> Started:
        """Start a command without waiting, with stdout and stderr in files under `logs`.

        The caller waits for it with `finish` or kills it. Otherwise the registry kills it when the test ends.
        """
        self.logs.mkdir(exist_ok=True)
        stem = f"{self.name}-{args[0]}-{time.monotonic_ns()}"
        stdout_path = self.logs / f"{stem}.out"
        stderr_path = self.logs / f"{stem}.err"
        cwd = self.root if self.root.exists() else self.root.parent
        with open(stdout_path, "w") as stdout, open(stderr_path, "w") as stderr:
            process = subprocess.Popen([*CLI_COMMAND, *args], cwd=cwd, env=self.env, stdout=stdout, stderr=stderr)
        self.registry.add(process)
        return Started(self.name, tuple(args), process, stdout_path, stderr_path)

    def finish(self, started: Started, timeout: float = COMMAND_TIMEOUT_S) -> CliResult:
        """Wait for a command from `start` (killing it past `timeout`) and collect its output."""
        try:
            started.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill(started.process)
            raise AssertionError(f"[{self.name}] p2pvc {' '.join(started.args)} timed out after {timeout} s") from None
        return started.result()

    # Identity and state ------------------------------------------------------

    @property
    def public_key(self) -> str:
        return self._id()["public_key"]

    @property
    def peer_id(self) -> str:
        return self._id()["peer_id"]

    def _id(self) -> dict[str, str]:
        if self._identity is None:
            self._identity = self.json("id")
        return self._identity

    def refs(self) -> dict[str, tuple]:
        """Return every branch and tag as ref name -> (target, heads, conflicted)."""
        states = self.json("branch") + self.json("tag")
        return {s["ref"]: (s["target"], tuple(sorted(s["heads"])), s["conflicted"]) for s in states}

    def branch_target(self, name: str) -> str | None:
        """Return the commit id a branch points at, or None if the node does not have it."""
        for state in self.json("branch"):
            if state["name"] == name:
                return state["target"]
        return None

    def pack_bytes(self) -> int:
        """Return the total size of the node's pack files, which grows as a pull receives data.

        Returns 0 while the repository does not exist yet (a clone creates it under a temporary name).
        """
        total = 0
        packs = self.root / ".p2pvc" / "packs"
        try:
            entries = os.scandir(packs)
        except FileNotFoundError:
            return 0
        with entries:
            for entry in entries:
                if entry.name.endswith(".pack"):
                    try:
                        total += entry.stat().st_size
                    except FileNotFoundError:  # a pack that gc or a rewrite removed meanwhile
                        pass
        return total

    def copy_to(self, other: Node) -> Node:
        """Copy this node's working tree and repository (like `cp -a`) to `other`, which keeps its own key."""
        shutil.copytree(self.root, other.root, symlinks=True)
        return other

    # Serving ------------------------------------------------------------------

    def serve(
        self, port: int | None = None, anti_entropy: float = 3600.0, seed: bool = False, extra: tuple[str, ...] = ()
    ) -> Server:
        """Start `p2pvc serve` on 127.0.0.1 and return once it prints "listening on".

        The default anti-entropy interval is long, so the only exchanges are
        the ones the test causes and the first round right after start.
        With `seed`, the node runs `serve --seed`: it only serves and never pulls.
        `extra` holds more `serve` options.
        """
        port = port if port is not None else free_port()
        self.logs.mkdir(exist_ok=True)
        log_path = self.logs / f"{self.name}-serve-{port}-{time.monotonic_ns()}.log"
        log = open(log_path, "w")
        try:
            process = subprocess.Popen(
                [
                    *CLI_COMMAND,
                    "serve",
                    "--listen",
                    LOCALHOST,
                    "--port",
                    str(port),
                    "--anti-entropy",
                    str(anti_entropy),
                    *(["--seed"] if seed else []),
                    *extra,
                ],
                cwd=self.root,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        finally:
            log.close()
        self.registry.add(process)
        server = Server(self, process, port, log_path)
        server.wait_listening()
        return server


class Server:
    """A running `p2pvc serve` process of one node."""

    def __init__(self, node: Node, process: subprocess.Popen, port: int, log_path: Path) -> None:
        self.node = node
        self.process = process
        self.port = port
        self.log_path = log_path

    @property
    def address(self) -> str:
        return peer_address(self.port, self.node.peer_id)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def running(self) -> bool:
        return self.process.poll() is None

    def wait_listening(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "listening on" not in self.log():
            if not self.running():
                raise AssertionError(
                    f"[{self.node.name}] serve exited {self.process.returncode} before listening:\n{self.log()}"
                )
            if time.monotonic() > deadline:
                kill(self.process)
                raise AssertionError(f"[{self.node.name}] serve did not listen within {START_TIMEOUT_S} s:\n{self.log()}")
            time.sleep(POLL_INTERVAL_S)

    def stop(self) -> float:
        """Send SIGTERM and return the seconds until the process exited.

        Returns infinity, and kills the process, if it still runs STOP_LIMIT_S +
        STOP_GRACE_S seconds later. Raises AssertionError if it had already exited.
        """
        if not self.running():
            raise AssertionError(
                f"[{self.node.name}] serve had exited with {self.process.returncode} before SIGTERM:\n{self.log()[-4000:]}"
            )
        started = time.monotonic()
        os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_LIMIT_S + STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            kill(self.process)
            return float("inf")
        return time.monotonic() - started

    def kill(self) -> None:
        """Send SIGKILL, as a crash or power loss would end the node."""
        kill(self.process)


# Working trees ----------------------------------------------------------------------


def write_random_file(path: Path, size: int, piece: int = 8 * 1024 * 1024) -> None:
    """Write `size` incompressible bytes (os.urandom) in pieces, so memory use stays at one piece."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        remaining = size
        while remaining > 0:
            count = min(piece, remaining)
            f.write(os.urandom(count))
            remaining -= count


def tree_digest(root: Path) -> dict[str, tuple]:
    """Describe every path below `root` except `.p2pvc` by type, executable bit and SHA-256, without following symlinks."""
    result: dict[str, tuple] = {}
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d != ".p2pvc"]
        for name in dirs + names:
            path = Path(folder, name)
            relative = path.relative_to(root).as_posix()
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                result[relative] = ("symlink", os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                result[relative] = ("dir",)
            else:
                result[relative] = ("file", bool(info.st_mode & stat.S_IXUSR), _sha256(path))
    return result


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * 1024 * 1024):
            digest.update(block)
    return digest.hexdigest()
