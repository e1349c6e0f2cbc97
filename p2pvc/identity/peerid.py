"""libp2p peer ids of Ed25519 keys, computed without importing libp2p.

A libp2p peer id of an Ed25519 key is the identity multihash (code 0x00,
length 36) of the key's protobuf encoding (field 1 KeyType = 1 for Ed25519,
field 2 Data = the 32-byte key), written in base58btc. Commands that only
print a peer id thus avoid libp2p's import cost; a test checks the result
against libp2p itself.
"""

from __future__ import annotations

_B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_ED25519_PROTOBUF_PREFIX = bytes([0x08, 0x01, 0x12, 0x20])  # KeyType=Ed25519, Data of 32 bytes
_IDENTITY_MULTIHASH_PREFIX = bytes([0x00, 36])


def b58encode(data: bytes) -> str:
    number = int.from_bytes(data, "big")
    digits = []
    while number:
        number, rest = divmod(number, 58)
        digits.append(_B58_ALPHABET[rest])
    leading_zeros = len(data) - len(data.lstrip(b"\x00"))
    return "1" * leading_zeros + "".join(reversed(digits))


def peer_id(public_key: bytes) -> str:
    if len(public_key) != 32:
        raise ValueError(f"an Ed25519 public key has 32 bytes, got {len(public_key)}")
    return b58encode(_IDENTITY_MULTIHASH_PREFIX + _ED25519_PROTOBUF_PREFIX + public_key)
