"""A repository on disk: the `.p2pvc` folder and the working tree around it.

Layout of `.p2pvc/`:

    index.sqlite   object index, ref updates, stat cache, settings (WAL mode)
    packs/         append-only pack files
    lock           flock: shared by every command, exclusive for gc

The repository id is the id of its signed `RepositoryRecord`, stored in the
`meta` table together with the local HEAD (a ref name or a commit id).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from p2pvc.errors import CorruptionError, NotARepositoryError, StorageError, UserError
from p2pvc.identity.keys import Identity, load_or_create, verify
from p2pvc.objects import model
from p2pvc.objects.ids import ID_SIZE
from p2pvc.refs.records import (
    BRANCH_PREFIX,
    TAG_PREFIX,
    RepositoryRecord,
    decode_repository,
    encode_repository,
)
from p2pvc.refs.refdb import RefDB, wall_clock_ms
from p2pvc.refs.state import RefState
from p2pvc.store.db import Database
from p2pvc.store.objectstore import ObjectStore

REPO_DIR = ".p2pvc"
FORMAT_VERSION = b"1"
DEFAULT_BRANCH = "main"


@dataclass(frozen=True)
class CommitInfo:
    id: bytes
    commit: model.Commit
    signature_ok: bool


class Repository:
    def __init__(self, worktree: Path, *, identity: Identity | None = None, clock=wall_clock_ms) -> None:
        self.worktree = worktree
        self.dir = worktree / REPO_DIR
        self._lock_fd = -1
        self.db = Database(self.dir / "index.sqlite")
        version = self.db.get_meta("format")
        if version != FORMAT_VERSION:
            raise StorageError(
                f"{self.dir} has repository format {version!r}, this p2pvc reads {FORMAT_VERSION!r}",
                hint="upgrade p2pvc",
            )
        record = self.db.get_meta("repository")
        if record is None:
            raise CorruptionError(f"{self.dir} has no repository record")
        self.record = decode_repository(record)
        if not verify(self.record.creator, self.record.signature, self.record.signing_payload()):
            raise CorruptionError(f"the repository record in {self.dir} has an invalid signature")
        self.id = self.record.id
        self.store = ObjectStore(self.dir, self.db)
        self.refs = RefDB(self.db, self.id, self.record.creator, clock)
        self.clock = clock
        self._identity = identity
        self._commit_cache: dict[bytes, CommitInfo] = {}

    # Opening --------------------------------------------------------------

    @classmethod
    def init(cls, path: Path, identity: Identity | None = None, clock=wall_clock_ms) -> Repository:
        """Create a new repository, signed by `identity` as its creator and first member."""
        identity = identity or load_or_create()
        record = RepositoryRecord(identity.public_key, clock(), secrets.token_bytes(16))
        record = replace(record, signature=identity.sign(record.signing_payload()))
        return cls._create(path, record, identity, clock)

    @classmethod
    def init_from_record(
        cls, path: Path, record_bytes: bytes, identity: Identity | None = None, clock=wall_clock_ms
    ) -> Repository:
        """Create an empty replica of an existing repository, given its signed record (for clone)."""
        record = decode_repository(record_bytes)
        if not verify(record.creator, record.signature, record.signing_payload()):
            raise CorruptionError("the repository record has an invalid signature")
        return cls._create(path, record, identity or load_or_create(), clock)

    @classmethod
    def _create(cls, path: Path, record: RepositoryRecord, identity: Identity, clock) -> Repository:
        repo_dir = path / REPO_DIR
        if repo_dir.exists():
            raise UserError(f"{path} already contains a p2pvc repository")
        try:
            path.mkdir(parents=True, exist_ok=True)
            tmp = path / f".p2pvc-init-{secrets.token_hex(4)}"
            tmp.mkdir()
            (tmp / "packs").mkdir()
            db = Database(tmp / "index.sqlite")
            with db.write() as conn:
                db.set_meta(conn, "format", FORMAT_VERSION)
                db.set_meta(conn, "worktree", b"")  # nothing checked out yet
                db.set_meta(conn, "repository", encode_repository(record))
                db.set_meta(conn, "HEAD", (BRANCH_PREFIX + DEFAULT_BRANCH).encode())
            db.close()
            # The folder appears under its real name only when complete.
            os.rename(tmp, repo_dir)
        except OSError as exc:
            raise StorageError(f"cannot create a repository in {path}: {exc.strerror}") from exc
        return cls(path, identity=identity, clock=clock)

    @classmethod
    def discover(cls, start: Path, **kwargs) -> Repository:
        start = start.resolve()
        for folder in (start, *start.parents):
            if (folder / REPO_DIR / "index.sqlite").is_file():
                return cls(folder, **kwargs)
        raise NotARepositoryError(
            f"not a p2pvc repository (or any parent folder): {start}",
            hint="run p2pvc init to create one, or cd into one",
        )

    @property
    def history_only(self) -> bool:
        """Whether this replica fetches history without file content (a `clone --no-content`)."""
        return self.db.get_meta("content") == b"history"

    def set_history_only(self, value: bool) -> None:
        with self.db.write() as conn:
            self.db.set_meta(conn, "content", b"history" if value else b"full")

    @property
    def identity(self) -> Identity:
        if self._identity is None:
            self._identity = load_or_create()
        return self._identity

    def close(self) -> None:
        self.store.close()
        self.db.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    @contextlib.contextmanager
    def lock(self, exclusive: bool = False) -> Iterator[None]:
        """Hold the repository lock: shared for ordinary commands, exclusive for gc,
        which must not move records while another process reads or writes them."""
        fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            except BlockingIOError:
                if exclusive:
                    raise UserError(
                        "another p2pvc command is using this repository",
                        hint="wait for it to finish, then run this command again",
                    ) from None
                fcntl.flock(fd, fcntl.LOCK_SH)  # gc is running: wait for it
            yield
        finally:
            os.close(fd)

    # HEAD and refs ----------------------------------------------------------

    def head(self) -> tuple[str | None, bytes | None]:
        """Return (ref name, commit id): the ref HEAD follows (None when detached) and the commit it points at."""
        value = self.db.get_meta("HEAD") or (BRANCH_PREFIX + DEFAULT_BRANCH).encode()
        if len(value) == ID_SIZE:
            return None, value
        name = value.decode()
        state = self.ref_state(name)
        return name, state.target if state else None

    def set_head(self, target: str | bytes, *, worktree_base: bytes | None = None) -> None:
        """Point HEAD at a ref name or a commit id; with `worktree_base`, record it in the same transaction."""
        value = target.encode() if isinstance(target, str) else target
        with self.db.write() as conn:
            self.db.set_meta(conn, "HEAD", value)
            if worktree_base is not None:
                self.db.set_meta(conn, "worktree", worktree_base)

    def worktree_base(self) -> bytes | None:
        """Return the commit the working tree was last checked out at or committed as.

        It differs from HEAD's commit when a peer moved the checked-out branch
        (a sync or a serving node took a new head); uncommitted changes are
        always relative to this base, never to the new head.
        """
        value = self.db.get_meta("worktree")
        if value is None:
            return self.head()[1]  # repositories made before the base was recorded
        return value if len(value) == ID_SIZE else None  # b"": nothing checked out yet

    def set_worktree_base(self, commit_id: bytes | None) -> None:
        with self.db.write() as conn:
            if commit_id is None:
                conn.execute("DELETE FROM meta WHERE key = 'worktree'")
            else:
                self.db.set_meta(conn, "worktree", commit_id)

    def ref_state(self, name: str) -> RefState | None:
        return self.refs.state(name, self.is_ancestor)

    def ref_states(self, prefix: str = "refs/") -> list[RefState]:
        states = []
        for name in self.refs.names():
            if name.startswith(prefix):
                state = self.ref_state(name)
                if state is not None and not state.deleted:
                    states.append(state)
        return states

    def live_ref_count(self) -> int:
        """Return the number of refs, without deleted ones, whose records stay in the database."""
        return len(self.ref_states())

    def require_member(self) -> None:
        """Fail early, before any work, if the local identity may not write to this repository."""
        if self.identity.public_key not in self.refs.members().current:
            raise UserError(
                "you are not a member of this repository, so your commits would be rejected by every peer",
                hint="show your key with p2pvc id and ask a member to run: p2pvc member add KEY; "
                "if one already has, run p2pvc sync to receive that record",
            )

    def set_ref(
        self,
        name: str,
        target: bytes | None,
        *,
        expected: bytes | None | type[...] = ...,
        supersede_all: bool = False,
        worktree_base: bytes | None = None,
    ):
        """Write a signed ref update; with `worktree_base`, record that base in the same transaction."""
        meta = {"worktree": worktree_base} if worktree_base is not None else None
        return self.refs.set(
            self.identity,
            name,
            target,
            expected=expected,
            is_ancestor=self.is_ancestor,
            supersede_all=supersede_all,
            meta=meta,
        )

    # Revisions ----------------------------------------------------------------

    _REV_SUFFIX = re.compile(r"^(.*?)((?:[~^][0-9]*)*)$")

    def resolve(self, rev: str) -> bytes:
        """Return the commit id named by `rev`: HEAD, a branch, a tag, a full or
        unique abbreviated id, each optionally followed by ~N or ^ (first parent)."""
        match = self._REV_SUFFIX.match(rev.strip())
        assert match is not None
        base, suffix = match.group(1), match.group(2)
        oid = self._resolve_base(base, rev)
        for step in re.findall(r"[~^][0-9]*", suffix):
            count = int(step[1:] or 1) if step[0] == "~" else 1
            for _ in range(count):
                parents = self.read_commit(oid).commit.parents
                if not parents:
                    raise UserError(f"revision {rev!r} goes past the first commit")
                oid = parents[0]
        return oid

    def _resolve_base(self, base: str, rev: str) -> bytes:
        if base in ("", "HEAD", "@"):
            name, target = self.head()
            if target is None:
                raise UserError(f"HEAD ({name}) has no commits yet", hint="run p2pvc commit first")
            return target
        if base.startswith("refs/"):
            state = self.ref_state(base)
            if state is not None and state.target is not None:
                return state.target
        else:
            branch, tag = self.ref_state(BRANCH_PREFIX + base), self.ref_state(TAG_PREFIX + base)
            branch_target = branch.target if branch is not None else None
            tag_target = tag.target if tag is not None else None
            if branch_target is not None and tag_target is not None and branch_target != tag_target:
                # Peers can create both under one name (p2pvc itself refuses to): never pick one silently.
                raise UserError(
                    f"revision {rev!r} is ambiguous: {base} is both a branch and a tag",
                    hint=f"write {BRANCH_PREFIX}{base} or {TAG_PREFIX}{base}",
                )
            if branch_target is not None or tag_target is not None:
                return branch_target or tag_target  # type: ignore[return-value]
        if re.fullmatch(r"[0-9a-fA-F]{4,64}", base):
            return self._resolve_prefix(base.lower(), rev)
        if re.fullmatch(r"[0-9a-fA-F]{1,3}", base):
            raise UserError(f"unknown revision {rev!r}", hint="an abbreviated commit id needs at least 4 hex digits")
        raise UserError(f"unknown revision {rev!r}", hint="use a branch, a tag or a commit id (p2pvc log lists them)")

    def _resolve_prefix(self, prefix: str, rev: str) -> bytes:
        low = bytes.fromhex(prefix.ljust(64, "0"))
        high = bytes.fromhex(prefix.ljust(64, "f"))
        rows = self.db.conn.execute(
            "SELECT id FROM objects WHERE id BETWEEN ? AND ? AND kind = ? LIMIT 2",
            (low, high, model.KIND_COMMIT),
        ).fetchall()
        if not rows:
            raise UserError(f"unknown revision {rev!r}")
        if len(rows) > 1:
            raise UserError(f"revision {rev!r} is ambiguous", hint="give more hex digits")
        return bytes(rows[0][0])

    # Commits -----------------------------------------------------------------

    def read_commit(self, oid: bytes) -> CommitInfo:
        info = self._commit_cache.get(oid)
        if info is None:
            commit = self.store.get_object(oid, model.KIND_COMMIT)
            assert isinstance(commit, model.Commit)
            ok = verify(commit.author, commit.signature, commit.signing_payload())
            info = CommitInfo(oid, commit, ok)
            self._commit_cache[oid] = info
        return info

    def read_tree(self, oid: bytes) -> model.Tree:
        tree = self.store.get_object(oid, model.KIND_TREE)
        assert isinstance(tree, model.Tree)
        return tree

    def read_manifest(self, oid: bytes) -> model.Manifest:
        manifest = self.store.get_object(oid, model.KIND_MANIFEST)
        assert isinstance(manifest, model.Manifest)
        return manifest

    def is_ancestor(self, ancestor: bytes, descendant: bytes) -> bool:
        """Return whether `ancestor` is `descendant` or reachable from it through parents."""
        if ancestor == descendant:
            return True
        seen = {descendant}
        stack = [descendant]
        while stack:
            oid = stack.pop()
            if not self.store.has(oid):
                continue  # history not fetched yet: cannot prove ancestry through it
            for parent in self.read_commit(oid).commit.parents:
                if parent == ancestor:
                    return True
                if parent not in seen:
                    seen.add(parent)
                    stack.append(parent)
        return False

    def walk_commits(self, starts: list[bytes]) -> Iterator[CommitInfo]:
        """Yield commits reachable from `starts`, newest first by commit time."""
        import heapq

        heap: list[tuple[int, bytes]] = []
        seen: set[bytes] = set()
        for oid in starts:
            if oid not in seen:
                seen.add(oid)
                heapq.heappush(heap, (-self.read_commit(oid).commit.time_ms, oid))
        while heap:
            _, oid = heapq.heappop(heap)
            info = self.read_commit(oid)
            yield info
            for parent in info.commit.parents:
                if parent not in seen and self.store.has(parent):
                    seen.add(parent)
                    heapq.heappush(heap, (-self.read_commit(parent).commit.time_ms, parent))

    def sign_commit(self, commit: model.Commit) -> model.Commit:
        unsigned = replace(commit, author=self.identity.public_key, signature=b"")
        return replace(unsigned, signature=self.identity.sign(unsigned.signing_payload()))
