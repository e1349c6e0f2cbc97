"""Hybrid logical clock (Kulkarni et al., 2014).

A timestamp is (wall_ms, counter). `tick` gives a local event a timestamp
greater than every timestamp this clock has issued or received, and close
to the physical clock; `receive` folds in a remote timestamp. So causal
order holds even on a node whose clock runs behind its peers.

Pure logic: the physical clock is passed in, which makes tests deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_FUTURE_SKEW_MS = 10 * 60 * 1000  # remote stamps further ahead of our clock are rejected


@dataclass(frozen=True, order=True, slots=True)
class Timestamp:
    wall_ms: int
    counter: int

    def __str__(self) -> str:
        return f"{self.wall_ms}.{self.counter}"


ZERO = Timestamp(0, 0)


def tick(last: Timestamp, physical_ms: int) -> Timestamp:
    if physical_ms > last.wall_ms:
        return Timestamp(physical_ms, 0)
    return Timestamp(last.wall_ms, last.counter + 1)


def receive(last: Timestamp, remote: Timestamp, physical_ms: int) -> Timestamp:
    """Return the clock state after seeing `remote`; the caller checks skew first."""
    wall = max(last.wall_ms, remote.wall_ms, physical_ms)
    if wall == last.wall_ms == remote.wall_ms:
        counter = max(last.counter, remote.counter) + 1
    elif wall == last.wall_ms:
        counter = last.counter + 1
    elif wall == remote.wall_ms:
        counter = remote.counter + 1
    else:
        counter = 0
    return Timestamp(wall, counter)


def too_far_ahead(remote: Timestamp, physical_ms: int) -> bool:
    return remote.wall_ms > physical_ms + MAX_FUTURE_SKEW_MS
