#!/usr/bin/env bash
# Create the project's virtualenv in .venv (if missing) and install p2pvc into
# it in editable mode with the test extras. Safe to run again: pip skips what
# is already installed. Needs Python 3.11+ and access to PyPI.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "error: p2pvc needs Python 3.11 or newer; $("$python" --version 2>&1) found" >&2
  echo "hint: set PYTHON=/path/to/python3.11 and run again" >&2
  exit 2
fi
if [ ! -x "$root/.venv/bin/python" ]; then
  "$python" -m venv "$root/.venv"
  "$root/.venv/bin/python" -m pip install --quiet --upgrade pip
fi
"$root/.venv/bin/python" -m pip install --quiet -e "$root[test]"
