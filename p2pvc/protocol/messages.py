"""Wire messages of the sync protocol, and their one validated decoding.

Theory of operation. Every libp2p stream of `SYNC_PROTOCOL` carries one
request frame from the opener and one or more response frames back. A
frame is a 4-byte big-endian length and a msgpack array `[type, ...]`.
Streams are cheap on a shared Yamux connection, so there is no session
state beyond one request. Decoding happens here, once: the rest of the code
sees frozen dataclasses whose fields are checked against the limits below,
and any violation raises `ProtocolViolation`, which closes that stream.

This module does no I/O. See docs/protocol.md for the message table.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack

from p2pvc.objects.ids import ID_SIZE

SYNC_PROTOCOL = "/p2pvc/sync/1.0.0"
PROTOCOL_VERSION = 1

MAX_FRAME = 4 * 1024 * 1024  # bytes of one frame's payload
MAX_IDS_PER_REQUEST = 4096
MAX_RECORDS_PER_MESSAGE = 16384
MAX_RECORD_BYTES = 16 * 1024
MAX_REF_NAMES = 4096
MAX_OBJECT_BYTES = 256 * 1024 * 1024  # as p2pvc.objects.model.MAX_OBJECT_BYTES
OBJECT_PART_BYTES = 1024 * 1024  # objects larger than this are sent in parts
MAX_MESSAGE_TEXT = 1024
MAX_HAVE_IDS = 1024  # commits and manifests asked about in one availability request
MAX_SWARM_PEERS = 32  # other swarm members listed in one availability response
MAX_ADDRESSES = 8  # listen addresses per peer
MAX_ADDRESS_CHARS = 256

# Message types
REQ_REPOSITORY = 1
REQ_HEADS = 2
REQ_UPDATES = 3
REQ_OBJECTS = 4
ANNOUNCE = 5
REQ_HAVE = 6
RESP_REPOSITORY = 17
RESP_HEADS = 18
RESP_UPDATES = 19
RESP_OBJECT = 20
RESP_END = 21
RESP_ACK = 22
RESP_HAVE = 23
RESP_ERROR = 31

# Error codes in RESP_ERROR
ERR_UNKNOWN_REPOSITORY = 1
ERR_BAD_REQUEST = 2
ERR_BUSY = 3
ERR_INTERNAL = 4

MEMBERS_KEY = ""  # pseudo ref name under which membership records are summarised


class ProtocolViolation(Exception):
    """The remote peer sent something that breaks the protocol."""


@dataclass(frozen=True, slots=True)
class RepositoryRequest:
    repo: bytes | None  # None: "which repositories do you serve?"


@dataclass(frozen=True, slots=True)
class HeadsRequest:
    repo: bytes


@dataclass(frozen=True, slots=True)
class UpdatesRequest:
    repo: bytes
    names: tuple[str, ...]  # ref names; MEMBERS_KEY for membership records


@dataclass(frozen=True, slots=True)
class ObjectsRequest:
    repo: bytes
    ids: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Announce:
    repo: bytes
    records: tuple[bytes, ...]  # signed ref updates and membership records


@dataclass(frozen=True, slots=True)
class HaveRequest:
    """Which of these commits and manifests does the responder hold?

    `listen` holds the requester's own listen addresses when it serves what it
    fetches (a swarm member), so the responder can tell other fetchers about it.
    """

    repo: bytes
    ids: tuple[bytes, ...]
    listen: tuple[str, ...]


# Availability of one asked id: HAVE_ALL, HAVE_NONE, or a bitmap over a manifest's chunk list
# (bit i, counted from the most significant bit of byte 0, set when chunk i is held).
HAVE_NONE = False
HAVE_ALL = True
Have = bool | bytes


@dataclass(frozen=True, slots=True)
class SwarmPeer:
    peer_id: str
    addresses: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class HaveResponse:
    have: tuple[Have, ...]  # one per asked id, in order
    peers: tuple[SwarmPeer, ...]  # other members of this repository's swarm that the responder knows


@dataclass(frozen=True, slots=True)
class RepositoryResponse:
    records: tuple[bytes, ...]  # signed repository records


@dataclass(frozen=True, slots=True)
class HeadsResponse:
    digests: dict[str, bytes]  # ref name (or MEMBERS_KEY) -> digest of its record ids


@dataclass(frozen=True, slots=True)
class UpdatesResponse:
    records: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class ObjectPart:
    """One stored record, or a part of one: `stored[offset:offset+len(data)]`."""

    id: bytes
    kind: int
    codec: int
    raw_size: int
    stored_size: int
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class End:
    missing: tuple[bytes, ...]  # requested ids the responder does not have


@dataclass(frozen=True, slots=True)
class Ack:
    pass


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    code: int
    message: str


Message = (
    RepositoryRequest
    | HeadsRequest
    | UpdatesRequest
    | ObjectsRequest
    | Announce
    | HaveRequest
    | HaveResponse
    | RepositoryResponse
    | HeadsResponse
    | UpdatesResponse
    | ObjectPart
    | End
    | Ack
    | ErrorResponse
)


def encode(message: Message) -> bytes:
    if isinstance(message, RepositoryRequest):
        value: list = [REQ_REPOSITORY, PROTOCOL_VERSION, message.repo]
    elif isinstance(message, HeadsRequest):
        value = [REQ_HEADS, PROTOCOL_VERSION, message.repo]
    elif isinstance(message, UpdatesRequest):
        value = [REQ_UPDATES, PROTOCOL_VERSION, message.repo, list(message.names)]
    elif isinstance(message, ObjectsRequest):
        value = [REQ_OBJECTS, PROTOCOL_VERSION, message.repo, list(message.ids)]
    elif isinstance(message, Announce):
        value = [ANNOUNCE, PROTOCOL_VERSION, message.repo, list(message.records)]
    elif isinstance(message, HaveRequest):
        value = [REQ_HAVE, PROTOCOL_VERSION, message.repo, list(message.ids), list(message.listen)]
    elif isinstance(message, HaveResponse):
        value = [RESP_HAVE, list(message.have), [[p.peer_id, list(p.addresses)] for p in message.peers]]
    elif isinstance(message, RepositoryResponse):
        value = [RESP_REPOSITORY, list(message.records)]
    elif isinstance(message, HeadsResponse):
        value = [RESP_HEADS, [[k, v] for k, v in sorted(message.digests.items())]]
    elif isinstance(message, UpdatesResponse):
        value = [RESP_UPDATES, list(message.records)]
    elif isinstance(message, ObjectPart):
        m = message
        value = [RESP_OBJECT, m.id, m.kind, m.codec, m.raw_size, m.stored_size, m.offset, m.data]
    elif isinstance(message, End):
        value = [RESP_END, list(message.missing)]
    elif isinstance(message, Ack):
        value = [RESP_ACK]
    elif isinstance(message, ErrorResponse):
        value = [RESP_ERROR, message.code, message.message[:MAX_MESSAGE_TEXT]]
    else:
        raise TypeError(f"not a protocol message: {type(message).__name__}")
    data = msgpack.packb(value, use_bin_type=True)
    if len(data) > MAX_FRAME:
        raise ValueError(f"message of {len(data)} bytes exceeds MAX_FRAME ({MAX_FRAME})")
    return data


def decode(data: bytes | bytearray) -> Message:
    """Parse and validate one frame payload; raises ProtocolViolation."""
    if len(data) > MAX_FRAME:
        raise ProtocolViolation(f"frame of {len(data)} bytes exceeds {MAX_FRAME}")
    try:
        value = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            max_bin_len=MAX_FRAME,
            max_str_len=MAX_FRAME,
            max_array_len=max(MAX_IDS_PER_REQUEST, MAX_RECORDS_PER_MESSAGE, MAX_REF_NAMES),
            max_map_len=0,
        )
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise ProtocolViolation(f"frame is not valid msgpack: {exc}") from exc
    _require(isinstance(value, list) and value and isinstance(value[0], int), "frame is not a [type, ...] array")
    kind, fields = value[0], value[1:]
    parser = _PARSERS.get(kind)
    if parser is None:
        raise ProtocolViolation(f"unknown message type {kind}")
    return parser(fields)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ProtocolViolation(message)


def _fields(fields: list, count: int, name: str) -> list:
    _require(len(fields) == count, f"{name} must have {count} fields, got {len(fields)}")
    return fields


def _request_fields(fields: list, count: int, name: str) -> list:
    _require(len(fields) >= 1 and fields[0] == PROTOCOL_VERSION, f"{name}: unsupported protocol version {fields[:1]}")
    return _fields(fields[1:], count, name)


def _id(value: object, what: str) -> bytes:
    _require(isinstance(value, bytes) and len(value) == ID_SIZE, f"{what} must be a {ID_SIZE}-byte id")
    return value  # type: ignore[return-value]


def _uint(value: object, what: str) -> int:
    _require(isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63, f"{what} must be a non-negative integer")
    return value  # type: ignore[return-value]


def _records(value: object, what: str) -> tuple[bytes, ...]:
    _require(isinstance(value, list) and len(value) <= MAX_RECORDS_PER_MESSAGE, f"{what} must be a list of records")
    assert isinstance(value, list)
    for record in value:
        _require(isinstance(record, bytes) and 0 < len(record) <= MAX_RECORD_BYTES, f"invalid record in {what}")
    return tuple(value)


def _ids(value: object, what: str) -> tuple[bytes, ...]:
    _require(isinstance(value, list) and len(value) <= MAX_IDS_PER_REQUEST, f"{what} must be a list of at most {MAX_IDS_PER_REQUEST} ids")
    assert isinstance(value, list)
    return tuple(_id(v, what) for v in value)


def _parse_repository_request(fields: list) -> RepositoryRequest:
    (repo,) = _request_fields(fields, 1, "repository request")
    return RepositoryRequest(None if repo is None else _id(repo, "repository id"))


def _parse_heads_request(fields: list) -> HeadsRequest:
    (repo,) = _request_fields(fields, 1, "heads request")
    return HeadsRequest(_id(repo, "repository id"))


def _parse_updates_request(fields: list) -> UpdatesRequest:
    repo, names = _request_fields(fields, 2, "updates request")
    _require(isinstance(names, list) and len(names) <= MAX_REF_NAMES, "ref names must be a short list")
    for name in names:
        _require(isinstance(name, str) and len(name) <= 255, "ref name must be a string of at most 255 characters")
    return UpdatesRequest(_id(repo, "repository id"), tuple(names))


def _parse_objects_request(fields: list) -> ObjectsRequest:
    repo, ids = _request_fields(fields, 2, "objects request")
    return ObjectsRequest(_id(repo, "repository id"), _ids(ids, "object ids"))


def _parse_announce(fields: list) -> Announce:
    repo, records = _request_fields(fields, 2, "announce")
    return Announce(_id(repo, "repository id"), _records(records, "announce"))


def _addresses(value: object, what: str) -> tuple[str, ...]:
    _require(isinstance(value, list) and len(value) <= MAX_ADDRESSES, f"{what} must be a list of at most {MAX_ADDRESSES} addresses")
    assert isinstance(value, list)
    for address in value:
        _require(isinstance(address, str) and 0 < len(address) <= MAX_ADDRESS_CHARS, f"invalid address in {what}")
    return tuple(value)


def _parse_have_request(fields: list) -> HaveRequest:
    repo, ids, listen = _request_fields(fields, 3, "have request")
    _require(isinstance(ids, list) and len(ids) <= MAX_HAVE_IDS, f"have request must ask about at most {MAX_HAVE_IDS} ids")
    return HaveRequest(_id(repo, "repository id"), _ids(ids, "asked ids"), _addresses(listen, "listen addresses"))


def _parse_have_response(fields: list) -> HaveResponse:
    have, peers = _fields(fields, 2, "have response")
    _require(isinstance(have, list) and len(have) <= MAX_HAVE_IDS, "availability must be a short list")
    for item in have:
        _require(isinstance(item, (bool, bytes)), "availability must be true, false or a bitmap")
    _require(isinstance(peers, list) and len(peers) <= MAX_SWARM_PEERS, "swarm peers must be a short list")
    swarm = []
    for peer in peers:
        _require(isinstance(peer, list) and len(peer) == 2 and isinstance(peer[0], str) and 0 < len(peer[0]) <= 128, "swarm peer must be [peer id, addresses]")
        swarm.append(SwarmPeer(peer[0], _addresses(peer[1], "swarm peer addresses")))
    return HaveResponse(tuple(have), tuple(swarm))


def _parse_repository_response(fields: list) -> RepositoryResponse:
    (records,) = _fields(fields, 1, "repository response")
    return RepositoryResponse(_records(records, "repository response"))


def _parse_heads_response(fields: list) -> HeadsResponse:
    (pairs,) = _fields(fields, 1, "heads response")
    _require(isinstance(pairs, list) and len(pairs) <= MAX_REF_NAMES, "heads must be a short list")
    digests = {}
    for pair in pairs:
        _require(isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str), "head must be [name, digest]")
        digests[pair[0]] = _id(pair[1], "head digest")
    return HeadsResponse(digests)


def _parse_updates_response(fields: list) -> UpdatesResponse:
    (records,) = _fields(fields, 1, "updates response")
    return UpdatesResponse(_records(records, "updates response"))


def _parse_object_part(fields: list) -> ObjectPart:
    oid, kind, codec, raw_size, stored_size, offset, data = _fields(fields, 7, "object part")
    part = ObjectPart(
        _id(oid, "object id"),
        _uint(kind, "object kind"),
        _uint(codec, "codec"),
        _uint(raw_size, "raw size"),
        _uint(stored_size, "stored size"),
        _uint(offset, "part offset"),
        data if isinstance(data, bytes) else b"",
    )
    _require(isinstance(data, bytes) and len(data) > 0 or stored_size == 0, "object part data must be bytes")
    _require(part.stored_size <= MAX_OBJECT_BYTES and part.raw_size <= MAX_OBJECT_BYTES, "object too large")
    _require(part.offset + len(part.data) <= part.stored_size, "object part runs past the stored size")
    return part


def _parse_end(fields: list) -> End:
    (missing,) = _fields(fields, 1, "end")
    return End(_ids(missing, "missing ids"))


def _parse_ack(fields: list) -> Ack:
    _fields(fields, 0, "ack")
    return Ack()


def _parse_error(fields: list) -> ErrorResponse:
    code, text = _fields(fields, 2, "error")
    _require(isinstance(code, int) and isinstance(text, str), "error must be [code, text]")
    return ErrorResponse(code, text[:MAX_MESSAGE_TEXT])


_PARSERS = {
    REQ_REPOSITORY: _parse_repository_request,
    REQ_HEADS: _parse_heads_request,
    REQ_UPDATES: _parse_updates_request,
    REQ_OBJECTS: _parse_objects_request,
    ANNOUNCE: _parse_announce,
    REQ_HAVE: _parse_have_request,
    RESP_HAVE: _parse_have_response,
    RESP_REPOSITORY: _parse_repository_response,
    RESP_HEADS: _parse_heads_response,
    RESP_UPDATES: _parse_updates_response,
    RESP_OBJECT: _parse_object_part,
    RESP_END: _parse_end,
    RESP_ACK: _parse_ack,
    RESP_ERROR: _parse_error,
}
