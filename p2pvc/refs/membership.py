"""Repository membership: who may sign commits and ref updates.

A membership record adds or removes one member's key. It is signed, carries
a hybrid-logical-clock timestamp, and syncs like a ref update.

Theory of operation. The creator of the repository (the signer of its
repository record) is always a member. Records are applied in (clock, id)
order; a record takes effect only if its author is a member at that point,
so a removed member cannot re-add itself, and every replica that holds the
same set of records computes the same member set, whatever order they
arrived in. A ref update is accepted if its author is a member at the
update's timestamp; a commit is accepted if its author was ever a member,
so history signed before a removal stays valid.

The record keeps a role field for later (read access, admin rights); only
`ROLE_WRITER` exists now.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, replace

import msgpack

from p2pvc.errors import CorruptionError
from p2pvc.objects.ids import ID_SIZE, object_id
from p2pvc.refs.hlc import Timestamp

KIND_MEMBERSHIP = 18
VERSION = 1
MEMBERSHIP_DOMAIN = b"p2pvc membership v1\x00"
ACTION_ADD = 1
ACTION_REMOVE = 2
ROLE_WRITER = 1


@dataclass(frozen=True, slots=True)
class MembershipRecord:
    repo: bytes
    action: int
    member: bytes  # Ed25519 public key
    role: int
    clock: Timestamp
    author: bytes
    signature: bytes = b""

    def signing_payload(self) -> bytes:
        return MEMBERSHIP_DOMAIN + encode(replace(self, signature=b""))

    @property
    def id(self) -> bytes:
        return object_id(encode(self))


def encode(r: MembershipRecord) -> bytes:
    return msgpack.packb(
        [KIND_MEMBERSHIP, VERSION, r.repo, r.action, r.member, r.role, r.clock.wall_ms, r.clock.counter, r.author, r.signature],
        use_bin_type=True,
    )


def decode(data: bytes) -> MembershipRecord:
    try:
        value = msgpack.unpackb(data, raw=False, use_list=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise CorruptionError(f"membership record is not valid msgpack: {exc}") from exc
    if not (isinstance(value, list) and len(value) == 10 and value[0] == KIND_MEMBERSHIP and value[1] == VERSION):
        raise CorruptionError("not a membership record of a known version")
    _, _, repo, action, member, role, wall, counter, author, signature = value
    ok = (
        isinstance(repo, bytes) and len(repo) == ID_SIZE
        and action in (ACTION_ADD, ACTION_REMOVE)
        and isinstance(member, bytes) and len(member) == 32
        and role == ROLE_WRITER
        and isinstance(wall, int) and isinstance(counter, int) and 0 <= wall < 2**63 and 0 <= counter < 2**63
        and isinstance(author, bytes) and len(author) == 32
        and isinstance(signature, bytes) and len(signature) == 64
    )
    if not ok:
        raise CorruptionError("membership record has invalid fields")
    record = MembershipRecord(repo, action, member, role, Timestamp(wall, counter), author, signature)
    if encode(record) != data:
        raise CorruptionError("membership record is not in canonical form")
    return record


@dataclass(frozen=True)
class Members:
    """The member set over time, computed from the creator and the records."""

    creator: bytes
    # (clock, member set after the record at that clock), in clock order
    history: tuple[tuple[Timestamp, frozenset[bytes]], ...]
    ignored: tuple[MembershipRecord, ...]  # records whose author was not a member

    @property
    def current(self) -> frozenset[bytes]:
        return self.history[-1][1] if self.history else frozenset({self.creator})

    @property
    def ever(self) -> frozenset[bytes]:
        result = {self.creator}
        for _, members in self.history:
            result |= members
        return frozenset(result)

    def at(self, clock: Timestamp) -> frozenset[bytes]:
        """Return the member set in force at `clock` (after every record stamped at or before it)."""
        clocks = [c for c, _ in self.history]
        index = bisect.bisect_right(clocks, clock)
        return self.history[index - 1][1] if index else frozenset({self.creator})


def compute_members(creator: bytes, records: list[MembershipRecord]) -> Members:
    members = {creator}
    history: list[tuple[Timestamp, frozenset[bytes]]] = []
    ignored = []
    for record in sorted(set(records), key=lambda r: (r.clock, r.id)):
        if record.author not in members:
            ignored.append(record)
            continue
        if record.action == ACTION_ADD:
            members.add(record.member)
        elif record.member != creator:
            members.discard(record.member)
        history.append((record.clock, frozenset(members)))
    return Members(creator, tuple(history), tuple(ignored))
