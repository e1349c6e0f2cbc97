"""Checking what a peer sent before anything of it is stored.

Every received record is verified against the id it was requested under:
its bytes are decoded with the declared codec (bounded by the expected
size, so a compression bomb cannot exhaust memory), hashed, and, for
objects, parsed with the full validation of `p2pvc.objects.model`. A peer
whose data fails any check is misbehaving: the caller stops trusting it.
"""

from __future__ import annotations

from dataclasses import dataclass

from p2pvc.errors import CorruptionError
from p2pvc.objects import compress, model
from p2pvc.objects.chunker import MAX_CHUNK
from p2pvc.objects.ids import chunk_id, object_id
from p2pvc.protocol.messages import MAX_OBJECT_BYTES, ObjectPart, ProtocolViolation

KIND_CHUNK = 0


@dataclass(frozen=True)
class Received:
    id: bytes
    kind: int
    codec: int
    raw_size: int
    stored: bytes
    raw: bytes
    obj: model.StoredObject | None  # decoded object; None for a chunk


class Assembler:
    """Joins the parts of one object response; one object at a time, in order."""

    def __init__(self) -> None:
        self._current: ObjectPart | None = None
        self._parts: list[bytes] = []
        self._size = 0

    def add(self, part: ObjectPart) -> tuple[ObjectPart, bytes] | None:
        """Add a part; return (first part, whole stored bytes) when the object is complete."""
        if self._current is None:
            if part.offset != 0:
                raise ProtocolViolation(f"object {part.id.hex()[:12]} starts at offset {part.offset}, not 0")
            self._current = part
        elif part.id != self._current.id or part.offset != self._size:
            raise ProtocolViolation(f"object {part.id.hex()[:12]}: part out of order")
        self._parts.append(part.data)
        self._size += len(part.data)
        if self._size < self._current.stored_size:
            return None
        first, data = self._current, b"".join(self._parts)
        self._current, self._parts, self._size = None, [], 0
        return first, data

    @property
    def idle(self) -> bool:
        return self._current is None


def verify(first: ObjectPart, stored: bytes, expected_kind: int, expected_size: int | None = None) -> Received:
    """Decode and check one received record; raises CorruptionError naming what is wrong."""
    oid = first.id
    if first.kind != expected_kind:
        raise CorruptionError(
            f"peer sent {oid.hex()[:12]} as kind {first.kind}",
            expected=str(expected_kind),
            actual=str(first.kind),
        )
    limit = MAX_CHUNK if expected_kind == KIND_CHUNK else MAX_OBJECT_BYTES
    if first.raw_size > limit or (expected_size is not None and first.raw_size != expected_size):
        raise CorruptionError(
            f"peer sent {oid.hex()[:12]} with raw size {first.raw_size}",
            expected=str(expected_size if expected_size is not None else f"<= {limit}"),
            actual=str(first.raw_size),
        )
    raw = compress.decode(first.codec, stored, first.raw_size)
    actual = chunk_id(raw) if expected_kind == KIND_CHUNK else object_id(raw)
    if actual != oid:
        raise CorruptionError(f"peer sent data that does not match {oid.hex()}", expected=oid.hex(), actual=actual.hex())
    obj = None if expected_kind == KIND_CHUNK else model.decode(raw, expected_kind)
    return Received(oid, first.kind, first.codec, first.raw_size, stored, raw, obj)
