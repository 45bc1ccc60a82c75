#!/usr/bin/env bash
# Set up everything sqapi needs on a fresh machine: system packages (only when missing) and .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(libmagic1)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PY=${PY:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -e ".[dev]" 2>&1 | grep -v -e "^WARNING: Location" -e "^\s*$" || true
.venv/bin/python -c "import sqapi, magic" || { echo "setup failed: sqapi is not importable" >&2; exit 1; }

# promtool (the tests check `sqapi loader`'s /metrics with it): taken out of Debian's prometheus package
# without installing it -- installing would also set up and start a Prometheus server
if ! command -v promtool >/dev/null && [ ! -x .venv/bin/promtool ]; then
    echo "fetching promtool from Debian's prometheus package"
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1 || { apt-get update -qq && apt-get download prometheus >/dev/null; })
    dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/root"
    cp "$tmp/root/usr/bin/promtool" .venv/bin/promtool
    rm -rf "$tmp"
fi

# Debian's chromium and chromedriver: the dashboard's browser tests drive them (selenium, no download)
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    bash scripts/install_chromium.sh >/dev/null
fi
