#!/usr/bin/env bash
# The test command: set up .venv (idempotent), lint (incl. the engine/ import rule), run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
