"""Run one p2pvc command in this process, with hooks that kill or pause it at named calls.

Usage:

    python hook_driver.py [--kill-before T] [--kill-after T] [--pause-before T]
        [--pause-after T] [--ready-file F] [--go-file F] [--start-file F] -- ARGS...

T is `module:attribute.path` with an optional `#N` (default 1), and the hook fires on
the Nth call of that function in any thread. The hook replaces the attribute on that
module or class only, so a function that another module imports by name is named there
(`p2pvc.store.objectstore:fsync_dir`). `--kill-*` sends SIGKILL to this process, so no
Python code runs after it, but data already written stays in the page cache. `--pause-*`
creates the ready file and waits for the go file. `--start-file` makes the process
import everything, create the ready file, and wait for the start file before it
runs the command, so several processes can start the command at the same moment.

A wait that lasts longer than WAIT_TIMEOUT_S ends the process with exit code 99,
so a broken test cannot leave it behind.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import signal
import sys
import threading
import time
from pathlib import Path

WAIT_TIMEOUT_S = 60.0
EXIT_WAIT_TIMED_OUT = 99


def wait_for_file(path: Path) -> None:
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    while not path.exists():
        if time.monotonic() > deadline:
            sys.stderr.write(f"hook_driver: timed out waiting for {path}\n")
            os._exit(EXIT_WAIT_TIMED_OUT)
        time.sleep(0.002)


def parse_target(spec: str) -> tuple[object, str, int]:
    """Return (owner, attribute name, call number) for `module:attr.path#N`."""
    target, _, count = spec.partition("#")
    module_name, _, attr_path = target.partition(":")
    owner = importlib.import_module(module_name)
    *parents, name = attr_path.split(".")
    for part in parents:
        owner = getattr(owner, part)
    if not hasattr(owner, name):
        raise SystemExit(f"hook_driver: {target} does not exist")
    return owner, name, int(count or 1)


def install_hook(spec: str, when: str, action) -> None:
    owner, name, fire_on = parse_target(spec)
    original = getattr(owner, name)
    calls = 0
    lock = threading.Lock()

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        nonlocal calls
        with lock:
            calls += 1
            fire = calls == fire_on
        if fire and when == "before":
            action()
        result = original(*args, **kwargs)
        if fire and when == "after":
            action()
        return result

    setattr(owner, name, wrapper)


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kill-before", action="append", default=[])
    parser.add_argument("--kill-after", action="append", default=[])
    parser.add_argument("--pause-before", action="append", default=[])
    parser.add_argument("--pause-after", action="append", default=[])
    parser.add_argument("--ready-file", type=Path)
    parser.add_argument("--go-file", type=Path)
    parser.add_argument("--start-file", type=Path)
    parser.add_argument("args", nargs=argparse.REMAINDER)
    options = parser.parse_args()
    args = options.args[1:] if options.args[:1] == ["--"] else options.args

    # Import every command module now, so the command starts without import delay.
    import p2pvc.cli.main as cli
    import p2pvc.ops.history  # noqa: F401
    import p2pvc.ops.maintenance  # noqa: F401
    import p2pvc.ops.worktree_ops  # noqa: F401

    def pause() -> None:
        options.ready_file.touch()
        wait_for_file(options.go_file)

    for spec in options.kill_before:
        install_hook(spec, "before", kill_self)
    for spec in options.kill_after:
        install_hook(spec, "after", kill_self)
    for spec in options.pause_before:
        install_hook(spec, "before", pause)
    for spec in options.pause_after:
        install_hook(spec, "after", pause)

    if options.start_file is not None:
        options.ready_file.touch()
        wait_for_file(options.start_file)
    sys.argv = ["p2pvc", *args]
    cli.run()


if __name__ == "__main__":
    main()
