"""Chunk availability: which chunks of which files a node holds, in the wire's bitmap form.

Theory of operation. A swarm fetcher asks each peer, about once a second,
which of the wanted files' chunks it holds. The answer per manifest is
`HAVE_ALL`, `HAVE_NONE` or a bitmap over the manifest's chunk list, so a
1 GiB checkpoint of about 13,000 chunks costs under 2 KiB per answer.

`LocalAvailability` is what a node itself can serve beyond its index while
it fetches: a chunk counts as held as soon as it is verified and appended,
and its stored bytes stay here until the write session makes them durable
(after which the index serves them). It also remembers which peers recently
asked as swarm members, so it can tell each fetcher about the others.

Pure logic: no I/O, time is passed in.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from p2pvc.protocol.messages import HAVE_ALL, HAVE_NONE, MAX_SWARM_PEERS, Have, SwarmPeer

SWARM_MEMBER_TTL_S = 60.0  # a peer that has not asked for this long is no longer listed


def bitmap_size(count: int) -> int:
    return (count + 7) // 8


def encode_have(held: Sequence[bool]) -> Have:
    """Return the wire form of a manifest's held flags."""
    if all(held):
        return HAVE_ALL
    if not any(held):
        return HAVE_NONE
    bitmap = bytearray(bitmap_size(len(held)))
    for index, flag in enumerate(held):
        if flag:
            bitmap[index >> 3] |= 0x80 >> (index & 7)
    return bytes(bitmap)


def held_indices(have: Have, count: int) -> list[int]:
    """Return the chunk indices that `have` marks as held, for a manifest of `count` chunks.

    Raises ValueError when a bitmap does not fit the manifest (a peer's fault).
    """
    if have is HAVE_ALL or have is True:
        return list(range(count))
    if have is HAVE_NONE or have is False:
        return []
    assert isinstance(have, bytes)
    if len(have) != bitmap_size(count):
        raise ValueError(f"bitmap of {len(have)} bytes for a manifest of {count} chunks")
    return [i for i in range(count) if have[i >> 3] & (0x80 >> (i & 7))]


@dataclass
class FreshRecord:
    """A verified record appended to a pack whose index rows are not committed yet."""

    kind: int
    codec: int
    raw_size: int
    stored: bytes


class _File:
    __slots__ = ("chunks", "held", "count")

    def __init__(self, chunks: list[bytes], held: list[bool]) -> None:
        self.chunks = chunks
        self.held = held
        self.count = sum(held)


class LocalAvailability:
    def __init__(self) -> None:
        self.fresh: dict[bytes, FreshRecord] = {}
        self._files: dict[bytes, _File] = {}  # manifest id -> progress of a fetch in this process
        self._positions: dict[bytes, list[tuple[bytes, int]]] = {}  # chunk id -> (manifest id, index)
        self._members: dict[str, tuple[tuple[str, ...], float]] = {}  # peer id -> (addresses, last asked)

    # Files being fetched ---------------------------------------------------------------

    def track(self, manifest_id: bytes, chunk_ids: list[bytes], held: list[bool]) -> None:
        """Follow a manifest that a fetch in this process fills, starting from `held`."""
        if manifest_id in self._files:
            return
        self._files[manifest_id] = _File(chunk_ids, list(held))
        for index, cid in enumerate(chunk_ids):
            if not held[index]:
                self._positions.setdefault(cid, []).append((manifest_id, index))

    def untrack_all(self) -> None:
        self._files.clear()
        self._positions.clear()

    def chunk_stored(self, cid: bytes, record: FreshRecord | None) -> None:
        """Count a verified, appended chunk as held, and serve `record` until it is durable."""
        if record is not None:
            self.fresh[cid] = record
        for manifest_id, index in self._positions.pop(cid, ()):
            file = self._files[manifest_id]
            if not file.held[index]:
                file.held[index] = True
                file.count += 1

    def durable(self) -> None:
        """Drop the fresh records once the write session has committed them to the index."""
        self.fresh.clear()

    def have(self, manifest_id: bytes) -> Have | None:
        """Return the availability of a tracked manifest, or None when no fetch here follows it."""
        file = self._files.get(manifest_id)
        if file is None:
            return None
        if file.count == len(file.held):
            return HAVE_ALL
        return encode_have(file.held)

    # Swarm members -------------------------------------------------------------------

    def note_member(self, peer_id: str, addresses: Iterable[str], now: float) -> None:
        addresses = tuple(addresses)
        if addresses:
            self._members[peer_id] = (addresses, now)

    def members(self, exclude: str, now: float) -> tuple[SwarmPeer, ...]:
        """Peers that asked as swarm members within SWARM_MEMBER_TTL_S, newest first."""
        for peer_id, (_addresses, seen) in list(self._members.items()):
            if now - seen > SWARM_MEMBER_TTL_S:
                del self._members[peer_id]
        newest = sorted(self._members.items(), key=lambda item: -item[1][1])
        return tuple(SwarmPeer(p, a) for p, (a, _seen) in newest if p != exclude)[:MAX_SWARM_PEERS]
