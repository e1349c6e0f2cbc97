"""Import rules between the package's layers, checked on the source.

Each layer may import only the layers below it (see docs/architecture.md);
the pure layers never import trio, libp2p or typer, so they stay testable
without I/O and usable by the simulations.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "p2pvc"

# layer -> layers it must not import (by top-level module under p2pvc, or third-party name)
FORBIDDEN = {
    "errors": {"objects", "store", "identity", "refs", "worktree", "ops", "cli", "trio", "libp2p", "typer"},
    "objects": {"store", "identity", "refs", "worktree", "ops", "cli", "trio", "libp2p", "typer"},
    "identity": {"objects", "store", "refs", "worktree", "ops", "cli", "trio", "libp2p", "typer"},
    "store": {"identity", "refs", "worktree", "ops", "cli", "trio", "libp2p", "typer"},
    "refs": {"worktree", "ops", "cli", "trio", "libp2p", "typer"},
    "worktree": {"refs", "ops", "cli", "trio", "libp2p", "typer"},
    "ops": {"cli", "trio", "libp2p", "typer"},
    "repo": {"worktree", "ops", "cli", "trio", "libp2p", "typer"},
    "progress": {"trio", "libp2p", "typer"},
    "protocol": {"store", "refs", "worktree", "ops", "repo", "sync", "node", "net", "cli", "trio", "libp2p", "typer"},
    "sync": {"worktree", "ops", "node", "net", "cli", "trio", "libp2p", "typer"},
    "net": {"objects", "store", "refs", "worktree", "ops", "repo", "sync", "node", "cli", "typer"},
    "node": {"cli", "typer"},
}
# The pure layers also stay free of the network and CLI layers added on top.
for _layer in ("errors", "objects", "identity", "store", "refs", "worktree", "ops", "repo", "progress"):
    FORBIDDEN[_layer] |= {"protocol", "node", "net"} if _layer != "ops" else {"node", "net"}


def _imported_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules = [node.module]
        else:
            continue
        for module in modules:
            parts = module.split(".")
            if parts[0] == "p2pvc" and len(parts) > 1:
                names.add(parts[1])
            else:
                names.add(parts[0])
    return names


def _layer_files():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        layer = rel.parts[0].removesuffix(".py")
        if layer in FORBIDDEN:
            yield layer, path


@pytest.mark.parametrize(("layer", "path"), list(_layer_files()), ids=lambda v: str(v).rsplit("p2pvc/", 1)[-1])
def test_layer_imports_only_lower_layers(layer, path):
    bad = _imported_names(path) & FORBIDDEN[layer]
    assert not bad, f"{path.relative_to(PACKAGE)} ({layer}) imports {sorted(bad)}"


@pytest.mark.parametrize("command", [["status"], ["log", "--json"], ["fsck"], ["commit", "-m", "x"]])
def test_local_commands_skip_network_imports(tmp_path, command):
    env_home = tmp_path / "home"
    subprocess.run(
        [sys.executable, "-m", "p2pvc.cli.main", "init", str(tmp_path / "repo")],
        env={"P2PVC_HOME": str(env_home), "PATH": "/usr/bin:/bin"},
        check=True,
        capture_output=True,
    )
    (tmp_path / "repo" / "f.txt").write_text("x\n")
    probe = (
        "import sys, runpy\n"
        f"sys.argv = ['p2pvc', *{command!r}]\n"
        "try:\n"
        "    runpy.run_module('p2pvc.cli.main', run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('libp2p', 'trio', 'multiaddr'))\n"
        "sys.stderr.write('LOADED=' + ','.join(loaded) + '\\n')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path / "repo",
        env={"P2PVC_HOME": str(env_home), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    loaded = [line for line in proc.stderr.splitlines() if line.startswith("LOADED=")]
    assert loaded == ["LOADED="], proc.stderr
