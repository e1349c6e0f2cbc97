"""Length-prefixed frames over a libp2p stream.

A frame is a 4-byte big-endian unsigned payload length followed by the
payload. `read_frame` and `write_frame` take a timeout in seconds for the
whole frame, and every failure of the stream or the peer raises a
`FrameError` subclass that names the peer. If a call does not complete (error, timeout or cancellation), it has
reset the stream, so the caller must drop the stream. Resetting matters
because in py-libp2p 0.8.1 a receiver whose sender gave up gets no signal:
its read waits until the connection closes, unless the sender resets.

Flow control: Yamux in py-libp2p 0.8.1 fails a write when the peer's receive
window stays full for 5 s, which happens after about 4 MiB in flight to a peer
that stopped reading. A protocol on top of this module should therefore keep
at most a few frames unacknowledged per stream, and should expect a write to
a stalled peer to fail after about 5 s, even when its own timeout is longer.

This module does not import libp2p, so protocol code can be tested over
in-memory streams. It uses the stream's `read`, `write`, `reset` and `close`
methods and, where present, the libp2p attributes `muxed_conn.peer_id` and
`muxed_stream.reset_received`.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from typing import Protocol

import trio

from p2pvc.errors import PeerError

MAX_FRAME = 4 * 1024 * 1024
"""Largest payload in bytes that `read_frame` accepts and `write_frame` sends."""

HEADER = struct.Struct(">I")

RESET_TIMEOUT = 1.0
"""Seconds allowed for sending a reset or close. A peer that stopped reading
can leave the connection's send buffer full, and then a reset would block."""

logger = logging.getLogger("p2pvc.net")


class FrameStream(Protocol):
    """The part of libp2p's `INetStream` that framing uses."""

    async def read(self, n: int | None = None) -> bytes: ...

    async def write(self, data: bytes) -> None: ...

    async def reset(self) -> None: ...

    async def close(self) -> None: ...


class FrameError(PeerError):
    """A frame could not be read or written. The stream has been reset."""

    def __init__(self, message: str, *, peer_id: str) -> None:
        super().__init__(message)
        self.peer_id = peer_id


class FrameTooLargeError(FrameError):
    """The peer announced a frame longer than the reader's maximum."""


class FrameTruncatedError(FrameError):
    """The peer closed the stream in the middle of a frame."""


class FrameTimeoutError(FrameError):
    """A whole frame was not read or written within the timeout."""


class FrameReadError(FrameError):
    """Reading failed: the stream was reset or its connection broke."""


class FrameWriteError(FrameError):
    """Writing failed: the stream was reset or its connection broke."""


@dataclass
class _ReadProgress:
    received: int = 0
    expected: int = HEADER.size


def stream_peer_id(stream: object) -> str:
    """Return the remote peer id of a libp2p stream as text, or "unknown peer"."""
    muxed_conn = getattr(stream, "muxed_conn", None)
    peer_id = getattr(muxed_conn, "peer_id", None)
    return str(peer_id) if peer_id is not None else "unknown peer"


def _reset_received(stream: object) -> bool:
    """Return True if the stream's Yamux side has seen a reset, ours or the peer's.

    py-libp2p 0.8.1's Yamux drops a stream's bookkeeping when a reset arrives
    while its receive buffer is empty. A later read then raises the same
    end-of-stream error as a clean close, but the YamuxStream object still has
    `reset_received` set. Streams without that attribute return False.
    """
    muxed_stream = getattr(stream, "muxed_stream", None)
    return getattr(muxed_stream, "reset_received", False) is True


async def reset_quietly(stream: FrameStream, timeout: float = RESET_TIMEOUT) -> None:
    """Reset `stream`, giving up after `timeout` s, also when the caller is cancelled.

    Logs a failed reset at DEBUG and does not raise it.
    """
    with trio.move_on_after(timeout) as scope:
        scope.shield = True
        try:
            await stream.reset()
        except Exception as exc:  # the stream is already dead, which is what a reset wants
            logger.debug("resetting a stream to peer %s failed: %r", stream_peer_id(stream), exc)
    if scope.cancelled_caught:
        logger.debug("resetting a stream to peer %s timed out after %g s", stream_peer_id(stream), timeout)


async def close_quietly(stream: FrameStream, timeout: float = RESET_TIMEOUT) -> None:
    """Close our side of `stream`, also when the caller is cancelled.

    Resets the stream instead if the close fails or takes over `timeout` s.
    """
    with trio.move_on_after(timeout) as scope:
        scope.shield = True
        try:
            await stream.close()
            return
        except Exception as exc:
            logger.debug("closing a stream to peer %s failed: %r", stream_peer_id(stream), exc)
    if scope.cancelled_caught:
        logger.debug("closing a stream to peer %s timed out after %g s", stream_peer_id(stream), timeout)
    await reset_quietly(stream, timeout)


