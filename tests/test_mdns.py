"""LAN discovery by mDNS, between two serving nodes in a network namespace made for the test.

The namespace has only a loopback interface with multicast turned on, so
the mDNS traffic never leaves it. Needs root and iproute2; skipped otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

STARTUP_TIMEOUT_S = 30.0
PROPAGATION_TIMEOUT_S = 45.0


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=30)


@pytest.fixture
def namespace():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and the ip command (iproute2) to create a network namespace")
    name = f"p2pvc-test-{os.getpid()}"
    created = _run("ip", "netns", "add", name)
    if created.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {created.stderr.strip()}")
    try:
        for command in (
            ("ip", "link", "set", "lo", "up"),
            ("ip", "link", "set", "lo", "multicast", "on"),
            ("ip", "route", "add", "224.0.0.0/4", "dev", "lo"),
        ):
            result = _run("ip", "netns", "exec", name, *command)
            assert result.returncode == 0, result.stderr
        yield name
    finally:
        _run("ip", "netns", "del", name)


def _cli(namespace: str, home: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, P2PVC_HOME=str(home))
    return subprocess.run(
        ["ip", "netns", "exec", namespace, "env", f"P2PVC_HOME={home}", sys.executable, "-m", "p2pvc.cli.main", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _serve(namespace: str, home: Path, cwd: Path, port: int, log: Path) -> subprocess.Popen:
    process = subprocess.Popen(
        [
            "ip", "netns", "exec", namespace, "env", f"P2PVC_HOME={home}",
            sys.executable, "-m", "p2pvc.cli.main", "serve",
            "--listen", "127.0.0.1", "--port", str(port), "--mdns", "--anti-entropy", "1000",
        ],
        cwd=cwd,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while "listening on" not in log.read_text():
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, f"serve did not start: {log.read_text()}"
        time.sleep(0.1)
    return process


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _messages(namespace: str, home: Path, cwd: Path) -> list[str]:
    result = _cli(namespace, home, cwd, "log", "--json")
    return [c["message"] for c in json.loads(result.stdout)] if result.returncode == 0 else []


def test_mdns_peers_find_each_other(namespace, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    home_a, home_b = tmp_path / "home-a", tmp_path / "home-b"
    a.mkdir()
    (a / "f.txt").write_text("one\n")
    assert _cli(namespace, home_a, a, "init").returncode == 0
    assert _cli(namespace, home_a, a, "commit", "-m", "one").returncode == 0
    server_a = _serve(namespace, home_a, a, 47501, tmp_path / "a.log")
    server_b = None
    try:
        address = next(
            line.split()[-1] for line in (tmp_path / "a.log").read_text().splitlines() if "listening on" in line
        )
        assert _cli(namespace, home_b, tmp_path, "clone", address, str(b)).returncode == 0
        # b forgets a: from now on only mDNS can bring them together.
        assert _cli(namespace, home_b, b, "peer", "remove", address).returncode == 0
        server_b = _serve(namespace, home_b, b, 47502, tmp_path / "b.log")
        deadline = time.monotonic() + PROPAGATION_TIMEOUT_S
        while "found peer" not in (tmp_path / "b.log").read_text():
            assert time.monotonic() < deadline, (tmp_path / "b.log").read_text()
            time.sleep(0.2)

        (a / "f.txt").write_text("two\n")
        assert _cli(namespace, home_a, a, "commit", "-m", "two").returncode == 0
        while "two" not in _messages(namespace, home_b, b):
            assert time.monotonic() < deadline, (tmp_path / "b.log").read_text()
            time.sleep(0.3)
    finally:
        _stop(server_a)
        if server_b is not None:
            _stop(server_b)
    assert _messages(namespace, home_b, b) == ["two", "one"]
