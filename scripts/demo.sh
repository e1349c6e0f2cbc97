#!/usr/bin/env bash
# Set up .venv if needed, then run the end-to-end demo on real inputs
# (scripts/demo.py --help lists its options).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/setup.sh"
exec "$root/.venv/bin/python" "$root/scripts/demo.py" "$@"
