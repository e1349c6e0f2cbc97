"""Bundles: signed records and objects in one file, for sites that share no network.

Theory of operation. A bundle carries what a pull would fetch: the
repository record, every membership record, the ref updates of the chosen
refs, and the objects those updates reach. Its frames are the wire protocol's
own messages, each a 4-byte big-endian length and a msgpack array (layout
in docs/format.md, "Bundles"). So applying one reuses the wire decoding and
runs the checks of a pull (`p2pvc.node.pull`):

* membership records and ref updates: canonical encoding, repository id,
  signature. A record whose signature does not verify cannot come from an
  intact bundle, so the bundle is rejected. A ref update this repository
  does not accept (its author was not a member at its time, or its clock is
  more than 10 minutes ahead) is skipped and reported, as in a sync;
* objects: the closure walk (`p2pvc.sync.closure.ClosureWalker`) starts at
  the bundle's roots and ref targets and expects each object, with its kind
  and, for a chunk, its size. Every expected object is checked by
  `p2pvc.sync.receive.verify`, and a commit's signature and author as a
  pull checks them. Objects the walk does not expect (already stored here)
  are skipped;
* a ref update is stored last, only once everything it reaches is stored
  (the closure rule), and only when the whole bundle verified, including
  the BLAKE3 digest in its trailer. On damage, the objects and membership
  records verified before it stay stored, and no ref changes.

Objects come top-down (commits, trees, manifests, then chunks), so the walk
expects every object before it arrives. Applying streams: memory holds one
frame (at most 4 MiB), one object being assembled (a manifest can be
large, as in a pull) and the ids the walk tracks, never a whole file.

Incremental bundles: `local_heads` lists this repository's ref digests and
the commits whose whole closure it stores. A bundle made `since` such a
list leaves out the updates of refs whose digests match, the commits the
receiver holds, and every object reachable from the boundary: the held
commits that the bundled commits build on. It may still carry an object
the receiver holds from elsewhere in its history, but never omits one it
lacks, because a held commit implies its whole closure.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import struct
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import blake3
import msgpack

from p2pvc.errors import CorruptionError, P2pvcError, SignatureError, StorageError, UserError
from p2pvc.identity.keys import Identity, verify
from p2pvc.objects import compress, model
from p2pvc.objects.ids import ID_SIZE, chunk_id, object_id
from p2pvc.objects.model import ENTRY_DIR, ENTRY_FILE
from p2pvc.progress import NULL_PROGRESS, Progress
from p2pvc.protocol import messages as m
from p2pvc.protocol.messages import MEMBERS_KEY, ProtocolViolation
from p2pvc.refs import membership
from p2pvc.refs.records import BRANCH_PREFIX, TAG_PREFIX, RefUpdate, decode_ref_update, encode_ref_update
from p2pvc.repo import Repository
from p2pvc.sync.closure import KIND_CHUNK, ClosureWalker
from p2pvc.sync.retired import storable_without_content
from p2pvc.sync.heads import local_digests
from p2pvc.sync.receive import Assembler
from p2pvc.sync.receive import verify as verify_received
from p2pvc.sync.state import RefChange, SyncState

log = logging.getLogger(__name__)

MAGIC = b"P2PVCBDL"
FORMAT_VERSION = 1
HEADER = struct.Struct(">8sH32s")  # magic, format version, repository id
LENGTH = struct.Struct(">I")  # frame payload length, as on the wire
FRAME_ROOTS = 40  # [40, [commit id, ...]]: the commits whose closure the bundle carries
FRAME_TRAILER = 48  # [48, frame count, object count, record count, BLAKE3 of every byte before this frame]
RECORD_FRAME_BYTES = 2 * 1024 * 1024  # records per frame, as a pull's UPDATES responses
SYNC_COMMIT_BYTES = 32 * 1024 * 1024  # durable batches while applying, as in a pull
HEADS_FORMAT = "p2pvc bundle heads"
HEADS_VERSION = 1
MAX_HEADS_COMMITS = 1_000_000  # a heads file lists at most this many commits

_STAGES = {m.RepositoryResponse: 0, m.UpdatesResponse: 1, "roots": 2, m.ObjectPart: 3}


@dataclass(frozen=True)
class Roots:
    ids: tuple[bytes, ...]


@dataclass(frozen=True)
class Trailer:
    frames: int
    objects: int
    records: int
    digest: bytes


@dataclass(frozen=True)
class Frame:
    index: int  # 1 for the first frame after the header
    offset: int  # of the frame's length prefix in the file
    size: int  # bytes of the frame, length prefix included
    message: object


# Reading --------------------------------------------------------------------------------


class BundleReader:
    """Reads a bundle frame by frame, hashing every byte for the trailer check."""

    def __init__(self, file: BinaryIO, name: str) -> None:
        self._file = file
        self.name = name
        header = file.read(HEADER.size)
        if len(header) < HEADER.size or not header.startswith(MAGIC):
            raise UserError(f"{name} is not a p2pvc bundle", hint="bundles are written by p2pvc bundle create")
        _magic, version, repository = HEADER.unpack(header)
        if version != FORMAT_VERSION:
            raise UserError(
                f"{name} is a bundle of format version {version}, but this p2pvc reads version {FORMAT_VERSION}",
                hint="upgrade p2pvc",
            )
        self.repository: bytes = repository
        self._hasher = blake3.blake3(header)
        self._offset = HEADER.size
        self.frame_count = 0
        self.finished = False

    def frames(self) -> Iterator[Frame]:
        """Yield every frame up to and including the verified trailer, and raise CorruptionError on damage."""
        while True:
            offset = self._offset
            prefix = self._read(LENGTH.size, allow_end=True)
            if not prefix:
                raise self._damaged(offset, "the file ends without its trailer: it is truncated")
            (length,) = LENGTH.unpack(prefix)
            if length > m.MAX_FRAME:
                raise self._damaged(offset, f"the frame declares {length} bytes, more than the limit of {m.MAX_FRAME}")
            payload = self._read(length)
            index = self.frame_count + 1
            message = self._decode(payload, offset)
            if isinstance(message, Trailer):
                self._check_trailer(message, offset)
                self.finished = True
                yield Frame(index, offset, LENGTH.size + length, message)
                return
            self._hasher.update(prefix)
            self._hasher.update(payload)
            self.frame_count = index
            yield Frame(index, offset, LENGTH.size + length, message)

    def _read(self, size: int, allow_end: bool = False) -> bytes:
        data = self._file.read(size)
        if len(data) < size and not (allow_end and not data):
            raise self._damaged(self._offset, f"the file ends inside a frame (wanted {size} bytes, got {len(data)}): it is truncated")
        self._offset += len(data)
        return data

    def _decode(self, payload: bytes, offset: int) -> object:
        # Every frame is a short msgpack array (fixarray) whose first element is its type.
        kind = payload[1] if len(payload) > 1 and payload[0] & 0xF0 == 0x90 else None
        try:
            if kind == FRAME_ROOTS:
                return _parse_roots(payload)
            if kind == FRAME_TRAILER:
                return _parse_trailer(payload)
            message = m.decode(payload)
        except ProtocolViolation as exc:
            raise self._damaged(offset, str(exc)) from exc
        if not isinstance(message, (m.RepositoryResponse, m.UpdatesResponse, m.ObjectPart)):
            raise self._damaged(offset, f"a {type(message).__name__} message does not belong in a bundle")
        return message

    def _check_trailer(self, trailer: Trailer, offset: int) -> None:
        actual = self._hasher.digest()
        if actual != trailer.digest:
            raise CorruptionError(
                f"{self.name}: the BLAKE3 digest of the bundle does not match its trailer: the file was changed or damaged",
                expected=trailer.digest.hex(),
                actual=actual.hex(),
                hint="get an intact copy of the bundle (what verified before this point stays stored)",
            )
        if trailer.frames != self.frame_count:
            raise self._damaged(offset, f"the trailer counts {trailer.frames} frames, the file has {self.frame_count}")
        if self._file.read(1):
            raise self._damaged(self._offset, "there are bytes after the trailer")

    def _damaged(self, offset: int, reason: str) -> CorruptionError:
        return CorruptionError(
            f"{self.name} is damaged at byte {offset} (frame {self.frame_count + 1}): {reason}",
            hint="get an intact copy of the bundle (what verified before this point stays stored)",
        )


def _unpack_frame(payload: bytes, fields: int, frame_name: str) -> list:
    try:
        value = msgpack.unpackb(payload, raw=False, use_list=True, max_bin_len=m.MAX_FRAME, max_array_len=m.MAX_IDS_PER_REQUEST)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise ProtocolViolation(f"{frame_name} frame is not valid msgpack: {exc}") from exc
    if not (isinstance(value, list) and len(value) == fields + 1):
        raise ProtocolViolation(f"{frame_name} frame must have {fields} fields")
    return value[1:]


def _parse_roots(payload: bytes) -> Roots:
    (ids,) = _unpack_frame(payload, 1, "roots")
    if not (isinstance(ids, list) and all(isinstance(i, bytes) and len(i) == ID_SIZE for i in ids)):
        raise ProtocolViolation("roots frame must list 32-byte commit ids")
    return Roots(tuple(ids))


def _parse_trailer(payload: bytes) -> Trailer:
    frames, objects, records, digest = _unpack_frame(payload, 4, "trailer")
    counts_ok = all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63 for v in (frames, objects, records))
    if not (counts_ok and isinstance(digest, bytes) and len(digest) == 32):
        raise ProtocolViolation("trailer frame must be [48, frames, objects, records, 32-byte digest]")
    return Trailer(frames, objects, records, digest)


def read_repository_record(path: Path) -> bytes:
    """Return the signed repository record at the start of a bundle, for creating a replica from it."""
    with _open_for_reading(path) as file:
        reader = BundleReader(file, str(path))
        first = next(reader.frames())
    message = first.message
    if not (isinstance(message, m.RepositoryResponse) and len(message.records) == 1):
        raise CorruptionError(f"{path} does not start with its repository record", hint="get an intact copy of the bundle")
    record = message.records[0]
    if object_id(record) != reader.repository:
        raise CorruptionError(f"{path}: the repository record does not match the bundle's repository id")
    return record


def _open_for_reading(path: Path) -> BinaryIO:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise UserError(f"bundle {path} not found") from None
    except OSError as exc:
        raise StorageError(f"cannot read bundle {path}: {exc.strerror}") from exc


# Applying -------------------------------------------------------------------------------


@dataclass
class ApplyReport:
    repository: bytes
    members_applied: int = 0
    updates_received: int = 0  # new ref updates that verified
    updates_applied: int = 0
    updates_present: int = 0  # already stored here
    rejected: list[str] = field(default_factory=list)  # ref updates this repository does not accept, with reasons
    incomplete: list[str] = field(default_factory=list)  # refs whose update waits for content not in the bundle
    objects_stored: int = 0
    chunks_stored: int = 0
    bytes_stored: int = 0  # stored (compressed) bytes of what was new here
    skipped: int = 0  # objects in the bundle that were already stored or not needed
    changes: list[RefChange] = field(default_factory=list)


class _Applier:
    """State of one bundle being applied (the module docstring lists the rules)."""

    def __init__(self, repo: Repository, name: str) -> None:
        self.repo = repo
        self.name = name
        self.report = ApplyReport(repo.id)
        self.sync_state = SyncState(repo.db)
        self.with_chunks = not repo.history_only
        self.walker = ClosureWalker(repo.store.has, self._load, self.sync_state.is_complete, with_chunks=self.with_chunks)
        self.updates: list[RefUpdate] = []
        self.roots: list[bytes] = []
        self.assembler = Assembler()
        self.stage = -1

    def _load(self, oid: bytes, kind: int) -> model.StoredObject:
        return self.repo.store.get_object(oid, kind)

    def _damaged(self, frame: Frame, reason: str, error: type[CorruptionError] = CorruptionError) -> CorruptionError:
        return error(
            f"{self.name} is damaged at byte {frame.offset} (frame {frame.index}): {reason}",
            hint="get an intact copy of the bundle (what verified before this point stays stored)",
        )

    def handle(self, frame: Frame, session) -> None:
        message = frame.message
        stage = _STAGES["roots"] if isinstance(message, Roots) else _STAGES.get(type(message))
        if stage is not None:
            if stage < self.stage:
                raise self._damaged(frame, f"a {type(message).__name__} frame comes after later parts of the bundle")
            self.stage = stage
        if isinstance(message, m.RepositoryResponse):
            self._repository(frame, message)
        elif isinstance(message, m.UpdatesResponse):
            self._records(frame, message.records)
        elif isinstance(message, Roots):
            for oid in message.ids:
                self.roots.append(oid)
                self.walker.add(oid)
        elif isinstance(message, m.ObjectPart):
            self._object_part(frame, message, session)
        elif isinstance(message, Trailer) and not self.assembler.idle:
            raise self._damaged(frame, "the last object is incomplete")

    def _repository(self, frame: Frame, message: m.RepositoryResponse) -> None:
        if self.stage > 0 or len(message.records) != 1 or object_id(message.records[0]) != self.repo.id:
            raise self._damaged(frame, "the repository record does not match this repository")

    def _records(self, frame: Frame, records: tuple[bytes, ...]) -> None:
        # Membership first: it decides which ref update signatures count.
        members = [r for r in records if _is_membership(r)]
        for record in members:
            self._membership(frame, record)
        for record in records:
            if not _is_membership(record):
                self._ref_update(frame, record)

    def _membership(self, frame: Frame, record: bytes) -> None:
        try:
            decoded = membership.decode(record)
        except CorruptionError as exc:
            raise self._damaged(frame, exc.message) from exc
        if decoded.repo != self.repo.id or not verify(decoded.author, decoded.signature, decoded.signing_payload()):
            raise self._damaged(frame, f"membership record {decoded.id.hex()[:12]} has an invalid signature", SignatureError)
        if self.repo.refs.has_membership(decoded.id):
            return
        try:
            if self.repo.refs.add_membership_verified(decoded):
                self.report.members_applied += 1
        except CorruptionError as exc:
            self.report.rejected.append(f"membership record {decoded.id.hex()[:12]}: {exc.message}")

    def _ref_update(self, frame: Frame, record: bytes) -> None:
        try:
            update = decode_ref_update(record)
        except CorruptionError as exc:
            raise self._damaged(frame, exc.message) from exc
        if update.repo != self.repo.id or not verify(update.author, update.signature, update.signing_payload()):
            raise self._damaged(frame, f"ref update {update.id.hex()[:12]} of {update.name} has an invalid signature", SignatureError)
        if self.repo.refs.has_update(update.id):
            self.report.updates_present += 1
            return
        try:
            self.repo.refs.check_acceptable(update)
        except CorruptionError as exc:
            self.report.rejected.append(exc.message)
            log.warning("bundle %s: rejected a ref update: %s", self.name, exc.message)
            return
        self.report.updates_received += 1
        self.updates.append(update)
        if update.target is not None:
            self.walker.add(update.target)

    def _object_part(self, frame: Frame, part: m.ObjectPart, session) -> None:
        try:
            assembled = self.assembler.add(part)
        except ProtocolViolation as exc:
            raise self._damaged(frame, str(exc)) from exc
        if assembled is None:
            return
        first, stored = assembled
        missing = self.walker.walk()
        kind = missing.objects.get(first.id)
        size = None
        if kind is None:
            size = missing.chunks.get(first.id)
            if size is None:
                self.report.skipped += 1
                return
            kind = KIND_CHUNK
        try:
            received = verify_received(first, stored, kind, size)
        except CorruptionError as exc:
            raise self._damaged(frame, exc.message) from exc
        if isinstance(received.obj, model.Commit):
            self._check_commit(frame, received.id, received.obj)
        if session.put_encoded(received.kind, received.id, received.raw_size, received.codec, received.stored):
            if kind == KIND_CHUNK:
                self.report.chunks_stored += 1
            else:
                self.report.objects_stored += 1
            self.report.bytes_stored += len(received.stored)
        if received.obj is None:
            missing.chunks.pop(received.id, None)
        else:
            self.walker.received(received.id, received.obj)

    def _check_commit(self, frame: Frame, oid: bytes, commit: model.Commit) -> None:
        if not verify(commit.author, commit.signature, commit.signing_payload()):
            raise self._damaged(frame, f"commit {oid.hex()[:12]} has an invalid signature", SignatureError)
        if commit.author not in self.repo.refs.members().ever:
            raise self._damaged(frame, f"commit {oid.hex()[:12]} is signed by a key that was never a member", SignatureError)

    def publish(self) -> None:
        """Store each ref update whose closure is complete, oldest first, as a pull does."""
        repo = self.repo
        before = {u.name: _target(repo, u.name) for u in self.updates}
        checks = {u.id: self._closure(u.target) if u.target is not None else None for u in self.updates}
        complete = {u.id for u in self.updates if u.target is None or checks[u.id] is not None}
        # Updates that will be stored: already stored ones, and the complete ones of this bundle.
        superseders = [u for u in self.updates if u.id in complete]
        for name in {u.name for u in self.updates}:
            superseders += repo.refs.updates(name)
        for update in sorted(self.updates, key=lambda u: (u.clock, u.id)):
            check = checks[update.id]
            if update.id not in complete:
                if not storable_without_content(update, superseders):
                    self.report.incomplete.append(update.name)
                    continue
                # Retired by a later update: it can never be the ref's value, so its content is not needed.
            elif check is not None and self.with_chunks:
                self.sync_state.mark_complete(check.commits)
            try:
                if repo.refs.add_verified(update):
                    self.report.updates_applied += 1
            except P2pvcError as exc:
                self.report.rejected.append(exc.message)
        for root in self.roots:
            check = self._closure(root)
            if check is not None and self.with_chunks:
                self.sync_state.mark_complete(check.commits)
        self.report.incomplete = sorted(set(self.report.incomplete))
        for name, old in sorted(before.items()):
            state = repo.ref_state(name)
            new = state.target if state else None
            conflicted = bool(state and state.conflicted)
            if new != old or conflicted:
                self.report.changes.append(RefChange(name, old, new, conflicted))

    def _closure(self, commit_id: bytes) -> ClosureWalker | None:
        """Return a finished walk below `commit_id` if everything it reaches is stored, else None."""
        check = ClosureWalker(self.repo.store.has, self._load, self.sync_state.is_complete, with_chunks=self.with_chunks)
        check.add(commit_id)
        missing = check.walk()
        if missing.objects or missing.chunks:
            return None
        return check


def _is_membership(record: bytes) -> bool:
    # Both record kinds are msgpack arrays whose first element is the kind (a positive fixint).
    return len(record) > 1 and record[1] == membership.KIND_MEMBERSHIP


def _target(repo: Repository, name: str) -> bytes | None:
    state = repo.ref_state(name)
    return state.target if state else None


def apply_bundle(repo: Repository, path: Path, *, progress: Progress = NULL_PROGRESS) -> ApplyReport:
    """Verify and store what a bundle carries, by the rules in the module docstring."""
    name = str(path)
    with repo.lock(), _open_for_reading(path) as file:
        reader = BundleReader(file, name)
        if reader.repository != repo.id:
            raise UserError(
                f"{name} is a bundle of repository {reader.repository.hex()[:12]}, but this is {repo.id.hex()[:12]}",
                hint="apply it in a replica of that repository, or create one from it with p2pvc bundle clone",
            )
        applier = _Applier(repo, name)
        progress.start("applying", os.fstat(file.fileno()).st_size)
        try:
            with repo.store.session(SYNC_COMMIT_BYTES) as session:
                try:
                    for frame in reader.frames():
                        applier.handle(frame, session)
                        progress.advance(frame.size)
                except BaseException:
                    # Everything pending was verified before it was appended: keep it, then fail.
                    session.commit()
                    raise
        finally:
            progress.finish()
        applier.publish()
    return applier.report


def clone_from_bundle(path: Path, directory: Path, identity: Identity | None = None) -> tuple[Repository, ApplyReport]:
    """Create a replica of the bundle's repository in `directory` and apply the bundle to it."""
    record = read_repository_record(path)
    repo = Repository.init_from_record(directory, record, identity)
    return repo, apply_bundle(repo, path)


