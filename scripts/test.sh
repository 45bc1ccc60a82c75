#!/usr/bin/env bash
# The whole test suite: lint, type check, then pytest (services are checked by the tests' fixtures,
# which fail with the command that starts a missing one).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin

echo "== ruff"
$BIN/ruff check sqapi plugins tests bench
echo "== mypy"
$BIN/mypy
echo "== pytest"
$BIN/python -m pytest -q -p no:cacheprovider "$@"
echo "== wheel"
bash scripts/wheel_smoke.sh
