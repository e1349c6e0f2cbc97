#!/usr/bin/env bash
# Set up .venv if needed, then run the whole test suite. Extra arguments go
# to pytest (for example -m "not slow" to skip the multi-GiB file cases).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/setup.sh"
cd "$root"
exec "$root/.venv/bin/python" -m pytest "$@"