# Heads of a repository, for incremental bundles ---------------------------------------------


def local_heads(repo: Repository) -> dict:
    """Return the JSON value `p2pvc bundle heads` prints: ref digests and complete commits.

    The commits are every head whose whole closure is stored here, then all
    their ancestors (complete too, by the closure rule), so a sender finds
    the newest commit it shares with this replica even when it lacks the
    heads themselves.
    """
    digests = local_digests(repo.refs.update_ids_by_name(), [i for i, _ in repo.refs.membership_records()])
    sync_state = SyncState(repo.db)
    heads = []
    for state in repo.ref_states():
        for head in state.heads:
            if head.target is not None and _is_complete(repo, sync_state, head.target):
                heads.append(head.target)
    commits = list(dict.fromkeys(heads))
    listed = set(commits)
    commits.extend(c for c in _ancestry(repo, commits) if c not in listed)
    members = digests.pop(MEMBERS_KEY, None)
    return {
        "format": HEADS_FORMAT,
        "version": HEADS_VERSION,
        "repository": repo.id.hex(),
        "refs": {name: digest.hex() for name, digest in sorted(digests.items())},
        "members": members.hex() if members else None,
        "commits": [c.hex() for c in commits[:MAX_HEADS_COMMITS]],
    }


def _is_complete(repo: Repository, sync_state: SyncState, commit_id: bytes) -> bool:
    """Return whether everything `commit_id` reaches, chunks included, is stored here."""
    if sync_state.is_complete(commit_id):
        return True
    if repo.history_only:
        return False
    walker = ClosureWalker(repo.store.has, lambda oid, kind: repo.store.get_object(oid, kind), sync_state.is_complete)
    walker.add(commit_id)
    missing = walker.walk()
    if missing.objects or missing.chunks:
        return False
    sync_state.mark_complete(walker.commits)
    return True


