"""The value of a ref, computed from the set of its signed updates.

Theory of operation. A ref's state is a grow-only set of updates; replicas
merge by union, so any order, duplication or delay of delivery ends in the
same set, and everything below is a pure function of that set:

* The winner is the update with the highest (clock, id): last writer wins,
  ties broken by the update id, so every replica picks the same one.
* An update is *retired* when a later update (higher clock) lists it in
  `supersedes`, or, for a branch, points to a commit that descends from
  (or equals) its target: a fast-forward.
* The *heads* are the updates that are not retired. More than one distinct
  target among the heads means concurrent, divergent writes: the ref is
  conflicted. The winner's value is still the one used, and the other heads
  stay listed, so their commits stay reachable.
* A tag never fast-forwards: two different targets for one tag are a
  conflict until an update supersedes both.

`is_ancestor(a, b)` answers whether commit a is b or an ancestor of b; the
caller supplies it from the commit graph.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from p2pvc.refs.records import RefUpdate

IsAncestor = Callable[[bytes, bytes], bool]


@dataclass(frozen=True)
class RefState:
    name: str
    winner: RefUpdate
    heads: tuple[RefUpdate, ...]  # not retired, newest first

    @property
    def target(self) -> bytes | None:
        return self.winner.target

    @property
    def conflicted(self) -> bool:
        return len({h.target for h in self.heads}) > 1

    @property
    def deleted(self) -> bool:
        return self.winner.target is None and not self.conflicted


def _order_key(update: RefUpdate) -> tuple:
    return (update.clock, update.id)


def resolve(name: str, updates: Iterable[RefUpdate], is_ancestor: IsAncestor) -> RefState | None:
    ordered = sorted(set(updates), key=_order_key, reverse=True)
    if not ordered:
        return None
    # Explicit supersession first: it is a set lookup and usually leaves one or two
    # candidates, so the commit-graph walks below stay few.
    clock_of = {u.id: u.clock for u in ordered}
    retired = {
        old for u in ordered for old in u.supersedes if old in clock_of and clock_of[old] < u.clock
    }
    candidates = [u for u in ordered if u.id not in retired]
    # A fast-forward retires an update even when the later update was itself retired since.
    heads = [
        u
        for u in candidates
        if not any(_fast_forwards(later, u, is_ancestor) for later in ordered if _order_key(later) > _order_key(u))
    ]
    return RefState(name, ordered[0], tuple(heads))


def _fast_forwards(later: RefUpdate, earlier: RefUpdate, is_ancestor: IsAncestor) -> bool:
    if later.target == earlier.target:
        return True
    if earlier.is_tag or later.target is None or earlier.target is None:
        return False
    return is_ancestor(earlier.target, later.target)
