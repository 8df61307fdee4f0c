#!/usr/bin/env bash
# Run the baseline (opencodemode in its own venv) and ours back to back on this machine, then
# print the comparison. --smoke goes to all three steps; every argument goes to bench/run.py.
#
#   bench/run_all.sh                        # full run, ~3 minutes on 2 cores
#   bench/run_all.sh --smoke                # tiny sizes, checks both sides work
#   bench/run_all.sh --isolation=process    # our executor without the kernel sandbox
#
# Env: BASELINE_VENV (default /work/baseline-venv), PYTHON (default: the repo's .venv python).
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
VENV="${BASELINE_VENV:-/work/baseline-venv}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[[ -x "$PYTHON" ]] || PYTHON="$(command -v python3)"

bash "$HERE/setup_baseline.sh" || exit 1

SMOKE=()
for arg in "$@"; do
    [[ "$arg" == "--smoke" ]] && SMOKE=(--smoke)
done

status=0
echo "== baseline: opencodemode ($VENV) =="
"$VENV/bin/python" "$HERE/baseline_opencodemode.py" "${SMOKE[@]}" || { echo "baseline run FAILED" >&2; status=1; }
echo
echo "== ours: codemode ($PYTHON) =="
"$PYTHON" "$HERE/run.py" "$@" || { echo "our run FAILED" >&2; status=1; }
echo
echo "== comparison =="
"$PYTHON" "$HERE/compare.py" "${SMOKE[@]}" || status=1
echo
echo "== the transport's floor (no Codemode code) =="
"$PYTHON" "$HERE/floor.py" "${SMOKE[@]}" || status=1
exit $status