@dataclass(frozen=True)
class PeerHeads:
    refs: dict[str, bytes]
    commits: tuple[bytes, ...]


def read_heads(repo: Repository, path: Path) -> PeerHeads:
    """Parse and check a file written by `p2pvc bundle heads` in another replica."""
    try:
        value = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"heads file {path} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read heads file {path}: {exc}", hint="write it with: p2pvc bundle heads > FILE") from exc
    if not (isinstance(value, dict) and value.get("format") == HEADS_FORMAT and value.get("version") == HEADS_VERSION):
        raise UserError(f"{path} is not a heads file of version {HEADS_VERSION}", hint="write it with: p2pvc bundle heads > FILE")
    if value.get("repository") != repo.id.hex():
        raise UserError(
            f"{path} lists the heads of repository {str(value.get('repository'))[:12]}, but this is {repo.id.hex()[:12]}"
        )
    refs = value.get("refs")
    commits = value.get("commits")
    try:
        if not (isinstance(refs, dict) and isinstance(commits, list) and len(commits) <= MAX_HEADS_COMMITS):
            raise ValueError("refs must be an object and commits a list")
        parsed_refs = {str(name): _hex_id(digest) for name, digest in refs.items()}
        parsed_commits = tuple(_hex_id(c) for c in commits)
    except (ValueError, TypeError) as exc:
        raise UserError(f"invalid heads file {path}: {exc}", hint="write it with: p2pvc bundle heads > FILE") from exc
    return PeerHeads(parsed_refs, parsed_commits)


