"""An upload cap for a serving node: a node shares a lab's uplink with other work."""

from __future__ import annotations

import trio


class UploadLimit:
    """Spaces out sends so that, across all streams of a node, at most `bytes_per_s` leave per second.

    Each send reserves the next free slot of the link, in the order the sends
    ask, and waits for it. Idle time is not saved up, so there are no bursts.
    """

    def __init__(self, bytes_per_s: float) -> None:
        if bytes_per_s <= 0:
            raise ValueError("an upload limit must be positive")
        self.bytes_per_s = bytes_per_s
        self._free_at = 0.0  # trio clock time when the link has sent everything reserved so far

    async def take(self, size: int) -> None:
        now = trio.current_time()
        start = max(now, self._free_at)
        self._free_at = start + size / self.bytes_per_s
        if start > now:
            await trio.sleep(start - now)
