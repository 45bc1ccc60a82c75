#!/usr/bin/env bash
# The whole test suite: lint, type check, pytest, schemathesis against a live `sqapi api`, then the wheel
# smoke test.
#
# PostgreSQL, Redis and RabbitMQ must answer on 127.0.0.1 (5432, 6379, 5672): where one does not,
# scripts/services.sh starts it (installing it from Debian's packages if missing), and whatever
# this run started -- those, and Swift and memcached, which the Swift tests start -- is stopped
# when it ends, also when a test fails or the run is interrupted.  Services that were running
# already are left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
export SQAPI_SERVICES_STATE="$PWD/.sqapi/services-$$"

swift_was_up=no
bash scripts/swift_dev.sh status >/dev/null 2>&1 && swift_was_up=yes
cleanup() {
    status=$?
    trap - EXIT INT TERM
    if [ "$swift_was_up" = no ] && bash scripts/swift_dev.sh status >/dev/null 2>&1; then
        echo "== stopping the Swift (and memcached) the tests started"
        bash scripts/swift_dev.sh stop >/dev/null 2>&1 || true
    fi
    bash scripts/services.sh down | grep -v "nothing to stop" || true
    rm -rf "$SQAPI_SERVICES_STATE"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "== services"
bash scripts/services.sh up
echo "== ruff"
$BIN/ruff check sqapi plugins tests bench
echo "== mypy"
$BIN/mypy
echo "== pytest"
$BIN/python -m pytest -q -p no:cacheprovider "$@"
echo "== schemathesis (the HTTP API against its OpenAPI document)"
bash scripts/schemathesis.sh
echo "== wheel"
bash scripts/wheel_smoke.sh