def _hex_id(text: object) -> bytes:
    if not (isinstance(text, str) and len(text) == 2 * ID_SIZE):
        raise ValueError(f"{text!r} is not a 64-digit hex id")
    return bytes.fromhex(text)


# Creating ---------------------------------------------------------------------------------


@dataclass
class CreateReport:
    path: Path
    refs: list[str]
    records: int = 0  # membership records and ref updates
    commits: int = 0
    objects: int = 0  # trees and manifests
    chunks: int = 0
    bytes: int = 0  # size of the bundle file
    missing: int = 0  # objects this repository does not store (a history-only clone), left out


class _FrameWriter:
    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.hasher = blake3.blake3()
        self.frames = 0
        self.size = 0

    def raw(self, data: bytes) -> None:
        self.file.write(data)
        self.hasher.update(data)
        self.size += len(data)

    def frame(self, payload: bytes) -> None:
        self.raw(LENGTH.pack(len(payload)) + payload)
        self.frames += 1

    def message(self, message: m.Message) -> None:
        self.frame(m.encode(message))

    def records(self, records: list[bytes]) -> None:
        batch: list[bytes] = []
        size = 0
        for record in records:
            if batch and (size + len(record) > RECORD_FRAME_BYTES or len(batch) >= m.MAX_RECORDS_PER_MESSAGE):
                self.message(m.UpdatesResponse(tuple(batch)))
                batch, size = [], 0
            batch.append(record)
            size += len(record)
        if batch:
            self.message(m.UpdatesResponse(tuple(batch)))

    def stored(self, oid: bytes, kind: int, codec: int, raw_size: int, stored: bytes) -> None:
        for offset in range(0, max(len(stored), 1), m.OBJECT_PART_BYTES):
            part = stored[offset : offset + m.OBJECT_PART_BYTES]
            self.message(m.ObjectPart(oid, kind, codec, raw_size, len(stored), offset, part))

    def trailer(self, objects: int, records: int) -> None:
        digest = self.hasher.digest()
        self.raw_trailer(msgpack.packb([FRAME_TRAILER, self.frames, objects, records, digest], use_bin_type=True))

    def raw_trailer(self, payload: bytes) -> None:
        data = LENGTH.pack(len(payload)) + payload
        self.file.write(data)
        self.size += len(data)


