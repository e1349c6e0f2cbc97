"""Manifests, trees and commits, and their one canonical msgpack form.

Every object encodes as a msgpack array `[kind, version, ...fields]` with
fixed field order, binary strings for ids and names, UTF-8 strings for text,
and msgpack's shortest integer forms. Decoding re-encodes the value and
rejects input that differs, so each object has exactly one byte form and
therefore one id. The layout is written down in docs/format.md.

Decoding is the trust boundary for stored and received bytes: everything a
peer or a damaged pack could put here is checked against the limits below
and reported as CorruptionError, never as a crash further in.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field, replace

import msgpack

from p2pvc.errors import CorruptionError
from p2pvc.objects.ids import ID_SIZE, object_id

KIND_MANIFEST = 1
KIND_TREE = 2
KIND_COMMIT = 3
KIND_NAMES = {KIND_MANIFEST: "manifest", KIND_TREE: "tree", KIND_COMMIT: "commit"}
VERSION = 1

ENTRY_FILE = 1
ENTRY_DIR = 2
ENTRY_SYMLINK = 3
ENTRY_KIND_NAMES = {ENTRY_FILE: "file", ENTRY_DIR: "dir", ENTRY_SYMLINK: "symlink"}

MAX_NAME_BYTES = 255  # the usual file-system limit per path component
MAX_LINK_TARGET_BYTES = 4096  # PATH_MAX on Linux
MAX_MESSAGE_BYTES = 64 * 1024
MAX_METADATA_ITEMS = 256
MAX_METADATA_KEY_BYTES = 128
MAX_METADATA_VALUE_BYTES = 4096
MAX_PARENTS = 64
MAX_OBJECT_BYTES = 256 * 1024 * 1024  # a manifest of a 400 GiB file is about 240 MB
SIGNATURE_SIZE = 64  # Ed25519
PUBLIC_KEY_SIZE = 32  # Ed25519
COMMIT_SIGNING_DOMAIN = b"p2pvc commit v1\x00"


@dataclass(frozen=True, slots=True)
class ChunkRef:
    id: bytes
    size: int  # raw bytes


@dataclass(frozen=True, slots=True)
class Manifest:
    """The ordered chunks of one file's content."""

    size: int
    chunks: tuple[ChunkRef, ...]

    kind = KIND_MANIFEST


@dataclass(frozen=True, slots=True)
class TreeEntry:
    """One name in a directory.

    `target` is the object id of a manifest (file) or tree (dir), or the raw
    link target of a symlink. `size` is the file's size, the total size of
    the files below a dir, or the length of a link target.
    """

    name: bytes
    kind: int
    executable: bool
    target: bytes
    size: int


@dataclass(frozen=True, slots=True)
class Tree:
    entries: tuple[TreeEntry, ...]  # sorted by name bytes, names unique

    kind = KIND_TREE


@dataclass(frozen=True, slots=True)
class Commit:
    tree: bytes
    parents: tuple[bytes, ...]
    author: bytes  # Ed25519 public key
    time_ms: int  # Unix time in milliseconds, as the author's clock read it
    message: str
    metadata: tuple[tuple[str, str], ...] = ()  # sorted by key, keys unique
    signature: bytes = field(default=b"")

    kind = KIND_COMMIT

    def unsigned(self) -> Commit:
        return replace(self, signature=b"")

    def signing_payload(self) -> bytes:
        """Return the bytes the author signs: a domain prefix and the unsigned encoding."""
        return COMMIT_SIGNING_DOMAIN + encode(self.unsigned())


StoredObject = Manifest | Tree | Commit


def encode(obj: StoredObject) -> bytes:
    if isinstance(obj, Manifest):
        fields: list[object] = [obj.size, [[c.id, c.size] for c in obj.chunks]]
    elif isinstance(obj, Tree):
        fields = [[[e.name, e.kind, e.executable, e.target, e.size] for e in obj.entries]]
    elif isinstance(obj, Commit):
        fields = [
            obj.tree,
            list(obj.parents),
            obj.author,
            obj.time_ms,
            obj.message,
            [[k, v] for k, v in obj.metadata],
            obj.signature,
        ]
    else:
        raise TypeError(f"not a stored object: {type(obj).__name__}")
    return msgpack.packb([obj.kind, VERSION, *fields], use_bin_type=True)


def hash_object(obj: StoredObject) -> tuple[bytes, bytes]:
    """Return (id, encoding) of an object."""
    data = encode(obj)
    return object_id(data), data


def decode(data: bytes, expected_kind: int | None = None) -> StoredObject:
    """Parse and validate an object encoding; raises CorruptionError on any deviation."""
    if len(data) > MAX_OBJECT_BYTES:
        raise CorruptionError(f"object of {len(data)} bytes exceeds the limit of {MAX_OBJECT_BYTES}")
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise CorruptionError(f"object is not valid msgpack: {exc}") from exc
    obj = _from_value(value, expected_kind)
    if encode(obj) != bytes(data):
        raise CorruptionError("object is not in canonical form")
    return obj


