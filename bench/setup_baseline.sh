#!/usr/bin/env bash
# Create the baseline venv with the incumbent, PyPI opencodemode==0.3.0b13. Idempotent.
#
# The incumbent installs under the import name `codemode`, like us, so it lives in its own venv
# outside the repo. Override the location with BASELINE_VENV and the interpreter with
# BASELINE_PYTHON (default: pyenv's 3.11.7, else python3.11 on PATH).
#
# bench/programs.py runs a pandas program on both sides. The incumbent runs each program with
# its executor's own interpreter (`python -c`), so pandas must be in this venv; it gets the
# numpy, pandas and tzdata versions of the project's venv (PYTHON, default .venv/bin/python),
# the ones tests/sandbox_venv.py puts in our sandbox venv, so both sides import the same code.
set -euo pipefail

PINNED="0.3.0b13"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
VENV="${BASELINE_VENV:-/work/baseline-venv}"
PY="${BASELINE_PYTHON:-/root/.pyenv/versions/3.11.7/bin/python3.11}"
if [[ ! -x "$PY" ]]; then
    PY="$(command -v python3.11 || true)"
fi
PROJECT_PY="${PYTHON:-$ROOT/.venv/bin/python}"

installed() {
    "$VENV/bin/python" - "$PINNED" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(0 if version("opencodemode") == sys.argv[1] else 1)
PY
}

# The project's numpy, pandas and tzdata as pins ("numpy==2.4.6 ..."); empty if it lacks one.
project_pins() {
    [[ -x "$PROJECT_PY" ]] || return 0
    "$PROJECT_PY" - <<'PY' 2>/dev/null || true
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in ("numpy", "pandas", "tzdata")))
PY
}

# Whether the baseline venv has exactly these pins.
has_pins() {
    "$VENV/bin/python" - "$@" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(0 if all(version(n) == v for n, v in (p.split("==") for p in sys.argv[1:])) else 1)
PY
}

if [[ ! -x "$VENV/bin/python" ]]; then
    if [[ -z "$PY" ]]; then
        echo "no Python 3.11 interpreter found; set BASELINE_PYTHON" >&2
        exit 1
    fi
    "$PY" -m venv "$VENV"
fi
if ! installed; then
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        -c "$HERE/baseline-constraints.txt" "opencodemode==$PINNED"
    installed
fi

read -r -a PINS <<<"$(project_pins)"
if [[ ${#PINS[@]} -eq 0 ]]; then
    echo "note: $PROJECT_PY has no pandas (the dev extra brings it): the baseline venv gets" \
        "none, so bench/programs.py cannot run the incumbent" >&2
elif ! has_pins "${PINS[@]}"; then
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        -c "$HERE/baseline-constraints.txt" "${PINS[@]}"
    has_pins "${PINS[@]}"
fi
echo "baseline venv ready: $VENV (opencodemode $PINNED${PINS[*]:+, ${PINS[*]}})"
