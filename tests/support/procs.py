"""Starting p2pvc as real processes, and making sure each one ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HOOK_DRIVER = Path(__file__).with_name("hook_driver.py")
COMMAND_TIMEOUT_S = 60.0  # bounds a hung command, far above the run time of any command here


def cli_env(home: Path) -> dict[str, str]:
    """Return an environment with its own p2pvc identity folder, so tests never touch the user's key."""
    env = dict(os.environ)
    env["P2PVC_HOME"] = str(home)
    return env


@dataclass
class Result:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        """Summarize the command and its output for assertion messages."""
        return (
            f"p2pvc {' '.join(self.args)} exited {self.returncode}\n"
            f"stdout:\n{self.stdout[-2000:]}\nstderr:\n{self.stderr[-2000:]}"
        )


def cli_argv(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "p2pvc.cli.main", *args]


def driver_argv(hooks: list[str], args: list[str]) -> list[str]:
    return [sys.executable, str(HOOK_DRIVER), *hooks, "--", *args]


def start(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def kill(proc: subprocess.Popen) -> None:
    """Send SIGKILL to a process this test started, unless it has already ended, and reap it."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=COMMAND_TIMEOUT_S)


def finish(proc: subprocess.Popen, args: list[str], timeout: float = COMMAND_TIMEOUT_S) -> Result:
    """Wait for a started process and collect its output; kill it if it runs past `timeout`."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill(proc)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"p2pvc {' '.join(args)} timed out after {timeout} s\nstderr:\n{stderr}") from None
    return Result(args, proc.returncode, stdout, stderr)


def run_cli(cwd: Path, env: dict[str, str], *args: str, timeout: float = COMMAND_TIMEOUT_S) -> Result:
    """Run `python -m p2pvc.cli.main ARGS` in `cwd` and wait for it."""
    proc = start(cli_argv(list(args)), cwd, env)
    return finish(proc, list(args), timeout)


def wait_for_file(path: Path, proc: subprocess.Popen | None = None, timeout: float = COMMAND_TIMEOUT_S) -> None:
    """Wait until `path` exists; fail early if `proc` ends first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc is not None and proc.poll() is not None:
            stderr = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"process {proc.pid} exited {proc.returncode} before creating {path}\n{stderr}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {path}")
        time.sleep(0.005)


def error_lines(stderr: str) -> list[str]:
    """Return the lines of stderr that are not a hint or the expected/actual detail of an error."""
    return [
        line
        for line in stderr.splitlines()
        if line.strip() and not line.startswith(("hint:", "  expected:", "  actual:"))
    ]


@dataclass
class Repo:
    """A working tree with a repository, and the environment to run p2pvc on it."""

    root: Path
    env: dict[str, str]

    def cli(self, *args: str) -> Result:
        return run_cli(self.root, self.env, *args)

    def commit(self, message: str, *extra: str) -> bytes:
        """Commit and return the new commit id; fail the test if the command fails."""
        result = self.cli("commit", "-m", message, "--json", *extra)
        assert result.returncode == 0, result.describe()
        return bytes.fromhex(json.loads(result.stdout)["id"])
