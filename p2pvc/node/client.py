"""Requests to one peer, each on its own stream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import trio

from p2pvc.errors import PeerError
from p2pvc.node.streams import FrameStream, Opener, StreamClosed
from p2pvc.protocol import messages as m
from p2pvc.sync.receive import Assembler


@dataclass
class PeerClient:
    open_stream: Opener
    peer_id: str
    repo: bytes

    async def _request(self, request: m.Message) -> FrameStream:
        try:
            stream = await self.open_stream(self.peer_id)
            await stream.send(request)
        except StreamClosed as exc:
            raise PeerError(f"peer {self.peer_id} closed the stream: {exc}") from exc
        return stream

    async def _receive(self, stream: FrameStream) -> m.Message:
        try:
            message = await stream.receive()
        except StreamClosed as exc:
            raise PeerError(f"peer {self.peer_id} closed the stream: {exc}") from exc
        if isinstance(message, m.ErrorResponse):
            await stream.reset()
            raise PeerError(f"peer {self.peer_id} responded with error {message.code}: {message.message}")
        return message

    async def repository_records(self, repo: bytes | None) -> tuple[bytes, ...]:
        stream = await self._request(m.RepositoryRequest(repo))
        response = await self._receive(stream)
        await stream.close()
        if not isinstance(response, m.RepositoryResponse):
            raise m.ProtocolViolation(f"expected a repository response, got {type(response).__name__}")
        return response.records

    async def heads(self) -> dict[str, bytes]:
        stream = await self._request(m.HeadsRequest(self.repo))
        response = await self._receive(stream)
        await stream.close()
        if not isinstance(response, m.HeadsResponse):
            raise m.ProtocolViolation(f"expected heads, got {type(response).__name__}")
        return response.digests

    async def updates(self, names: list[str]) -> list[bytes]:
        records: list[bytes] = []
        for start in range(0, len(names), m.MAX_REF_NAMES):
            stream = await self._request(m.UpdatesRequest(self.repo, tuple(names[start : start + m.MAX_REF_NAMES])))
            while True:
                response = await self._receive(stream)
                if isinstance(response, m.End):
                    break
                if not isinstance(response, m.UpdatesResponse):
                    raise m.ProtocolViolation(f"expected updates, got {type(response).__name__}")
                records.extend(response.records)
            await stream.close()
        return records

    async def objects(self, ids: list[bytes]) -> AsyncIterator[tuple[m.ObjectPart, bytes] | m.End]:
        """Yield (first part, stored bytes) per object the peer has, then End listing the rest."""
        if len(ids) > m.MAX_IDS_PER_REQUEST:
            raise ValueError(f"at most {m.MAX_IDS_PER_REQUEST} ids per request")
        stream = await self._request(m.ObjectsRequest(self.repo, tuple(ids)))
        assembler = Assembler()
        requested = set(ids)
        ended = False
        try:
            while True:
                response = await self._receive(stream)
                if isinstance(response, m.End):
                    if not assembler.idle:
                        raise m.ProtocolViolation("response ended inside an object")
                    ended = True
                    yield response
                    return
                if not isinstance(response, m.ObjectPart):
                    raise m.ProtocolViolation(f"expected object parts, got {type(response).__name__}")
                if response.id not in requested:
                    raise m.ProtocolViolation(f"peer sent {response.id.hex()[:12]}, which was not requested")
                whole = assembler.add(response)
                if whole is not None:
                    yield whole
        finally:
            if ended:
                await stream.close()
            else:
                # Abandoned (cancelled, or the caller stopped reading): a reset tells the
                # responder to stop sending; shielded so that a cancelled caller still sends it.
                with trio.CancelScope(shield=True):
                    await stream.reset()

    async def have(self, ids: list[bytes], listen: list[str]) -> m.HaveResponse:
        """Ask which of these commits are complete and which chunks of these manifests the peer holds."""
        stream = await self._request(m.HaveRequest(self.repo, tuple(ids), tuple(listen)))
        response = await self._receive(stream)
        await stream.close()
        if not isinstance(response, m.HaveResponse):
            raise m.ProtocolViolation(f"expected availability, got {type(response).__name__}")
        if len(response.have) != len(ids):
            raise m.ProtocolViolation(f"requested availability of {len(ids)} ids, got {len(response.have)} entries")
        return response

    async def announce(self, records: list[bytes]) -> None:
        stream = await self._request(m.Announce(self.repo, tuple(records)))
        response = await self._receive(stream)
        await stream.close()
        if not isinstance(response, m.Ack):
            raise m.ProtocolViolation(f"expected an ack, got {type(response).__name__}")
