"""Ref updates that can be stored without their content, because they can never be a head.

The closure rule stores a ref update only when everything it reaches is
stored. An update that a later update explicitly supersedes is retired for
good (see `p2pvc.refs.state`), so it can never become the ref's value, and
its commit may already be gone from every peer (gc removes what no head
reaches). It must still be stored: its own `supersedes` list is what
retires the updates before it, and without it a deleted branch would show
up on a new replica as a false conflict between an old update and the
tombstone.
"""

from __future__ import annotations

from p2pvc.refs.records import RefUpdate


def storable_without_content(update: RefUpdate, superseders: list[RefUpdate]) -> bool:
    """Return whether `update` is retired by a later update among `superseders`."""
    return any(update.id in s.supersedes and s.clock > update.clock for s in superseders)
