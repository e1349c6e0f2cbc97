#!/usr/bin/env bash
# Set up .venv if needed, then run the two end-to-end demos on real inputs:
# the local repository (scripts/demo.py) and three nodes syncing over
# libp2p on 127.0.0.1 (scripts/demo_network.py). Each has --help.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/setup.sh"
"$root/.venv/bin/python" "$root/scripts/demo.py"
echo
echo "=== Three nodes on 127.0.0.1 ==="
exec "$root/.venv/bin/python" "$root/scripts/demo_network.py"
