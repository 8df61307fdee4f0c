#!/usr/bin/env bash
# The whole test suite: set up with the dev extra, check the generated wire modules, lint,
# type-check, then run every test (unit, integration against a real executor, security).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
.venv/bin/ruff check src tests bench scripts examples
.venv/bin/ruff format --check src tests bench scripts examples
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
