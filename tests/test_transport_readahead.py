"""The read-ahead buffer under sync-protocol streams: whole frames are taken from it, partial ones left."""

from __future__ import annotations

from p2pvc.net.framing import HEADER
from p2pvc.node.transport import _ReadAhead


class _Pieces:
    """A stream whose reads return the given pieces in order, then end."""

    def __init__(self, *pieces: bytes) -> None:
        self.pieces = list(pieces)

    async def read(self, n: int | None = None) -> bytes:
        return self.pieces.pop(0) if self.pieces else b""


def frame(payload: bytes) -> bytes:
    return HEADER.pack(len(payload)) + payload


async def test_take_frame_returns_buffered_frames_in_order() -> None:
    stream = _ReadAhead(_Pieces(frame(b"one") + frame(b"") + frame(b"three") + frame(b"fo")[:5]))
    assert stream.take_frame(100) is None  # nothing read yet
    await stream.read(0)  # fills the buffer, returns nothing of it
    assert stream.take_frame(100) == b"one"
    assert stream.take_frame(100) == b""
    assert stream.take_frame(100) == b"three"
    assert stream.take_frame(100) is None  # only 5 of the 6 bytes of the last frame
    assert await stream.read(10) == frame(b"fo")[:5]


async def test_take_frame_skips_oversized_frame() -> None:
    stream = _ReadAhead(_Pieces(frame(b"x" * 50)))
    await stream.read(0)
    assert stream.take_frame(49) is None
    assert stream.take_frame(50) == b"x" * 50


async def test_read_serves_the_buffer_before_reading_again() -> None:
    stream = _ReadAhead(_Pieces(b"abcdef", b"gh"))
    assert await stream.read(4) == b"abcd"
    assert await stream.read(4) == b"ef"
    assert await stream.read(4) == b"gh"
    assert await stream.read(4) == b""


async def test_read_whole_frame_joins_pieces() -> None:
    data = frame(b"a" * 10) + frame(b"b" * 3)
    stream = _ReadAhead(_Pieces(data[:3], data[3:9], data[9:16], data[16:]))
    assert await stream.read_whole_frame(100, deadline=float("inf")) == b"a" * 10
    assert await stream.read_whole_frame(100, deadline=float("inf")) == b"b" * 3
    assert await stream.read_whole_frame(100, deadline=float("inf")) is None  # the stream ended


async def test_read_whole_frame_keeps_truncated_frame() -> None:
    stream = _ReadAhead(_Pieces(frame(b"c" * 10)[:8]))
    assert await stream.read_whole_frame(100, deadline=float("inf")) is None
    assert await stream.read(100) == frame(b"c" * 10)[:8]  # nothing was lost


async def test_read_whole_frame_stops_at_an_oversized_header() -> None:
    stream = _ReadAhead(_Pieces(frame(b"d" * 10)))
    assert await stream.read_whole_frame(9, deadline=float("inf")) is None
    assert stream.take_frame(10) == b"d" * 10