def _select(repo: Repository, revs: list[str]) -> tuple[list[str], list[bytes]]:
    """Return (ref names, root commits) for `revs`, where no revs means every ref."""
    if not revs:
        names = repo.refs.names()
        return names, _update_targets(repo, names)
    names: list[str] = []
    roots: list[bytes] = []
    for rev in revs:
        name = next(
            (n for n in (rev, BRANCH_PREFIX + rev, TAG_PREFIX + rev) if n.startswith("refs/") and repo.ref_state(n) is not None),
            None,
        )
        if name is not None:
            names.append(name)
            roots.extend(_update_targets(repo, [name]))
        else:
            roots.append(repo.resolve(rev))
    return list(dict.fromkeys(names)), list(dict.fromkeys(roots))


def _update_targets(repo: Repository, names: list[str]) -> list[bytes]:
    """Return the stored commits that any update of `names` points to, heads first.

    A pull fetches what every received update reaches, retired ones included,
    because an update is stored only with its content, and a retired update
    that is missing on the receiver can leave an older one looking like a head.
    A bundle carries the same.
    """
    targets = []
    for name in names:
        state = repo.ref_state(name)
        if state is not None:
            targets.extend(h.target for h in state.heads if h.target is not None)
        for update in sorted(repo.refs.updates(name), key=lambda u: (u.clock, u.id), reverse=True):
            if update.target is not None and repo.store.has(update.target):
                targets.append(update.target)
    return list(dict.fromkeys(targets))


