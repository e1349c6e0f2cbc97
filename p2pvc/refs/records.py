"""Signed records that define a repository and its refs.

* `RepositoryRecord`: the first record of a repository. Its id is the
  repository id, so signatures made for one repository never verify in
  another.
* `RefUpdate`: sets one ref to a commit (or deletes it, target None) at a
  hybrid-logical-clock timestamp. `supersedes` lists the ids of the updates
  the author saw as current and meant to replace. It records intent, which
  a fast-forward alone cannot show (a resolved conflict, a rollback).

Both encode as canonical msgpack arrays like the objects in
`p2pvc.objects.model`, and are signed over a domain prefix plus the
encoding with an empty signature.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import msgpack

from p2pvc.errors import CorruptionError
from p2pvc.objects.ids import ID_SIZE, object_id
from p2pvc.refs.hlc import Timestamp

KIND_REPOSITORY = 16
KIND_REF_UPDATE = 17
VERSION = 1
REPOSITORY_DOMAIN = b"p2pvc repository v1\x00"
REF_UPDATE_DOMAIN = b"p2pvc ref update v1\x00"
MAX_SUPERSEDES = 64
MAX_RECORD_BYTES = 16 * 1024
BRANCH_PREFIX = "refs/heads/"
TAG_PREFIX = "refs/tags/"

RESERVED_NAMES = frozenset({"HEAD", "@"})  # revision syntax; a ref of that name would be unreachable by name

# Git's rules, simplified: components of safe characters, no "..", no leading dot or dash.
_REF_COMPONENT = re.compile(r"^(?![.-])[A-Za-z0-9._+@=-]{1,100}(?<![.])$")


def check_ref_name(name: str) -> None:
    if not (name.startswith(BRANCH_PREFIX) or name.startswith(TAG_PREFIX)):
        raise CorruptionError(f"ref name {name!r} is not under refs/heads/ or refs/tags/")
    short = name.split("/", 2)[2]
    if short in RESERVED_NAMES:
        raise CorruptionError(f"{short!r} is reserved for revision syntax and cannot name a ref")
    parts = short.split("/")
    if len(name) > 255 or not all(_REF_COMPONENT.match(p) and ".." not in p for p in parts):
        raise CorruptionError(f"invalid ref name {name!r}")


def is_valid_short_name(short: str) -> bool:
    try:
        check_ref_name(BRANCH_PREFIX + short)
    except CorruptionError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class RepositoryRecord:
    creator: bytes
    created_ms: int
    nonce: bytes  # 16 random bytes, so two repositories created at once differ
    signature: bytes = b""

    def signing_payload(self) -> bytes:
        return REPOSITORY_DOMAIN + encode_repository(replace(self, signature=b""))

    @property
    def id(self) -> bytes:
        return object_id(encode_repository(self))


@dataclass(frozen=True, slots=True)
class RefUpdate:
    repo: bytes
    name: str
    target: bytes | None  # commit id; None deletes the ref
    clock: Timestamp
    author: bytes
    supersedes: tuple[bytes, ...] = ()
    signature: bytes = b""

    def signing_payload(self) -> bytes:
        return REF_UPDATE_DOMAIN + encode_ref_update(replace(self, signature=b""))

    @property
    def id(self) -> bytes:
        return object_id(encode_ref_update(self))

    @property
    def is_tag(self) -> bool:
        return self.name.startswith(TAG_PREFIX)


def encode_repository(r: RepositoryRecord) -> bytes:
    return msgpack.packb([KIND_REPOSITORY, VERSION, r.creator, r.created_ms, r.nonce, r.signature], use_bin_type=True)


def encode_ref_update(u: RefUpdate) -> bytes:
    return msgpack.packb(
        [
            KIND_REF_UPDATE,
            VERSION,
            u.repo,
            u.name,
            u.target,
            u.clock.wall_ms,
            u.clock.counter,
            u.author,
            list(u.supersedes),
            u.signature,
        ],
        use_bin_type=True,
    )


def _unpack(data: bytes, kind: int, n_fields: int) -> list:
    if len(data) > MAX_RECORD_BYTES:
        raise CorruptionError(f"record of {len(data)} bytes exceeds the limit of {MAX_RECORD_BYTES}")
    try:
        value = msgpack.unpackb(data, raw=False, use_list=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise CorruptionError(f"record is not valid msgpack: {exc}") from exc
    if not (isinstance(value, list) and len(value) == n_fields + 2 and value[0] == kind):
        raise CorruptionError("record has the wrong kind or number of fields")
    if value[1] != VERSION:
        raise CorruptionError(f"unsupported record version {value[1]!r}")
    return value[2:]


def _bytes(value: object, size: int, what: str) -> bytes:
    if not (isinstance(value, bytes) and len(value) == size):
        raise CorruptionError(f"{what} must be {size} bytes")
    return value


def _uint(value: object, what: str) -> int:
    if not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63):
        raise CorruptionError(f"{what} must be a non-negative integer")
    return value


def decode_repository(data: bytes) -> RepositoryRecord:
    creator, created_ms, nonce, signature = _unpack(data, KIND_REPOSITORY, 4)
    record = RepositoryRecord(
        _bytes(creator, 32, "repository creator"),
        _uint(created_ms, "repository creation time"),
        _bytes(nonce, 16, "repository nonce"),
        _bytes(signature, 64, "repository signature"),
    )
    if encode_repository(record) != data:
        raise CorruptionError("repository record is not in canonical form")
    return record


def decode_ref_update(data: bytes) -> RefUpdate:
    repo, name, target, wall, counter, author, supersedes, signature = _unpack(data, KIND_REF_UPDATE, 8)
    if not isinstance(name, str):
        raise CorruptionError("ref name must be a string")
    check_ref_name(name)
    if target is not None:
        target = _bytes(target, ID_SIZE, "ref target")
    if not (isinstance(supersedes, list) and len(supersedes) <= MAX_SUPERSEDES):
        raise CorruptionError("ref update supersedes must be a short list")
    update = RefUpdate(
        _bytes(repo, ID_SIZE, "repository id"),
        name,
        target,
        Timestamp(_uint(wall, "clock"), _uint(counter, "clock counter")),
        _bytes(author, 32, "ref update author"),
        tuple(_bytes(s, ID_SIZE, "superseded update id") for s in supersedes),
        _bytes(signature, 64, "ref update signature"),
    )
    if encode_ref_update(update) != data:
        raise CorruptionError("ref update is not in canonical form")
    return update
