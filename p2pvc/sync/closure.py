"""Which objects are missing below a set of commits: the fetch planner.

Theory of operation. A ref may only be stored once everything it reaches
(commits, trees, manifests, chunks) is stored and verified. The walker
starts at the new heads and walks down through what is already stored,
collecting the ids that are not: those are requested from a peer, and each
object that arrives is fed back in, which extends the walk below it. Each
round therefore uncovers one more level. Commits already known to be
complete (their whole closure is stored) end the walk early, so a sync of
one new commit does not rewalk all history.

Objects come before chunks: manifests must arrive before anyone knows
which chunks a file needs, and knowing all chunks first lets the chunk
fetcher spread them over peers. Pure logic: the store is reached only
through the callables given to the constructor.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from p2pvc.objects import model
from p2pvc.objects.model import ENTRY_DIR, ENTRY_FILE

KIND_CHUNK = 0


@dataclass
class Missing:
    objects: dict[bytes, int] = field(default_factory=dict)  # id -> expected kind
    chunks: dict[bytes, int] = field(default_factory=dict)  # id -> expected raw size


class ClosureWalker:
    def __init__(
        self,
        has: Callable[[bytes], bool],
        load: Callable[[bytes, int], model.StoredObject],
        is_complete: Callable[[bytes], bool],
        *,
        with_chunks: bool = True,
    ) -> None:
        self._has = has
        self._load = load
        self._is_complete = is_complete
        self.with_chunks = with_chunks
        self._queue: deque[tuple[bytes, int]] = deque()
        self._seen: set[bytes] = set()
        self.missing = Missing()
        self.commits: set[bytes] = set()  # every commit walked, to mark complete at the end

    def add(self, oid: bytes, kind: int = model.KIND_COMMIT) -> None:
        if oid not in self._seen:
            self._seen.add(oid)
            self._queue.append((oid, kind))

    def walk(self) -> Missing:
        """Walk everything reachable through stored objects; return what is missing so far."""
        while self._queue:
            oid, kind = self._queue.popleft()
            if kind == model.KIND_COMMIT and self._is_complete(oid):
                continue
            if not self._has(oid):
                self.missing.objects[oid] = kind
                continue
            self._expand(oid, kind, self._load(oid, kind))
        return self.missing

    def received(self, oid: bytes, obj: model.StoredObject) -> None:
        """Record that a missing object arrived (already verified and stored); walk below it."""
        kind = self.missing.objects.pop(oid, obj.kind)
        self._expand(oid, kind, obj)

    def _expand(self, oid: bytes, kind: int, obj: model.StoredObject) -> None:
        if isinstance(obj, model.Commit):
            self.commits.add(oid)
            self.add(obj.tree, model.KIND_TREE)
            for parent in obj.parents:
                self.add(parent, model.KIND_COMMIT)
        elif isinstance(obj, model.Tree):
            for entry in obj.entries:
                if entry.kind == ENTRY_DIR:
                    self.add(entry.target, model.KIND_TREE)
                elif entry.kind == ENTRY_FILE:
                    self.add(entry.target, model.KIND_MANIFEST)
        elif isinstance(obj, model.Manifest) and self.with_chunks:
            for chunk in obj.chunks:
                if chunk.id not in self._seen:
                    self._seen.add(chunk.id)
                    if not self._has(chunk.id):
                        self.missing.chunks[chunk.id] = chunk.size

    @property
    def objects_done(self) -> bool:
        return not self._queue and not self.missing.objects