def _stored(repo: Repository, oid: bytes, kind: int) -> tuple[int, int, bytes, model.StoredObject | None] | None:
    """Return (codec, raw size, stored bytes, decoded object) of a verified record, or None if absent."""
    found = repo.store.read_stored(oid)
    if found is None:
        return None
    entry, stored = found
    if entry.kind != kind:
        raise CorruptionError(f"{oid.hex()} is stored as kind {entry.kind}, but a parent names it as kind {kind}")
    # Verified before sending, so a bundle never carries a record this store damaged.
    raw = compress.decode(entry.codec, stored, entry.raw_size)
    actual = chunk_id(raw) if kind == KIND_CHUNK else object_id(raw)
    if actual != oid:
        raise CorruptionError(
            f"stored {'chunk' if kind == KIND_CHUNK else 'object'} {oid.hex()} does not match its hash",
            expected=oid.hex(),
            actual=actual.hex(),
            hint="run p2pvc fsck to list every damaged object",
        )
    obj = None if kind == KIND_CHUNK else model.decode(raw, kind)
    return entry.codec, entry.raw_size, stored, obj


def _children(obj: model.StoredObject) -> Iterator[tuple[bytes, int, int | None]]:
    """Yield (id, kind, chunk size) of what an object refers to, parents of a commit excluded."""
    if isinstance(obj, model.Commit):
        yield obj.tree, model.KIND_TREE, None
    elif isinstance(obj, model.Tree):
        for entry in obj.entries:
            if entry.kind == ENTRY_DIR:
                yield entry.target, model.KIND_TREE, None
            elif entry.kind == ENTRY_FILE:
                yield entry.target, model.KIND_MANIFEST, None
    elif isinstance(obj, model.Manifest):
        for chunk in obj.chunks:
            yield chunk.id, KIND_CHUNK, chunk.size


