#!/usr/bin/env bash
# The HTTP API against its own OpenAPI document (/openapi.json): schemathesis generates requests for
# every operation -- the core routes and the plugins' -- and checks that none gets a server error and
# that every answer (status, content type, headers, body) is one the document declares.  A real
# `sqapi api` (waitress, the embedded PostgreSQL, a bearer token) runs in a temporary folder for it.
# Prints the count of generated cases.  SQAPI_SCHEMATHESIS_SEED and SQAPI_SCHEMATHESIS_EXAMPLES
# change the seed (fixed, so that a run can be repeated) and the examples per operation.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="$PWD/.venv/bin"
work=$(mktemp -d "${TMPDIR:-/tmp}/sqapi-schemathesis-XXXXXX")
port=$("$BIN/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
token="schemathesis-$("$BIN/python" -c 'import secrets; print(secrets.token_hex(8))')"
printf 'api:\n  token: %s\n' "$token" > "$work/sqapi.yml"
(cd "$work" && exec "$BIN/sqapi" api -c sqapi.yml --port "$port" > api.log 2>&1) &
api=$!
cleanup() {
    status=$?
    kill "$api" 2>/dev/null || true
    wait "$api" 2>/dev/null || true
    if [ "$status" -ne 0 ] && [ -f "$work/api.log" ]; then
        echo "-- the API's log"; tail -50 "$work/api.log"
    fi
    rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT
for _ in $(seq 1 150); do
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/health" || true)
    [ "$code" != "000" ] && break
    kill -0 "$api" 2>/dev/null || { echo "sqapi api exited before it answered"; exit 1; }
    sleep 0.2
done
"$BIN/schemathesis" run "http://127.0.0.1:$port/openapi.json" -H "Authorization: Bearer $token" \
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance,unsupported_method \
    --generation-allow-x00 false --max-examples "${SQAPI_SCHEMATHESIS_EXAMPLES:-100}" \
    --seed "${SQAPI_SCHEMATHESIS_SEED:-20261130}" --no-color
