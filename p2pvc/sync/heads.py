"""Compact summaries of ref state, for anti-entropy.

Two nodes first swap one digest per ref (BLAKE3 over the sorted ids of all
its stored updates) and the membership records' digest; only the refs whose
digests differ are then exchanged in full. The state is a grow-only set, so
equal digests mean equal state and a merge never has to look further.
"""

from __future__ import annotations

from collections import defaultdict

import blake3

from p2pvc.protocol.messages import MEMBERS_KEY

DIGEST_CONTEXT = "p2pvc 2026-12 ref digest v1"


def digest_ids(ids: list[bytes]) -> bytes:
    h = blake3.blake3(derive_key_context=DIGEST_CONTEXT)
    for oid in sorted(ids):
        h.update(oid)
    return h.digest()


def local_digests(update_rows: list[tuple[str, bytes]], membership_ids: list[bytes]) -> dict[str, bytes]:
    """Return ref name -> digest of its update ids, plus MEMBERS_KEY when there are membership records."""
    by_name: dict[str, list[bytes]] = defaultdict(list)
    for name, update_id in update_rows:
        by_name[name].append(update_id)
    digests = {name: digest_ids(ids) for name, ids in by_name.items()}
    if membership_ids:
        digests[MEMBERS_KEY] = digest_ids(membership_ids)
    return digests


def differing(local: dict[str, bytes], remote: dict[str, bytes]) -> list[str]:
    """Return the names whose state differs (present on one side only, or with other digests)."""
    return sorted(name for name in local.keys() | remote.keys() if local.get(name) != remote.get(name))
