"""Message streams: what the sync server and client need from a transport.

`FrameStream` sends and receives protocol messages; the libp2p adapter
(`p2pvc.node.transport`) frames them over Yamux streams, and
`memory_stream_pair` passes them through trio memory channels so the
protocol logic is tested without a network.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from p2pvc.protocol import messages
from p2pvc.protocol.messages import Message

READ_TIMEOUT_S = 60.0  # a peer silent this long on an open request is gone


class StreamClosed(Exception):
    """The other side closed or reset the stream."""


class FrameStream(Protocol):
    peer_id: str

    async def send(self, message: Message) -> None: ...

    async def receive(self) -> Message: ...

    async def close(self) -> None: ...

    async def reset(self) -> None: ...


Opener = Callable[[str], Awaitable[FrameStream]]


class MemoryStream:
    """One end of an in-memory stream; messages are encoded and decoded as on the wire."""

    def __init__(self, peer_id: str, send: trio.MemorySendChannel, receive: trio.MemoryReceiveChannel) -> None:
        self.peer_id = peer_id
        self._send = send
        self._receive = receive

    async def send(self, message: Message) -> None:
        try:
            await self._send.send(messages.encode(message))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise StreamClosed(f"stream to {self.peer_id} is closed") from exc

    async def receive(self) -> Message:
        with trio.move_on_after(READ_TIMEOUT_S) as scope:
            try:
                data = await self._receive.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError, trio.BrokenResourceError) as exc:
                raise StreamClosed(f"stream from {self.peer_id} ended") from exc
        if scope.cancelled_caught:
            raise StreamClosed(f"no message from {self.peer_id} for {READ_TIMEOUT_S} s")
        return messages.decode(data)

    async def close(self) -> None:
        await self._send.aclose()

    async def reset(self) -> None:
        await self._send.aclose()
        await self._receive.aclose()


def memory_stream_pair(a: str, b: str) -> tuple[MemoryStream, MemoryStream]:
    """Return (stream at a whose peer is b, stream at b whose peer is a)."""
    a_to_b_send, a_to_b_receive = trio.open_memory_channel(math.inf)
    b_to_a_send, b_to_a_receive = trio.open_memory_channel(math.inf)
    return MemoryStream(b, a_to_b_send, b_to_a_receive), MemoryStream(a, b_to_a_send, a_to_b_receive)
