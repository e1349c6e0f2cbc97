"""The libp2p side of a node: sync-protocol streams over `p2pvc.net.host`.

Importing this module imports libp2p (about 0.6 s), so only network
commands reach it, through `p2pvc.node.runner`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio

from p2pvc.errors import PeerError
from p2pvc.net.framing import HEADER, FrameError, close_quietly, read_frame, reset_quietly, stream_peer_id
from p2pvc.net.host import Host, open_host
from p2pvc.node.streams import READ_TIMEOUT_S, StreamClosed
from p2pvc.protocol import messages
from p2pvc.protocol.messages import SYNC_PROTOCOL, Message

WRITE_TIMEOUT_S = 60.0


class _ReadAhead:
    """A stream wrapper whose reads take everything the muxer has buffered, up to READ_SIZE.

    Each read of a Yamux stream has a fixed cost (locking, a window update), and
    the frame reader asks for a header and then a payload. Serving both, and the
    next frames, from one large read halves the reads per frame and more when
    the receiver falls behind. Other attributes pass through to the stream.
    """

    READ_SIZE = 4 * 1024 * 1024

    def __init__(self, stream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def read(self, n: int | None = None) -> bytes:
        if not self._buffer:
            data = await self._stream.read(self.READ_SIZE)
            if not data:
                return data
            self._buffer += data
        size = len(self._buffer) if n is None or n < 0 else min(n, len(self._buffer))
        with memoryview(self._buffer) as view:
            data = view[:size].tobytes()  # one copy; a bytearray slice would add a second
        del self._buffer[:size]
        return data

    def take_frame(self, max_size: int) -> bytearray | None:
        """Remove and return the payload of the next frame if the buffer contains all of it, else None.

        Saves the header and payload reads of `read_frame`, and their copies,
        for the frames that an earlier large read already brought in. A frame
        longer than `max_size` is left for `read_frame` to reject.
        """
        buffer = self._buffer
        if len(buffer) < HEADER.size:
            return None
        (length,) = HEADER.unpack_from(buffer)
        end = HEADER.size + length
        if length > max_size or len(buffer) < end:
            return None
        payload = buffer[HEADER.size : end]
        del buffer[:end]
        return payload

    async def read_whole_frame(self, max_size: int, deadline: float) -> bytearray | None:
        """Read until the buffer contains the next whole frame, and return its payload.

        Returns None, leaving what it read in the buffer, if the stream ends, fails
        or reaches `deadline` first, or if the frame is longer than `max_size`:
        `read_frame` then reads the same bytes again and raises the right error.
        """
        with trio.move_on_at(deadline):
            while True:
                payload = self.take_frame(max_size)
                if payload is not None:
                    return payload
                if len(self._buffer) >= HEADER.size and HEADER.unpack_from(self._buffer)[0] > max_size:
                    return None
                try:
                    data = await self._stream.read(self.READ_SIZE)
                except Exception:  # the class depends on the stream; read_frame reports it
                    return None
                if not data:
                    return None
                self._buffer += data
        return None

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


class Libp2pFrameStream:
    """A libp2p stream carrying sync-protocol messages, one per frame."""

    WRITE_BATCH = 1024 * 1024  # bytes of frames gathered into one stream write

    def __init__(self, stream, peer_id: str) -> None:
        self._stream = _ReadAhead(stream)
        self.peer_id = peer_id
        self._pending: list[bytes] = []  # whole frames (header and payload) not written yet
        self._pending_bytes = 0

    async def send(self, message: Message) -> None:
        """Queue one frame; frames go out in writes of about WRITE_BATCH bytes.

        Each stream write costs a Yamux frame and a Noise record on both sides,
        so a response of many chunks is written in large batches. `receive` and
        `close` flush first, so a request never waits unsent.
        """
        payload = messages.encode(message)
        self._pending.append(HEADER.pack(len(payload)) + payload)
        self._pending_bytes += HEADER.size + len(payload)
        if self._pending_bytes >= self.WRITE_BATCH:
            await self.flush()

    async def flush(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        self._pending_bytes = 0
        try:
            with trio.fail_after(WRITE_TIMEOUT_S):
                await self._stream.write(data)
        except trio.TooSlowError as exc:
            await reset_quietly(self._stream)
            raise StreamClosed(f"writing to peer {self.peer_id} timed out after {WRITE_TIMEOUT_S:g} s") from exc
        except trio.Cancelled:
            await reset_quietly(self._stream)
            raise
        except Exception as exc:  # StreamReset, StreamClosed, StreamError: the class depends on the stream
            await reset_quietly(self._stream)
            raise StreamClosed(f"writing to peer {self.peer_id} failed: {exc!r}") from exc

    async def receive(self) -> Message:
        await self.flush()
        deadline = trio.current_time() + READ_TIMEOUT_S
        try:
            data = await self._stream.read_whole_frame(messages.MAX_FRAME, deadline)
        except trio.Cancelled:
            await reset_quietly(self._stream)  # as read_frame does: the caller drops the stream
            raise
        if data is None:
            try:
                remaining = max(deadline - trio.current_time(), 0.001)
                data = await read_frame(self._stream, remaining, messages.MAX_FRAME)
            except FrameError as exc:
                raise StreamClosed(exc.message) from exc
            if data is None:
                raise StreamClosed(f"peer {self.peer_id} closed the stream")
        return messages.decode(data)

    async def close(self) -> None:
        try:
            await self.flush()
        except StreamClosed:
            return
        await close_quietly(self._stream)

    async def reset(self) -> None:
        await reset_quietly(self._stream)


class NodeHost:
    """The host interface `p2pvc.node.service.Node` needs, with peer ids as strings."""

    def __init__(self, host: Host, nursery: trio.Nursery) -> None:
        self._host = host
        self.nursery = nursery

    @property
    def peer_id(self) -> str:
        return self._host.peer_id.to_base58()

    @property
    def libp2p_host(self):
        return self._host.libp2p_host

    def listen_addresses(self) -> list[str]:
        return [str(a) for a in self._host.listen_addrs]

    def connected_peers(self) -> list[str]:
        return [p.to_base58() for p in self._host.connected_peers() if self._host.is_connected(p)]

    async def connect(self, address: str) -> str:
        return (await self._host.connect(address)).to_base58()

    async def open_frame_stream(self, peer_id: str) -> Libp2pFrameStream:
        try:
            stream = await self._host.open_stream(peer_id, SYNC_PROTOCOL)
        except PeerError as exc:
            raise StreamClosed(exc.message) from exc
        return Libp2pFrameStream(stream, peer_id)

    def serve(self, handler: Callable[[Libp2pFrameStream], Awaitable[None]]) -> None:
        async def on_stream(stream) -> None:
            await handler(Libp2pFrameStream(stream, stream_peer_id(stream)))

        self._host.set_handler(SYNC_PROTOCOL, on_stream)


@asynccontextmanager
async def open_node_host(seed: bytes, listen: list[str]) -> AsyncIterator[NodeHost]:
    async with open_host(seed, listen) as host:
        async with trio.open_nursery() as nursery:
            yield NodeHost(host, nursery)
            nursery.cancel_scope.cancel()
