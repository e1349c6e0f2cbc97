"""Terminal output: progress bars, sizes, JSON, and the one-line error format."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from p2pvc.errors import P2pvcError


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def path_text(path: bytes) -> str:
    """Show a path as text; undecodable bytes appear as \\x escapes."""
    return bytes(path).decode("utf-8", "backslashreplace")


def emit_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def print_error(exc: P2pvcError) -> None:
    sys.stderr.write(f"error: {exc.message}\n")
    expected = getattr(exc, "expected", None)
    actual = getattr(exc, "actual", None)
    if expected is not None:
        sys.stderr.write(f"  expected: {expected}\n")
    if actual is not None:
        sys.stderr.write(f"  actual:   {actual}\n")
    if exc.hint:
        sys.stderr.write(f"hint: {exc.hint}\n")


class TerminalProgress:
    """A rich progress bar on stderr, drawn only when stderr is a terminal."""

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._progress = None
        self._task = None

    def start(self, label: str, total: int | None, unit: str = "B") -> None:
        if not self.enabled or not total:
            return
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        columns = [TextColumn("{task.description:>9}"), BarColumn()]
        if unit == "B":
            columns += [DownloadColumn(binary_units=True), TransferSpeedColumn()]
        else:
            columns += [TextColumn("{task.completed}/{task.total} " + unit)]
        columns.append(TimeRemainingColumn())
        self._progress = Progress(*columns, transient=True)
        self._progress.start()
        self._task = self._progress.add_task(label, total=total)

    def advance(self, amount: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, amount)

    def describe(self, label: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=label)

    def finish(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