def _commit_walk(repo: Repository, roots: list[bytes], stop: set[bytes]) -> tuple[list[bytes], set[bytes]]:
    """Walk commits from `roots` down to the `stop` set.

    Returns the commits walked, newest first, and the stop commits the walk reached.
    """
    order: list[bytes] = []
    boundary: set[bytes] = set()
    seen: set[bytes] = set()
    queue = deque(roots)
    while queue:
        oid = queue.popleft()
        if oid in seen:
            continue
        seen.add(oid)
        if oid in stop:
            boundary.add(oid)
            continue
        if not repo.store.has(oid):
            continue
        order.append(oid)
        queue.extend(repo.read_commit(oid).commit.parents)
    return order, boundary


def _ancestry(repo: Repository, commits: list[bytes]) -> set[bytes]:
    seen: set[bytes] = set()
    stack = [c for c in commits if repo.store.has(c)]
    seen.update(stack)
    while stack:
        for parent in repo.read_commit(stack.pop()).commit.parents:
            if parent not in seen and repo.store.has(parent):
                seen.add(parent)
                stack.append(parent)
    return seen


def _objects_below(repo: Repository, commits: set[bytes]) -> set[bytes]:
    """Return the ids of every tree, manifest and chunk the trees of `commits` reach."""
    seen: set[bytes] = set()
    stack: list[tuple[bytes, int]] = [(repo.read_commit(c).commit.tree, model.KIND_TREE) for c in commits]
    while stack:
        oid, kind = stack.pop()
        if oid in seen:
            continue
        seen.add(oid)
        if kind == KIND_CHUNK or not repo.store.has(oid):
            continue
        for child, child_kind, _size in _children(repo.store.get_object(oid, kind)):
            if child not in seen:
                stack.append((child, child_kind))
    return seen


