"""Content ids: BLAKE3-256 digests.

A chunk id is the plain BLAKE3 hash of the chunk's bytes, so it equals what
any BLAKE3 tool prints for that data. Structured objects (manifests, trees,
commits, signed records) are hashed in BLAKE3's key-derivation mode with a
fixed context string, so no chunk can ever share an id with an object.
"""

from __future__ import annotations

import blake3

ID_SIZE = 32  # bytes
OBJECT_HASH_CONTEXT = "p2pvc 2026-12 object id v1"


def chunk_id(data: bytes | memoryview) -> bytes:
    return blake3.blake3(data).digest()


def object_id(encoded: bytes) -> bytes:
    return blake3.blake3(encoded, derive_key_context=OBJECT_HASH_CONTEXT).digest()


def to_hex(oid: bytes) -> str:
    return oid.hex()


def short(oid: bytes) -> str:
    """Return the 12-hex-digit prefix shown to users."""
    return oid.hex()[:12]


def from_hex(text: str) -> bytes:
    """Parse a full 64-digit id; raises ValueError on anything else."""
    if len(text) != ID_SIZE * 2:
        raise ValueError(f"an object id has {ID_SIZE * 2} hex digits, got {len(text)}")
    return bytes.fromhex(text)
