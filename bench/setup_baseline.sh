#!/usr/bin/env bash
# Create the baseline venv with the incumbent, PyPI opencodemode==0.3.0b13. Idempotent.
#
# The incumbent installs under the import name `codemode`, like us, so it lives in its own venv
# outside the repo. Override the location with BASELINE_VENV and the interpreter with
# BASELINE_PYTHON (default: pyenv's 3.11.7, else python3.11 on PATH).
set -euo pipefail

PINNED="0.3.0b13"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${BASELINE_VENV:-/work/baseline-venv}"
PY="${BASELINE_PYTHON:-/root/.pyenv/versions/3.11.7/bin/python3.11}"
if [[ ! -x "$PY" ]]; then
    PY="$(command -v python3.11 || true)"
fi

installed() {
    "$VENV/bin/python" - "$PINNED" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(0 if version("opencodemode") == sys.argv[1] else 1)
PY
}

if [[ -x "$VENV/bin/python" ]] && installed; then
    echo "baseline venv ready: $VENV (opencodemode $PINNED)"
    exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    if [[ -z "$PY" ]]; then
        echo "no Python 3.11 interpreter found; set BASELINE_PYTHON" >&2
        exit 1
    fi
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    -c "$HERE/baseline-constraints.txt" "opencodemode==$PINNED"
installed
echo "baseline venv ready: $VENV (opencodemode $PINNED)"
