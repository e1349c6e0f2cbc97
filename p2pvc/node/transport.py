"""The libp2p side of a node: sync-protocol streams over `p2pvc.net.host`.

Importing this module imports libp2p (about 0.6 s), so only network
commands reach it, through `p2pvc.node.runner`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio

from p2pvc.errors import PeerError
from p2pvc.net.framing import FrameError, close_quietly, read_frame, reset_quietly, stream_peer_id, write_frame
from p2pvc.net.host import Host, open_host
from p2pvc.node.streams import READ_TIMEOUT_S, StreamClosed
from p2pvc.protocol import messages
from p2pvc.protocol.messages import SYNC_PROTOCOL, Message

WRITE_TIMEOUT_S = 60.0


class Libp2pFrameStream:
    """A libp2p stream carrying sync-protocol messages, one per frame."""

    def __init__(self, stream, peer_id: str) -> None:
        self._stream = stream
        self.peer_id = peer_id

    async def send(self, message: Message) -> None:
        try:
            await write_frame(self._stream, messages.encode(message), WRITE_TIMEOUT_S)
        except FrameError as exc:
            raise StreamClosed(exc.message) from exc

    async def receive(self) -> Message:
        try:
            data = await read_frame(self._stream, READ_TIMEOUT_S, messages.MAX_FRAME)
        except FrameError as exc:
            raise StreamClosed(exc.message) from exc
        if data is None:
            raise StreamClosed(f"peer {self.peer_id} closed the stream")
        return messages.decode(data)

    async def close(self) -> None:
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