def _from_value(value: object, expected_kind: int | None) -> StoredObject:
    _check(isinstance(value, list) and len(value) >= 2, "object is not a [kind, version, ...] array")
    assert isinstance(value, list)
    kind, version = value[0], value[1]
    _check(isinstance(kind, int) and kind in KIND_NAMES, f"unknown object kind {kind!r}")
    _check(isinstance(version, int) and version == VERSION, f"unsupported {KIND_NAMES[kind]} version {version!r}")
    if expected_kind is not None and kind != expected_kind:
        raise CorruptionError(
            "object has the wrong kind",
            expected=KIND_NAMES[expected_kind],
            actual=KIND_NAMES[kind],
        )
    fields = value[2:]
    if kind == KIND_MANIFEST:
        return _manifest(fields)
    if kind == KIND_TREE:
        return _tree(fields)
    return _commit(fields)


def _manifest(fields: list) -> Manifest:
    _check(len(fields) == 2, "manifest must have 2 fields")
    size, raw_chunks = fields
    _check(_is_uint(size), "manifest size must be a non-negative integer")
    _check(isinstance(raw_chunks, list), "manifest chunks must be a list")
    chunks = []
    total = 0
    for item in raw_chunks:
        _check(isinstance(item, list) and len(item) == 2, "manifest chunk must be [id, size]")
        cid, csize = item
        _check(_is_id(cid), "manifest chunk id must be 32 bytes")
        _check(_is_uint(csize) and csize > 0, "manifest chunk size must be positive")
        chunks.append(ChunkRef(cid, csize))
        total += csize
    _check(total == size, f"manifest chunk sizes add up to {total}, not the declared {size}")
    return Manifest(size, tuple(chunks))


def _tree(fields: list) -> Tree:
    _check(len(fields) == 1 and isinstance(fields[0], list), "tree must have one list of entries")
    entries = []
    previous: bytes | None = None
    for item in fields[0]:
        _check(isinstance(item, list) and len(item) == 5, "tree entry must have 5 fields")
        name, kind, executable, target, size = item
        _check(isinstance(name, bytes), "tree entry name must be bytes")
        check_entry_name(name)
        _check(previous is None or name > previous, f"tree entries not sorted or not unique at {name!r}")
        previous = name
        _check(isinstance(kind, int) and kind in ENTRY_KIND_NAMES, f"unknown tree entry kind {kind!r} for {name!r}")
        _check(isinstance(executable, bool), "tree entry executable flag must be a boolean")
        _check(_is_uint(size), "tree entry size must be a non-negative integer")
        if kind == ENTRY_SYMLINK:
            _check(
                isinstance(target, bytes) and 0 < len(target) <= MAX_LINK_TARGET_BYTES and b"\x00" not in target,
                f"invalid symlink target for {name!r}",
            )
            _check(size == len(target) and not executable, f"invalid symlink entry {name!r}")
        else:
            _check(_is_id(target), f"tree entry {name!r} must point to a 32-byte id")
            _check(kind == ENTRY_FILE or not executable, f"directory {name!r} cannot be executable")
        entries.append(TreeEntry(name, kind, executable, target, size))
    return Tree(tuple(entries))


def _commit(fields: list) -> Commit:
    _check(len(fields) == 7, "commit must have 7 fields")
    tree, parents, author, time_ms, message, metadata, signature = fields
    _check(_is_id(tree), "commit tree must be a 32-byte id")
    _check(isinstance(parents, list) and len(parents) <= MAX_PARENTS, "commit parents must be a list")
    _check(all(_is_id(p) for p in parents), "commit parent must be a 32-byte id")
    _check(len(set(parents)) == len(parents), "commit lists a parent twice")
    _check(isinstance(author, bytes) and len(author) == PUBLIC_KEY_SIZE, "commit author must be a 32-byte key")
    _check(_is_uint(time_ms), "commit time must be a non-negative integer")
    _check(isinstance(message, str) and len(message.encode()) <= MAX_MESSAGE_BYTES, "invalid commit message")
    _check(isinstance(metadata, list) and len(metadata) <= MAX_METADATA_ITEMS, "invalid commit metadata")
    pairs = []
    for item in metadata:
        _check(isinstance(item, list) and len(item) == 2, "metadata item must be [key, value]")
        key, val = item
        check_metadata_item(key, val)
        pairs.append((key, val))
    keys = [k for k, _ in pairs]
    _check(keys == sorted(set(keys)), "metadata keys not sorted or not unique")
    _check(isinstance(signature, bytes) and len(signature) == SIGNATURE_SIZE, "commit signature must be 64 bytes")
    return Commit(tree, tuple(parents), author, time_ms, message, tuple(pairs), signature)


def check_entry_name(name: bytes) -> None:
    """Reject names that could escape the working tree or touch the repository folder."""
    _check(0 < len(name) <= MAX_NAME_BYTES, f"tree entry name has invalid length: {name!r}")
    _check(b"/" not in name and b"\x00" not in name, f"tree entry name contains '/' or NUL: {name!r}")
    _check(name not in (b".", b".."), f"tree entry name is {name!r}")
    _check(name != b".p2pvc", "tree entry is named .p2pvc, the repository folder")


def check_metadata_item(key: object, value: object) -> None:
    _check(isinstance(key, str) and isinstance(value, str), "metadata keys and values must be strings")
    assert isinstance(key, str) and isinstance(value, str)
    _check(0 < len(key.encode()) <= MAX_METADATA_KEY_BYTES, f"metadata key has invalid length: {key!r}")
    _check("=" not in key and unicodedata.category(key[0])[0] != "C", f"invalid metadata key {key!r}")
    _check(len(value.encode()) <= MAX_METADATA_VALUE_BYTES, f"metadata value too long for key {key!r}")


def _is_id(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == ID_SIZE


def _is_uint(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise CorruptionError(message)
