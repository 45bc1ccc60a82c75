#!/usr/bin/env bash
# The wheel as a new user gets it: built from this checkout, installed into a new venv outside
# it, used from an empty folder -- `sqapi process` on a PDF (pdf_extractor runs), `sqapi plugins`,
# `sqapi api` (/health and the dashboard), `sqapi init`, `sqapi new-plugin demo` and its test.
# Part of `make test` (scripts/test.sh).  Leaves nothing behind.
set -euo pipefail
cd "$(dirname "$0")/.."
checkout=$PWD
PY=${PY:-python3}
work=$(mktemp -d /tmp/sqapi-wheel-XXXXXX)
api_pid=""
cleanup() {
    if [ -n "$api_pid" ]; then kill "$api_pid" 2>/dev/null || true; wait "$api_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "wheel smoke test FAILED: $*" >&2; exit 1; }

echo "-- building the wheel"
.venv/bin/python -m pip wheel -q --no-deps . -w "$work/dist" 2>&1 | grep -v -e "^WARNING: Location" -e "^\s*$" || true
rm -rf build
wheel=$(ls "$work"/dist/sqapi-*.whl)
unzip -l "$wheel" | grep -q "sqapi-.*dist-info/licenses/LICENSE" || fail "the wheel carries no LICENSE"

echo "-- installing $(basename "$wheel")[test] into a new venv"
"$PY" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
"$work/venv/bin/python" -m pip install -q "$wheel[test]" 2>&1 | grep -v -e "^WARNING: Location" -e "^\s*$" || true
sqapi="$work/venv/bin/sqapi"

mkdir "$work/empty"
cd "$work/empty"
export SQAPI_EMBEDDED_DIR="$work/empty/.sqapi/postgres"
cp "$checkout/samples/data/report.pdf" report.pdf

echo "-- sqapi plugins"
"$sqapi" plugins > plugins.txt || { cat plugins.txt; fail "sqapi plugins exited $?"; }
grep -E "^pdf_extractor +active" plugins.txt >/dev/null || { cat plugins.txt; fail "pdf_extractor is not active"; }

echo "-- sqapi process report.pdf"
"$sqapi" process report.pdf > processed.txt 2> processed.err || { cat processed.txt processed.err; fail "sqapi process"; }
uuid=$(awk '{print $1}' processed.txt)
grep -q " DONE" processed.txt || { cat processed.txt processed.err; fail "report.pdf did not end DONE"; }
grep -q "warning: no active plugin" processed.err && fail "no plugin ran: $(cat processed.err)"
"$sqapi" status --json "$uuid" > status.json
"$work/venv/bin/python" - "$uuid" <<'PY' || fail "pdf_extractor did not run on report.pdf: $(cat status.json)"
import json, sys
row = json.load(open("status.json"))
runs = {p["plugin"]: p["status"] for p in row["plugins"]}
assert runs.get("pdf_extractor") == "DONE", runs
PY

echo "-- sqapi api"
port=$("$work/venv/bin/python" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
"$sqapi" api --port "$port" > api.log 2>&1 &
api_pid=$!
for _ in $(seq 1 100); do
    curl -fsS "http://127.0.0.1:$port/health" > health.json 2>/dev/null && break
    kill -0 "$api_pid" 2>/dev/null || { cat api.log; fail "sqapi api exited"; }
    sleep 0.2
done
curl -fsS -o /dev/null -w "%{http_code}" "http://127.0.0.1:$port/health" | grep -qx 200 || fail "/health is not 200"
curl -fsS "http://127.0.0.1:$port/" > dashboard.html || fail "the dashboard does not render"
grep -q "pdf_extractor" dashboard.html && grep -q "DONE" dashboard.html \
    || fail "the dashboard shows neither the plugin nor the DONE message"
# each answer to a file first: `curl | grep -q` fails under pipefail when grep stops reading early (curl: (23))
curl -fsS "http://127.0.0.1:$port/static/dashboard.js" > dashboard.js && grep -q "sqapi's dashboard" dashboard.js \
    && curl -fsS "http://127.0.0.1:$port/static/dashboard.css" > dashboard.css && grep -q "\.count" dashboard.css \
    || fail "the dashboard's script or style sheet is not in the wheel"
curl -fsS "http://127.0.0.1:$port/pdf_extractor/$uuid/text" > text.json && grep -q "sqapi sample report" text.json \
    || fail "the PDF's text is not served"
kill "$api_pid"; wait "$api_pid" 2>/dev/null || true; api_pid=""

echo "-- sqapi init, sqapi new-plugin demo and its test"
"$sqapi" init deploy > init.txt
grep -q "^msg_broker:" deploy/sqapi.yml || fail "sqapi init wrote no production config"
[ -d deploy/plugins ] || fail "sqapi init made no plugins/ folder"
"$sqapi" new-plugin demo > new-plugin.txt
"$work/venv/bin/python" -m pytest -q -p no:cacheprovider plugins/demo/tests > demo-test.txt 2>&1 \
    || { cat demo-test.txt; fail "the generated plugin's test"; }
tail -1 demo-test.txt
echo "wheel smoke test passed: $(basename "$wheel") from an empty folder"