async def _read_exactly(
    stream: FrameStream, size: int, progress: _ReadProgress, *, at_frame_start: bool
) -> bytes | None:
    """Read exactly `size` bytes, looping because `stream.read(n)` may return fewer than n.

    Returns None when the stream ends before its first byte and `at_frame_start` is set.
    """
    buffer = bytearray()
    while len(buffer) < size:
        try:
            chunk = await stream.read(size - len(buffer))
        except EOFError:  # libp2p's StreamEOF subclasses EOFError
            chunk = b""
        except Exception as exc:  # StreamReset, StreamError, trio errors: the class depends on the stream
            raise FrameReadError(
                f"reading a frame from peer {stream_peer_id(stream)} failed after "
                f"{progress.received} of {progress.expected} bytes: {exc!r}",
                peer_id=stream_peer_id(stream),
            ) from exc
        if not chunk:
            if _reset_received(stream):
                raise FrameReadError(
                    f"peer {stream_peer_id(stream)} reset the stream after {progress.received} "
                    f"of {progress.expected} bytes of a frame",
                    peer_id=stream_peer_id(stream),
                )
            if at_frame_start and not buffer:
                return None
            raise FrameTruncatedError(
                f"peer {stream_peer_id(stream)} closed the stream in the middle of a frame "
                f"after {progress.received} of {progress.expected} bytes",
                peer_id=stream_peer_id(stream),
            )
        progress.received += len(chunk)
        if len(chunk) == size:
            return chunk  # the whole span in one read: skip the two copies through `buffer`
        buffer += chunk
    return bytes(buffer)


async def _read_frame_without_timeout(stream: FrameStream, max_size: int, progress: _ReadProgress) -> bytes | None:
    header = await _read_exactly(stream, HEADER.size, progress, at_frame_start=True)
    if header is None:
        return None
    (length,) = HEADER.unpack(header)
    if length > max_size:
        raise FrameTooLargeError(
            f"peer {stream_peer_id(stream)} sent a frame of {length} bytes, more than the maximum of {max_size}",
            peer_id=stream_peer_id(stream),
        )
    progress.expected = HEADER.size + length
    if length == 0:
        return b""
    payload = await _read_exactly(stream, length, progress, at_frame_start=False)
    assert payload is not None  # _read_exactly returns None only at a frame start
    return payload


async def read_frame(stream: FrameStream, timeout: float, max_size: int = MAX_FRAME) -> bytes | None:
    """Read one frame and return its payload, or None if the peer closed the stream between frames.

    Raises FrameTooLargeError, FrameTruncatedError, FrameTimeoutError or
    FrameReadError, and resets the stream before raising. A reset by the peer
    raises FrameReadError, also where py-libp2p reports it as a clean close.
    """
    progress = _ReadProgress()
    try:
        with trio.fail_after(timeout):
            return await _read_frame_without_timeout(stream, max_size, progress)
    except trio.TooSlowError as exc:
        await reset_quietly(stream)
        raise FrameTimeoutError(
            f"reading a frame from peer {stream_peer_id(stream)} timed out after {timeout:g} s "
            f"with {progress.received} of {progress.expected} bytes received",
            peer_id=stream_peer_id(stream),
        ) from exc
    except FrameError:
        await reset_quietly(stream)
        raise
    except trio.Cancelled:
        # A cancelled read may have consumed part of a frame, so the stream is out of step.
        await reset_quietly(stream)
        raise


async def write_frame(stream: FrameStream, payload: bytes | bytearray | memoryview, timeout: float) -> None:
    """Write one frame with `payload`.

    Raises ValueError, without touching the stream, if the payload is longer
    than MAX_FRAME. Raises FrameTimeoutError or FrameWriteError, and resets
    the stream before raising, if the write does not complete.
    """
    length = len(payload)
    if length > MAX_FRAME:
        raise ValueError(f"frame payload of {length} bytes is longer than MAX_FRAME ({MAX_FRAME})")
    # One write call, so a small frame goes out in one Yamux data frame.
    data = HEADER.pack(length) + payload
    try:
        with trio.fail_after(timeout):
            await stream.write(data)
    except trio.TooSlowError as exc:
        await reset_quietly(stream)
        raise FrameTimeoutError(
            f"writing a frame of {length} bytes to peer {stream_peer_id(stream)} timed out after {timeout:g} s",
            peer_id=stream_peer_id(stream),
        ) from exc
    except trio.Cancelled:
        await reset_quietly(stream)
        raise
    except Exception as exc:  # StreamReset, StreamClosed, StreamError: the class depends on the stream
        await reset_quietly(stream)
        raise FrameWriteError(
            f"writing a frame of {length} bytes to peer {stream_peer_id(stream)} failed: {exc!r}",
            peer_id=stream_peer_id(stream),
        ) from exc
