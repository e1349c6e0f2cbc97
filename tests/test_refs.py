"""Tests for ref state: the hybrid logical clock and `resolve` over sets of ref updates.

`resolve` is tested on hand-built updates over a small commit graph, so no
signatures are involved; the clock tests at the end go through a real
repository with an injected physical clock.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pvc.errors import CorruptionError
from p2pvc.identity.keys import Identity
from p2pvc.refs import hlc
from p2pvc.refs.hlc import MAX_FUTURE_SKEW_MS, Timestamp
from p2pvc.refs.records import RefUpdate
from p2pvc.refs.state import resolve
from p2pvc.repo import Repository

# No per-example deadline: a loaded machine can pause any example, and these tests check results, not speed.
no_deadline = settings(deadline=None)

# Hybrid logical clock -------------------------------------------------------------

TICK_CASES = [
    pytest.param(Timestamp(100, 3), 200, Timestamp(200, 0), id="physical-ahead"),
    pytest.param(Timestamp(100, 3), 100, Timestamp(100, 4), id="physical-equal"),
    pytest.param(Timestamp(100, 3), 50, Timestamp(100, 4), id="physical-behind"),
    pytest.param(hlc.ZERO, 0, Timestamp(0, 1), id="zero-clock"),
]


@pytest.mark.parametrize(("last", "physical", "expected"), TICK_CASES)
def test_hlc_tick_table(last: Timestamp, physical: int, expected: Timestamp) -> None:
    assert hlc.tick(last, physical) == expected


RECEIVE_CASES = [
    pytest.param(Timestamp(100, 5), Timestamp(90, 9), 200, Timestamp(200, 0), id="physical-newest"),
    pytest.param(Timestamp(300, 5), Timestamp(90, 9), 200, Timestamp(300, 6), id="local-newest"),
    pytest.param(Timestamp(100, 5), Timestamp(300, 9), 200, Timestamp(300, 10), id="remote-newest"),
    pytest.param(Timestamp(300, 5), Timestamp(300, 9), 200, Timestamp(300, 10), id="local-remote-tie"),
    pytest.param(Timestamp(300, 9), Timestamp(300, 5), 300, Timestamp(300, 10), id="all-equal-walls"),
    pytest.param(Timestamp(300, 5), Timestamp(200, 9), 300, Timestamp(300, 6), id="local-physical-tie"),
]


@pytest.mark.parametrize(("last", "remote", "physical", "expected"), RECEIVE_CASES)
def test_hlc_receive_table(last: Timestamp, remote: Timestamp, physical: int, expected: Timestamp) -> None:
    assert hlc.receive(last, remote, physical) == expected


@pytest.mark.parametrize(
    ("ahead_ms", "expected"),
    [(0, False), (MAX_FUTURE_SKEW_MS, False), (MAX_FUTURE_SKEW_MS + 1, True), (-10_000, False)],
)
def test_too_far_ahead_boundary(ahead_ms: int, expected: bool) -> None:
    physical = 1_700_000_000_000
    assert hlc.too_far_ahead(Timestamp(physical + ahead_ms, 0), physical) is expected


timestamps = st.builds(Timestamp, st.integers(0, 10**6), st.integers(0, 1000))
physical_ms = st.integers(0, 10**6)


@no_deadline
@given(timestamps, physical_ms)
def test_tick_moves_forward(last: Timestamp, physical: int) -> None:
    assert hlc.tick(last, physical) > last


@no_deadline
@given(timestamps, physical_ms)
def test_tick_not_behind_physical(last: Timestamp, physical: int) -> None:
    assert hlc.tick(last, physical).wall_ms >= physical


@no_deadline
@given(timestamps, timestamps, physical_ms)
def test_receive_after_local(last: Timestamp, remote: Timestamp, physical: int) -> None:
    assert hlc.receive(last, remote, physical) > last


@no_deadline
@given(timestamps, timestamps, physical_ms)
def test_receive_after_remote(last: Timestamp, remote: Timestamp, physical: int) -> None:
    assert hlc.receive(last, remote, physical) > remote


@no_deadline
@given(st.lists(physical_ms, min_size=1, max_size=30))
def test_tick_sequence_increases(readings: list[int]) -> None:
    """Stamps from a physical clock that jumps back and forth still increase strictly."""
    stamps = []
    last = hlc.ZERO
    for reading in readings:
        last = hlc.tick(last, reading)
        stamps.append(last)
    assert stamps == sorted(set(stamps))


# resolve ------------------------------------------------------------------------------

REPO_ID = b"\x01" * 32
AUTHOR = b"\x02" * 32
BRANCH = "refs/heads/main"
TAG = "refs/tags/v1.0.0"

# Commit graph: A <- B, A <- C, and D merges B and C.
A, B, C, D = (bytes([n]) * 32 for n in b"ABCD")
PARENTS = {A: (), B: (A,), C: (A,), D: (B, C)}


def is_ancestor(ancestor: bytes, descendant: bytes) -> bool:
    stack = [descendant]
    while stack:
        oid = stack.pop()
        if oid == ancestor:
            return True
        stack.extend(PARENTS.get(oid, ()))
    return False


def update(target: bytes | None, wall: int, *, counter: int = 0, supersedes=(), name: str = BRANCH) -> RefUpdate:
    return RefUpdate(
        REPO_ID, name, target, Timestamp(wall, counter), AUTHOR, tuple(u.id for u in supersedes), b"\x00" * 64
    )


def targets(state) -> set[bytes | None]:
    return {h.target for h in state.heads}


def test_resolve_no_updates() -> None:
    assert resolve(BRANCH, [], is_ancestor) is None


def test_resolve_fast_forward_wins() -> None:
    first = update(A, 1)
    second = update(B, 2)
    state = resolve(BRANCH, [first, second], is_ancestor)
    assert state.target == B
    assert state.heads == (second,)
    assert not state.conflicted


def test_resolve_fast_forward_merge() -> None:
    updates = [update(B, 1), update(C, 2, counter=1), update(D, 3)]
    state = resolve(BRANCH, updates, is_ancestor)
    assert state.target == D
    assert state.heads == (updates[2],)


def test_resolve_same_target_twice() -> None:
    state = resolve(BRANCH, [update(B, 5), update(B, 5, counter=1)], is_ancestor)
    assert not state.conflicted


def test_resolve_divergent_conflict() -> None:
    left = update(B, 2)
    right = update(C, 2, counter=1)
    state = resolve(BRANCH, [left, right], is_ancestor)
    assert state.conflicted
    assert targets(state) == {B, C}
    assert state.winner == right  # the higher clock wins the value


def test_resolve_conflict_keeps_both_heads_listed() -> None:
    left = update(B, 2)
    right = update(C, 3)
    state = resolve(BRANCH, [update(A, 1), left, right], is_ancestor)
    assert state.heads == (right, left)


def test_resolve_supersedes_clears_conflict() -> None:
    left = update(B, 2)
    right = update(C, 3)
    fix = update(B, 4, supersedes=[left, right])
    state = resolve(BRANCH, [left, right, fix], is_ancestor)
    assert not state.conflicted
    assert state.heads == (fix,)


def test_resolve_rollback_with_supersedes() -> None:
    newer = update(B, 1)
    rollback = update(A, 2, supersedes=[newer])
    state = resolve(BRANCH, [newer, rollback], is_ancestor)
    assert state.target == A
    assert state.heads == (rollback,)


def test_resolve_rollback_without_supersedes_conflicts() -> None:
    state = resolve(BRANCH, [update(B, 1), update(A, 2)], is_ancestor)
    assert targets(state) == {A, B}


def test_resolve_ignores_backward_supersedes() -> None:
    """An update cannot retire one with a higher clock, even if it lists it."""
    later = update(C, 5)
    earlier = update(B, 4, supersedes=[later])
    state = resolve(BRANCH, [later, earlier], is_ancestor)
    assert targets(state) == {B, C}


def test_resolve_tag_never_fast_forwards() -> None:
    state = resolve(TAG, [update(A, 1, name=TAG), update(B, 2, name=TAG)], is_ancestor)
    assert state.conflicted
    assert targets(state) == {A, B}


def test_resolve_tag_same_target() -> None:
    state = resolve(TAG, [update(A, 1, name=TAG), update(A, 2, name=TAG)], is_ancestor)
    assert not state.conflicted


def test_resolve_tag_superseded() -> None:
    first = update(A, 1, name=TAG)
    moved = update(B, 2, name=TAG, supersedes=[first])
    state = resolve(TAG, [first, moved], is_ancestor)
    assert state.heads == (moved,)


def test_resolve_tombstone_deletes() -> None:
    created = update(A, 1)
    deleted = update(None, 2, supersedes=[created])
    state = resolve(BRANCH, [created, deleted], is_ancestor)
    assert state.deleted
    assert state.target is None
    assert state.heads == (deleted,)


def test_resolve_delete_concurrent_move() -> None:
    """A delete that did not see a move conflicts with it instead of dropping the commit."""
    created = update(A, 1)
    moved = update(B, 2, supersedes=[created])
    deleted = update(None, 3, supersedes=[created])
    state = resolve(BRANCH, [created, moved, deleted], is_ancestor)
    assert state.conflicted
    assert not state.deleted
    assert targets(state) == {None, B}


def test_resolve_recreate_after_delete() -> None:
    created = update(A, 1)
    deleted = update(None, 2, supersedes=[created])
    recreated = update(C, 3, supersedes=[deleted])
    state = resolve(BRANCH, [created, deleted, recreated], is_ancestor)
    assert state.target == C
    assert not state.deleted


def test_resolve_move_does_not_retire_delete() -> None:
    """A tombstone is retired only by an update that lists it, never by a fast-forward."""
    deleted = update(None, 1)
    created = update(A, 2)
    state = resolve(BRANCH, [deleted, created], is_ancestor)
    assert targets(state) == {None, A}


# resolve: order and duplication --------------------------------------------------------

COMMITS = [A, B, C, D]


@st.composite
def update_sets(draw) -> list[RefUpdate]:
    name = draw(st.sampled_from([BRANCH, TAG]))
    updates: list[RefUpdate] = []
    for _ in range(draw(st.integers(1, 8))):
        target = draw(st.sampled_from([*COMMITS, None]))
        wall = draw(st.integers(0, 4))
        counter = draw(st.integers(0, 2))
        supersedes = draw(st.lists(st.sampled_from(updates), unique_by=lambda u: u.id, max_size=3)) if updates else []
        updates.append(update(target, wall, counter=counter, supersedes=supersedes, name=name))
    return updates


@no_deadline
@given(st.data())
def test_resolve_order_independent(data: st.DataObject) -> None:
    updates = data.draw(update_sets())
    shuffled = data.draw(st.permutations(updates))
    assert resolve(updates[0].name, shuffled, is_ancestor) == resolve(updates[0].name, updates, is_ancestor)


@no_deadline
@given(st.data())
def test_resolve_duplicates_ignored(data: st.DataObject) -> None:
    updates = data.draw(update_sets())
    repeated = updates + data.draw(st.lists(st.sampled_from(updates), min_size=1, max_size=8))
    assert resolve(updates[0].name, repeated, is_ancestor) == resolve(updates[0].name, updates, is_ancestor)


@no_deadline
@given(update_sets())
def test_resolve_winner_is_head(updates: list[RefUpdate]) -> None:
    state = resolve(updates[0].name, updates, is_ancestor)
    assert state.winner in state.heads


@no_deadline
@given(update_sets())
def test_resolve_winner_newest(updates: list[RefUpdate]) -> None:
    state = resolve(updates[0].name, updates, is_ancestor)
    assert state.winner == max(updates, key=lambda u: (u.clock, u.id))


# Clock of a real repository -------------------------------------------------------------


class ManualClock:
    """A physical clock in Unix milliseconds that the test sets by hand."""

    def __init__(self, now_ms: int) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms


@pytest.fixture
def clock_repo(worktree: Path, home: Path):
    clock = ManualClock(1_700_000_000_000)
    repo = Repository.init(worktree, identity=Identity.generate(), clock=clock)
    yield repo, clock
    repo.close()


def test_refdb_clock_jumps_back(clock_repo) -> None:
    """Updates written while the physical clock goes backwards still get increasing stamps."""
    repo, clock = clock_repo
    stamps = []
    for reading, target in [(5_000, A), (1_000, B), (1_000, C), (9_000, D)]:
        clock.now_ms = 1_700_000_000_000 + reading
        stamps.append(repo.set_ref(BRANCH, target).clock)
    assert stamps == sorted(set(stamps))


def test_refdb_latest_write_wins(clock_repo) -> None:
    repo, clock = clock_repo
    for reading, target in [(5_000, A), (1_000, C)]:
        clock.now_ms = 1_700_000_000_000 + reading
        repo.set_ref(BRANCH, target)
    assert repo.ref_state(BRANCH).target == C


def signed_update(repo: Repository, target: bytes, stamp: Timestamp) -> RefUpdate:
    identity = repo.identity
    unsigned = RefUpdate(repo.id, "refs/heads/remote", target, stamp, identity.public_key)
    return replace(unsigned, signature=identity.sign(unsigned.signing_payload()))


def test_refdb_rejects_future_stamp(clock_repo) -> None:
    repo, clock = clock_repo
    stamp = Timestamp(clock.now_ms + MAX_FUTURE_SKEW_MS + 1, 0)
    with pytest.raises(CorruptionError):
        repo.refs.add_verified(signed_update(repo, A, stamp))


def test_refdb_receive_moves_clock(clock_repo) -> None:
    """After a remote stamp ahead of the physical clock, local updates order after it."""
    repo, clock = clock_repo
    remote = Timestamp(clock.now_ms + 60_000, 7)
    repo.refs.add_verified(signed_update(repo, A, remote))
    local = repo.set_ref(BRANCH, B)
    assert local.clock > remote
