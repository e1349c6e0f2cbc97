"""Property tests of the ref CRDT on real repositories: replicas converge, and conflicts are exactly the divergent writes.

Three to five replicas share one repository record. Each has its own
signing key and a physical clock skewed by up to two minutes, and all are
members. Hypothesis draws a run of operations: commits on a branch, new
branches, tags, branch deletions, merges of a conflicted branch, and
deliveries of single signed records from one replica to another (the
commits they reach are copied first, as a pull would), in any order, with
duplicates and with partitions (only some replicas exchange for a while).
A full exchange ends every run. Then every replica must hold the same ref
state, every commit that no deletion discarded must be reachable from the
gc roots, and a ref must be conflicted exactly when the oracle below finds
concurrent, divergent heads.

The oracle knows what each writer had seen: U happened before V when V's
writer held U (or something that happened after U) when it wrote V. U is
overridden by a later V that deleted the ref, or whose commit descends from
(or equals) U's commit. The heads are the updates nobody overrode, and the
ref is conflicted when they name more than one target.

The generator avoids two cases that the tests at the end cover directly:
a branch that is deleted and created again, and an update retired by a
same-target update that is itself superseded later.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from p2pvc.identity.keys import Identity
from p2pvc.objects import model
from p2pvc.ops import bundle
from p2pvc.ops.maintenance import gc_roots
from p2pvc.refs import membership
from p2pvc.refs.records import RefUpdate, RepositoryRecord, decode_ref_update, encode_repository
from p2pvc.repo import Repository

MAIN = "refs/heads/main"
TAGS = ("refs/tags/t0", "refs/tags/t1")
MAX_SKEW_MS = 120_000  # well inside the 10-minute limit on remote stamps


@dataclass(frozen=True)
class Written:
    """An update as the test driver wrote it, with what its writer had seen."""

    update: RefUpdate
    knew: frozenset[bytes]  # ids of the same ref's updates the writer held


@dataclass
class Cluster:
    root: Path
    replicas: list[Repository]
    parents: dict[bytes, tuple[bytes, ...]] = field(default_factory=dict)  # every commit made, by id
    written: dict[bytes, Written] = field(default_factory=dict)
    counter: int = 0
    empty_tree: bytes = b""

    def next_number(self) -> int:
        self.counter += 1
        return self.counter

    # Writes ----------------------------------------------------------------------------

    def _record(self, replica: int, name: str, write) -> RefUpdate:
        repo = self.replicas[replica]
        knew = frozenset(u.id for u in repo.refs.updates(name))
        update = write()
        self.written[update.id] = Written(update, knew)
        return update

    def new_commit(self, replica: int, parents: tuple[bytes, ...]) -> bytes:
        repo = self.replicas[replica]
        unsigned = model.Commit(self.empty_tree, parents, repo.identity.public_key, repo.clock(), f"op {self.next_number()}")
        with repo.store.session() as session:
            commit_id = session.put_object(repo.sign_commit(unsigned))
        self.parents[commit_id] = parents
        return commit_id

    def commit_on(self, replica: int, name: str) -> None:
        state = self.replicas[replica].ref_state(name)
        if state is None or state.target is None:
            return
        commit_id = self.new_commit(replica, (state.target,))
        self._record(replica, name, lambda: self.replicas[replica].set_ref(name, commit_id, expected=state.target))

    def create(self, replica: int, name: str, target: bytes) -> None:
        if self.replicas[replica].ref_state(name) is not None:
            return
        self._record(replica, name, lambda: self.replicas[replica].set_ref(name, target, expected=None))

    def delete(self, replica: int, name: str) -> None:
        state = self.replicas[replica].ref_state(name)
        if state is None or state.target is None:
            return
        self._record(replica, name, lambda: self.replicas[replica].set_ref(name, None, expected=state.target))

    def merge_heads(self, replica: int, name: str) -> None:
        state = self.replicas[replica].ref_state(name)
        if state is None or not state.conflicted or any(h.target is None for h in state.heads):
            return
        targets = tuple(sorted({h.target for h in state.heads if h.target is not None}))
        commit_id = self.new_commit(replica, targets)
        self._record(replica, name, lambda: self.replicas[replica].set_ref(name, commit_id, expected=state.target))

    # Exchange ---------------------------------------------------------------------------

    def deliver(self, source: int, destination: int, update: RefUpdate) -> None:
        """Copy the commits `update` reaches, then its signed record, as a pull stores them."""
        src, dst = self.replicas[source], self.replicas[destination]
        if update.target is not None:
            copy_commits(src, dst, update.target)
        dst.refs.add_verified(update)

    def missing_updates(self, source: int, destination: int) -> list[RefUpdate]:
        have = {i for _name, i in self.replicas[destination].refs.update_ids_by_name()}
        return [
            decode_ref_update(record)
            for update_id, record in self.replicas[source].refs.all_updates()
            if update_id not in have
        ]

    def full_exchange(self, order: list[tuple[int, int]]) -> None:
        """Deliver every update everywhere; `order` decides which pairs go first."""
        pairs = order + [(s, d) for s in range(len(self.replicas)) for d in range(len(self.replicas)) if s != d]
        for _round in range(2):
            for source, destination in pairs:
                for update in self.missing_updates(source, destination):
                    self.deliver(source, destination, update)

    def bundle_exchange(self, source: int, destination: int) -> None:
        """Send everything `destination` lacks from `source` through a bundle made since its heads."""
        src, dst = self.replicas[source], self.replicas[destination]
        number = self.next_number()
        heads = self.root / f"heads-{number}.json"
        import json

        heads.write_text(json.dumps(bundle.local_heads(dst)))
        path = self.root / f"bundle-{number}.p2b"
        bundle.create_bundle(src, path, since=heads)
        bundle.apply_bundle(dst, path)

    # Oracle ------------------------------------------------------------------------------

    def is_ancestor(self, ancestor: bytes, descendant: bytes) -> bool:
        stack = [descendant]
        seen = set()
        while stack:
            oid = stack.pop()
            if oid == ancestor:
                return True
            if oid not in seen:
                seen.add(oid)
                stack.extend(self.parents.get(oid, ()))
        return False

    def happened_before(self) -> dict[bytes, set[bytes]]:
        """Return, for every written update, the updates that happened before it (transitively)."""
        before: dict[bytes, set[bytes]] = {}

        def visit(update_id: bytes) -> set[bytes]:
            if update_id not in before:
                result: set[bytes] = set()
                for earlier in self.written[update_id].knew:
                    result.add(earlier)
                    result |= visit(earlier)
                before[update_id] = result
            return before[update_id]

        for update_id in self.written:
            visit(update_id)
        return before

    def expected_heads(self, name: str) -> set[bytes | None]:
        before = self.happened_before()
        updates = [w.update for w in self.written.values() if w.update.name == name]
        heads = set()
        for u in updates:
            overridden = any(u.id in before[v.id] and self.overrides(v, u) for v in updates if v.id != u.id)
            if not overridden:
                heads.add(u.target)
        return heads

    def overrides(self, later: RefUpdate, earlier: RefUpdate) -> bool:
        """Return whether `later`, written after `earlier`, replaces it: a deletion, or a commit at or after it."""
        if later.target is None:
            return True
        if earlier.target is None:
            return False
        if earlier.is_tag:
            return later.target == earlier.target
        return self.is_ancestor(earlier.target, later.target)

    def discarded(self, update: RefUpdate) -> bool:
        """Return whether a deletion of the ref happened after `update`."""
        before = self.happened_before()
        return any(
            w.update.name == update.name and w.update.target is None and update.id in before[w.update.id]
            for w in self.written.values()
        )


def copy_commits(src: Repository, dst: Repository, start: bytes) -> None:
    stack = [start]
    with dst.store.session() as session:
        while stack:
            oid = stack.pop()
            if session.has(oid):
                continue
            commit = src.read_commit(oid).commit
            if not session.has(commit.tree):
                _entry, stored = src.store.read_stored(commit.tree)
                entry = src.store.entry(commit.tree)
                session.put_encoded(model.KIND_TREE, commit.tree, entry.raw_size, entry.codec, stored)
            entry = src.store.entry(oid)
            _entry, stored = src.store.read_stored(oid)
            session.put_encoded(model.KIND_COMMIT, oid, entry.raw_size, entry.codec, stored)
            stack.extend(commit.parents)


class SharedClock:
    """Physical time for a test run: starts at a fixed instant and advances 1 ms per reading.

    Hypothesis replays a run to shrink it, so everything must repeat exactly:
    the keys, the repository record and every time stamp are fixed here.
    """

    def __init__(self) -> None:
        self.now = START_MS

    def skewed(self, skew: int) -> Callable[[], int]:
        def read() -> int:
            self.now += 1
            return self.now + skew

        return read


START_MS = 1_800_000_000_000


@contextlib.contextmanager
def make_cluster(size: int, skews: list[int]) -> Iterator[Cluster]:
    root = Path(tempfile.mkdtemp(prefix="p2pvc-crdt-"))
    replicas: list[Repository] = []
    try:
        identities = [Identity.from_seed(bytes([index + 1]) * 32) for index in range(size)]
        clock = SharedClock()
        clocks = [clock.skewed(skew) for skew in skews]
        record = RepositoryRecord(identities[0].public_key, START_MS, bytes(16))
        record_bytes = encode_repository(replace(record, signature=identities[0].sign(record.signing_payload())))
        first = Repository.init_from_record(root / "r0", record_bytes, identities[0], clocks[0])
        replicas.append(first)
        records = [
            first.refs.change_member(identities[0], membership.ACTION_ADD, identity.public_key) for identity in identities[1:]
        ]
        for index in range(1, size):
            repo = Repository.init_from_record(root / f"r{index}", record_bytes, identities[index], clocks[index])
            for member_record in records:
                repo.refs.add_membership_verified(member_record)
            replicas.append(repo)
        for repo in replicas:
            # The runs test ref logic, not crash safety: skip the database's fsyncs to keep them fast.
            repo.db.conn.execute("PRAGMA synchronous=OFF")
        cluster = Cluster(root, replicas)
        for repo in replicas:
            with repo.store.session() as session:
                cluster.empty_tree = session.put_object(model.Tree(()))
        yield cluster
    finally:
        for repo in replicas:
            repo.close()
        shutil.rmtree(root, ignore_errors=True)


# Operations ------------------------------------------------------------------------------------

OPERATIONS = ("commit", "commit", "branch", "tag", "delete", "merge", "deliver", "deliver", "deliver", "partition")


def run_operations(cluster: Cluster, data: st.DataObject, steps: int, *, bundles: bool) -> None:
    size = len(cluster.replicas)
    replica = st.integers(0, size - 1)
    groups: list[set[int]] = [set(range(size))]
    first = cluster.new_commit(0, ())
    cluster.create(0, MAIN, first)
    cluster.full_exchange([])
    for _step in range(steps):
        operation = data.draw(st.sampled_from(OPERATIONS))
        r = data.draw(replica)
        repo = cluster.replicas[r]
        names = repo.refs.names()
        branches = [n for n in names if n.startswith("refs/heads/")]
        if operation == "commit":
            cluster.commit_on(r, data.draw(st.sampled_from(branches)))
        elif operation == "branch":
            targets = sorted({s.target for s in repo.ref_states() if s.target is not None})
            if targets:
                cluster.create(r, f"refs/heads/b{r}-{cluster.next_number()}", data.draw(st.sampled_from(targets)))
        elif operation == "tag":
            targets = sorted({s.target for s in repo.ref_states() if s.target is not None})
            if targets:
                cluster.create(r, data.draw(st.sampled_from(TAGS)), data.draw(st.sampled_from(targets)))
        elif operation == "delete":
            deletable = [n for n in branches if n != MAIN]
            if deletable:
                cluster.delete(r, data.draw(st.sampled_from(deletable)))
        elif operation == "merge":
            cluster.merge_heads(r, data.draw(st.sampled_from(branches)))
        elif operation == "partition":
            members = data.draw(st.sets(replica, min_size=1, max_size=size - 1)) if size > 1 else {0}
            groups = [members, set(range(size)) - members] if data.draw(st.booleans()) else [set(range(size))]
        else:
            destination = data.draw(replica)
            if destination == r or not any(r in g and destination in g for g in groups):
                continue
            if bundles:
                cluster.bundle_exchange(r, destination)
                continue
            candidates = [decode_ref_update(record) for _i, record in repo.refs.all_updates()]
            update = data.draw(st.sampled_from(sorted(candidates, key=lambda u: u.id)))
            cluster.deliver(r, destination, update)
            if data.draw(st.booleans()):
                cluster.deliver(r, destination, update)  # a duplicate changes nothing
    order = data.draw(st.permutations([(s, d) for s in range(size) for d in range(size) if s != d]))
    if bundles:
        for _round in range(2):
            for source, destination in order:
                cluster.bundle_exchange(source, destination)
    else:
        cluster.full_exchange(list(order))


def merge_phase(cluster: Cluster, data: st.DataObject, *, bundles: bool) -> None:
    """Merge every conflicted branch on one or two replicas at once, then exchange everything."""
    size = len(cluster.replicas)
    for state in cluster.replicas[0].ref_states("refs/heads/"):
        if state.conflicted:
            for replica in data.draw(st.sets(st.integers(0, size - 1), min_size=1, max_size=2)):
                cluster.merge_heads(replica, state.name)
    order = [(s, d) for s in range(size) for d in range(size) if s != d]
    if bundles:
        for source, destination in order + order:
            cluster.bundle_exchange(source, destination)
    else:
        cluster.full_exchange(order)


def record_events(cluster: Cluster) -> None:
    """Report what a run covered, for --hypothesis-show-statistics."""
    states = cluster.replicas[0].ref_states()
    event(f"conflicted refs at the end: {sum(1 for s in states if s.conflicted)}")
    event(f"merge commits: {sum(1 for parents in cluster.parents.values() if len(parents) > 1)}")
    event(f"deletions: {sum(1 for w in cluster.written.values() if w.update.target is None)}")


def check_converged(cluster: Cluster) -> None:
    names = {n for repo in cluster.replicas for n in repo.refs.names()}
    assert names == set(cluster.replicas[0].refs.names())
    for name in sorted(names):
        states = [repo.ref_state(name) for repo in cluster.replicas]
        summaries = {(s.winner.id, tuple(sorted(h.id for h in s.heads)), s.conflicted) for s in states if s is not None}
        assert len(summaries) == 1, f"{name}: replicas disagree: {summaries}"


def check_oracle(cluster: Cluster) -> None:
    repo = cluster.replicas[0]
    for name in repo.refs.names():
        state = repo.ref_state(name)
        assert state is not None
        expected = cluster.expected_heads(name)
        assert {h.target for h in state.heads} == expected, name
        assert state.conflicted == (len(expected) > 1), name


def check_reachable(cluster: Cluster) -> None:
    for repo in cluster.replicas:
        reachable = {info.id for info in repo.walk_commits(gc_roots(repo))}
        for written in cluster.written.values():
            update = written.update
            if update.target is not None and not cluster.discarded(update):
                assert update.target in reachable, f"{update.name} -> {update.target.hex()[:12]} became unreachable"


replica_counts = st.integers(3, 5)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(size=replica_counts, data=st.data())
def test_replicas_converge_by_records(size: int, data: st.DataObject) -> None:
    skews = data.draw(st.lists(st.integers(-MAX_SKEW_MS, MAX_SKEW_MS), min_size=size, max_size=size))
    steps = data.draw(st.integers(6, 30))
    with make_cluster(size, skews) as cluster:
        run_operations(cluster, data, steps, bundles=False)
        check_converged(cluster)
        check_oracle(cluster)
        check_reachable(cluster)
        merge_phase(cluster, data, bundles=False)
        record_events(cluster)
        check_converged(cluster)
        check_oracle(cluster)
        check_reachable(cluster)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(size=st.integers(3, 4), data=st.data())
def test_replicas_converge_by_bundles(size: int, data: st.DataObject) -> None:
    skews = data.draw(st.lists(st.integers(-MAX_SKEW_MS, MAX_SKEW_MS), min_size=size, max_size=size))
    steps = data.draw(st.integers(6, 16))
    with make_cluster(size, skews) as cluster:
        run_operations(cluster, data, steps, bundles=True)
        check_converged(cluster)
        check_oracle(cluster)
        check_reachable(cluster)
        merge_phase(cluster, data, bundles=True)
        record_events(cluster)
        check_converged(cluster)
        check_oracle(cluster)
        check_reachable(cluster)


# Known disagreements with the oracle -------------------------------------------------------------


def test_recreated_branch_not_conflicted() -> None:
    with make_cluster(3, [0, 0, 0]) as cluster:
        first = cluster.new_commit(0, ())
        cluster.create(0, MAIN, first)
        cluster.create(0, "refs/heads/exp", first)
        cluster.delete(0, "refs/heads/exp")
        cluster.replicas[0].set_ref("refs/heads/exp", first, expected=None)  # as p2pvc branch exp does
        state = cluster.replicas[0].ref_state("refs/heads/exp")
        assert state is not None
        assert not state.conflicted


def test_same_target_then_delete_not_conflicted() -> None:
    with make_cluster(3, [0, 0, 0]) as cluster:
        first = cluster.new_commit(0, ())
        cluster.create(0, MAIN, first)
        cluster.full_exchange([])
        cluster.create(0, "refs/heads/exp", first)
        cluster.create(1, "refs/heads/exp", first)  # concurrently, at the same commit
        cluster.full_exchange([])
        cluster.delete(0, "refs/heads/exp")
        state = cluster.replicas[0].ref_state("refs/heads/exp")
        assert state is not None
        assert not state.conflicted
