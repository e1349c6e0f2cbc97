"""Three p2pvc nodes on 127.0.0.1 syncing a real model, run through the real CLI.

lab-a creates the repository with the all-MiniLM-L6-v2 model folder and
real code, and serves it. lab-b clones it, becomes a member and serves too.
laptop-c clones it, becomes a member, and then works offline: it fine-tunes
the model's last encoder layer and commits, while lab-b commits a change to
a branch of its own. When the laptop reconnects, one `p2pvc sync` brings
everything together: lab-a pulls the laptop's commit and gossips it on to
lab-b, and the laptop gets lab-b's branch. The demo then prints each node's
refs and verifies that all three hold the same refs and byte-identical,
fsck-clean content.

Last, two GPU nodes seed from the labs: each makes a history-only clone
and runs `p2pvc fetch main --path all-MiniLM-L6-v2 --checkout DIR` at the
same moment, taking chunks from both labs and from each other. The demo
checks that both got the model byte for byte and shows `p2pvc whereis`.

Each node is a separate folder with its own signing key (P2PVC_HOME); the
serving nodes are separate processes, stopped with SIGTERM at the end. All
traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_inputs  # noqa: E402
from demo import fine_tune, tree_digest  # noqa: E402

CONVERGENCE_TIMEOUT_S = 60.0


class Node:
    def __init__(self, name: str, root: Path) -> None:
        self.name = name
        self.dir = root / name
        self.env = dict(os.environ, P2PVC_HOME=str(root / f"{name}-home"), PYTHONUNBUFFERED="1")
        self.port = _free_port()
        self.server: subprocess.Popen | None = None
        self.log_path = root / f"{name}.log"

    def p2pvc(self, *args: str, check: bool = True, quiet: bool = False) -> str:
        if not quiet:
            print(f"\n[{self.name}] $ p2pvc {shlex.join(args)}", flush=True)
        proc = subprocess.run(
            [sys.executable, "-m", "p2pvc.cli.main", *args],
            cwd=self.dir if self.dir.exists() else self.dir.parent,
            env=self.env,
            text=True,
            capture_output=True,
            timeout=600,
        )
        if not quiet:
            sys.stdout.write(proc.stdout)
        sys.stderr.write(proc.stderr)
        if check and proc.returncode != 0:
            raise SystemExit(f"demo failed: [{self.name}] p2pvc {' '.join(args)} exited with {proc.returncode}")
        return proc.stdout

    def identity(self) -> dict:
        return json.loads(self.p2pvc("id", "--json", quiet=True))

    @property
    def address(self) -> str:
        return f"/ip4/127.0.0.1/tcp/{self.port}/p2p/{self.identity()['peer_id']}"

    def start_serving(self, *extra: str) -> None:
        options = ["--listen", "127.0.0.1", "--port", str(self.port), "--anti-entropy", "5", *extra]
        print(f"\n[{self.name}] $ p2pvc serve {shlex.join(options)} &", flush=True)
        log = open(self.log_path, "w")
        self.server = subprocess.Popen(
            [sys.executable, "-m", "p2pvc.cli.main", "serve", *options],
            cwd=self.dir,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if "listening on" in self.log_path.read_text():
                return
            if self.server.poll() is not None:
                raise SystemExit(f"demo failed: [{self.name}] serve exited: {self.log_path.read_text()}")
            time.sleep(0.1)
        raise SystemExit(f"demo failed: [{self.name}] serve did not start within 30 s")

    def stop_serving(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.send_signal(signal.SIGTERM)
            try:
                self.server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()
        self.server = None

    def refs(self) -> dict[str, str]:
        branches = json.loads(self.p2pvc("branch", "--json", quiet=True))
        return {b["ref"]: b["target"] for b in branches}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition, what: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < CONVERGENCE_TIMEOUT_S:
        if condition():
            return time.monotonic() - started
        time.sleep(0.2)
    raise SystemExit(f"demo failed: {what} did not happen within {CONVERGENCE_TIMEOUT_S} s")


def seed_gpus(a: Node, b: Node, gpus: list[Node], root: Path) -> None:
    """Two GPU nodes fetch the model folder of main at once from both labs and from each other."""
    print("\n--- two GPU nodes fetch the fine-tuned model at job start ---")
    a.start_serving("--seed")
    b.start_serving("--seed")
    for gpu in gpus:
        gpu.p2pvc("clone", "--no-content", a.address, str(gpu.dir))
    command = ["fetch", "main", "--path", "all-MiniLM-L6-v2", "--listen", "127.0.0.1", "--peer", b.address, "--json"]
    fetches = []
    for gpu in gpus:
        target = root / f"{gpu.name}-scratch"
        print(f"\n[{gpu.name}] $ p2pvc {shlex.join(command)} --checkout {target} &", flush=True)
        fetches.append(subprocess.Popen(
            [sys.executable, "-m", "p2pvc.cli.main", *command, "--checkout", str(target)],
            cwd=gpu.dir, env=gpu.env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        ))
    model_digest = tree_digest(a.dir / "all-MiniLM-L6-v2")
    for gpu, fetch in zip(gpus, fetches):
        out, err = fetch.communicate(timeout=600)
        sys.stderr.write(err)
        if fetch.returncode != 0:
            raise SystemExit(f"demo failed: [{gpu.name}] p2pvc fetch exited with {fetch.returncode}")
        report = json.loads(out)
        sources = ", ".join(
            f"{_short(peer, a, b, gpus)} {amount / 2**20:.1f} MiB" for peer, amount in report["peers"].items()
        )
        print(f"[{gpu.name}] fetched {report['raw_bytes_fetched'] / 2**20:.1f} MiB in {report['seconds']:.1f} s: {sources}")
        if tree_digest(root / f"{gpu.name}-scratch" / "all-MiniLM-L6-v2") != model_digest:
            raise SystemExit(f"demo failed: [{gpu.name}] the fetched model differs from lab-a's")
    gpus[0].p2pvc("whereis", "main", "--peer", a.address, "--peer", b.address)
    a.stop_serving()
    b.stop_serving()
    print("\nVerified: both GPU nodes hold the model byte for byte (SHA-256 of every file).")


def _short(peer_id: str, *nodes) -> str:
    """Return the name of the node with this peer id, for the demo's output."""
    flat = [n for item in nodes for n in (item if isinstance(item, list) else [item])]
    for node in flat:
        if node.dir.exists() and node.identity()["peer_id"] == peer_id:
            return node.name
    return peer_id[-8:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, help="folder for the three nodes (default: a new temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder and the serve logs")
    args = parser.parse_args(argv)
    root = args.workdir or Path(tempfile.mkdtemp(prefix="p2pvc-net-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    a, b, c = Node("lab-a", root), Node("lab-b", root), Node("laptop-c", root)
    gpus = [Node("gpu-1", root), Node("gpu-2", root)]
    try:
        model_src = real_inputs.cached("model")
        code_src = real_inputs.cached("code")
        a.dir.mkdir()
        shutil.copytree(model_src, a.dir / "all-MiniLM-L6-v2")
        shutil.copytree(code_src, a.dir / "src")
        (a.dir / ".p2pvcignore").write_text("__pycache__/\n")

        a.p2pvc("init")
        a.p2pvc("commit", "-m", "all-MiniLM-L6-v2 as released, with its code", "--meta", "step=0")
        a.start_serving()

        for node in (b, c):
            node.p2pvc("clone", a.address, str(node.dir))
            a.p2pvc("member", "add", node.identity()["public_key"])
        b.p2pvc("sync", a.address)
        c.p2pvc("sync", a.address)
        c.p2pvc("peer", "add", b.address)
        b.start_serving()

        print("\n--- laptop-c goes offline and fine-tunes; lab-b works on a branch ---")
        tensors, changed = fine_tune(c.dir / "all-MiniLM-L6-v2" / "model.safetensors", "encoder.layer.5.")
        print(f"[laptop-c] fine-tuned {tensors} tensors, {changed} bytes changed")
        c.p2pvc("commit", "-m", "Fine-tune the last layer on the laptop", "--meta", "step=500", "--meta", "loss=0.47")
        b.p2pvc("branch", "data-prep")
        b.p2pvc("switch", "data-prep")
        (b.dir / "src" / "PREPROCESSING.md").write_text("Tokenize with the model's own vocab.txt.\n")
        b.p2pvc("commit", "-m", "Document preprocessing")
        wait_for(lambda: "refs/heads/data-prep" in a.refs(), "lab-b's branch reaching lab-a by gossip")
        print("[lab-a] has lab-b's branch data-prep (announced by lab-b's node)")

        print("\n--- laptop-c reconnects ---")
        started = time.monotonic()
        c.p2pvc("sync")  # its known peers: lab-a (from clone) and lab-b
        target = c.refs()
        elapsed = wait_for(lambda: a.refs() == target and b.refs() == target, "all three nodes holding the same refs")
        print(f"\nAll three nodes hold the same refs {time.monotonic() - started:.1f} s after the laptop's sync "
              f"({elapsed:.1f} s of it waiting for gossip).")

        print("\n--- final state of each node ---")
        print("A serving node's files stay as they are when a peer moves a branch, so each node")
        print("checks out main (its tree is clean, so nothing local is overwritten).")
        digests = {}
        for node in (a, b, c):
            node.stop_serving()
            node.p2pvc("branch")
            node.p2pvc("log", "-n", "2")
            node.p2pvc("checkout", "main")
            node.p2pvc("fsck")
            digests[node.name] = tree_digest(node.dir)
        if not (digests["lab-a"] == digests["lab-b"] == digests["laptop-c"]):
            raise SystemExit("demo failed: the checked-out trees differ between nodes")
        print(f"\nVerified: 3 nodes, same refs {sorted(target)}, main checked out byte-identical "
              f"({len(digests['lab-a'])} files, SHA-256), fsck clean everywhere.")

        seed_gpus(a, b, gpus, root)
    finally:
        for node in (a, b, c, *gpus):
            node.stop_serving()
        if args.keep:
            print(f"\nKept the work folder: {root}")
        elif args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
