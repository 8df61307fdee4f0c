#!/usr/bin/env bash
# The main job: set up, then run a program with `codemode exec` (default: examples/hello.py).
# An embedded executor is started for the run unless CODEMODE_EXECUTOR_URL names one.
# Usage: scripts/run.sh [FILE | -c CODE]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [ "$#" -eq 0 ]; then set -- examples/hello.py; fi
exec .venv/bin/codemode exec "$@"
