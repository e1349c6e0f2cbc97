"""The progress interface that long operations report to.

The library only calls these methods; the CLI decides how (and whether) to
draw a bar, so library code never writes to the terminal.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def start(self, label: str, total: int | None, unit: str = "B") -> None: ...

    def advance(self, amount: int) -> None: ...

    def describe(self, label: str) -> None:
        """Replace the label of the running bar (a fetch shows how many peers serve it)."""

    def finish(self) -> None: ...


class NullProgress:
    def start(self, label: str, total: int | None, unit: str = "B") -> None:
        pass

    def advance(self, amount: int) -> None:
        pass

    def describe(self, label: str) -> None:
        pass

    def finish(self) -> None:
        pass


NULL_PROGRESS = NullProgress()