def create_bundle(
    repo: Repository,
    path: Path,
    revs: list[str] | None = None,
    *,
    since: Path | None = None,
    progress: Progress = NULL_PROGRESS,
) -> CreateReport:
    """Write a bundle of `revs` (default: every ref) to `path`, leaving out what `since` lists as held."""
    with repo.lock():
        names, roots = _select(repo, list(revs or []))
        excluded_commits: set[bytes] = set()
        if since is not None:
            peer = read_heads(repo, since)
            digests = local_digests(repo.refs.update_ids_by_name(), [])
            names = [n for n in names if digests.get(n) != peer.refs.get(n)]
            excluded_commits = _ancestry(repo, list(peer.commits))
        commits, boundary = _commit_walk(repo, roots, excluded_commits)
        excluded_objects = _objects_below(repo, boundary) if boundary else set()
        report = CreateReport(Path(path), names)
        records = _signed_records(repo, names)
        tmp = Path(path).with_name(f".{Path(path).name}.{secrets.token_hex(4)}.tmp")
        try:
            with open(tmp, "wb") as file:
                writer = _FrameWriter(file)
                writer.raw(HEADER.pack(MAGIC, FORMAT_VERSION, repo.id))
                writer.message(m.RepositoryResponse((repo.db.get_meta("repository") or b"",)))
                writer.records(records)
                included = set(commits)
                root_ids = [c for c in dict.fromkeys(roots) if c in included]
                for start in range(0, len(root_ids), m.MAX_IDS_PER_REQUEST):
                    writer.frame(msgpack.packb([FRAME_ROOTS, root_ids[start : start + m.MAX_IDS_PER_REQUEST]], use_bin_type=True))
                _write_objects(repo, writer, commits, excluded_objects, report, progress)
                writer.trailer(report.commits + report.objects + report.chunks, len(records))
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            _remove_quietly(tmp)
            raise StorageError(f"cannot write bundle {path}: {exc.strerror}") from exc
        except BaseException:
            _remove_quietly(tmp)
            raise
        report.records = len(records)
        report.bytes = writer.size
    return report


def _remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _signed_records(repo: Repository, names: list[str]) -> list[bytes]:
    """Return every membership record and the updates of `names`, each verified before it goes out."""
    records = []
    for _record_id, record in repo.refs.membership_records():
        try:
            decoded = membership.decode(record)
        except CorruptionError as exc:
            log.warning("not bundling a damaged membership record: %s", exc.message)
            continue
        if verify(decoded.author, decoded.signature, decoded.signing_payload()):
            records.append(record)
    for name in names:
        # RefDB.updates verifies each stored record and leaves out damaged ones.
        records.extend(encode_ref_update(u) for u in sorted(repo.refs.updates(name), key=lambda u: (u.clock, u.id)))
    return records


def _write_objects(
    repo: Repository, writer: _FrameWriter, commits: list[bytes], excluded: set[bytes], report: CreateReport, progress: Progress
) -> None:
    """Write commits, then trees and manifests top-down, then chunks, each after whatever refers to it."""
    chunks: dict[bytes, int] = {}  # id -> raw size, in first-seen order
    seen: set[bytes] = set(excluded)
    queue: deque[tuple[bytes, int]] = deque((c, model.KIND_COMMIT) for c in commits)
    seen.update(commits)
    while queue:
        oid, kind = queue.popleft()
        found = _stored(repo, oid, kind)
        if found is None:
            report.missing += 1
            continue
        codec, raw_size, stored, obj = found
        writer.stored(oid, kind, codec, raw_size, stored)
        if kind == model.KIND_COMMIT:
            report.commits += 1
        else:
            report.objects += 1
        assert obj is not None
        for child, child_kind, size in _children(obj):
            if child in seen:
                continue
            seen.add(child)
            if child_kind == KIND_CHUNK:
                assert size is not None
                chunks[child] = size
            else:
                queue.append((child, child_kind))
    progress.start("bundling", sum(chunks.values()))
    try:
        for cid in chunks:
            found = _stored(repo, cid, KIND_CHUNK)
            if found is None:
                report.missing += 1
                continue
            codec, raw_size, stored, _obj = found
            writer.stored(cid, KIND_CHUNK, codec, raw_size, stored)
            report.chunks += 1
            progress.advance(raw_size)
    finally:
        progress.finish()
