#!/usr/bin/env bash
# Install Debian's chromium and chromedriver for the dashboard browser tests, only when missing.
# Prints the path of the chromium binary.
set -euo pipefail
find_chromium() { command -v chromium || command -v chromium-browser || true; }
binary=$(find_chromium)
if [ -z "$binary" ] || ! command -v chromedriver >/dev/null; then
    echo "installing chromium and chromium-driver (apt-get)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -qq >&2
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends chromium chromium-driver \
        fonts-dejavu-core >&2
    binary=$(find_chromium)
fi
[ -n "$binary" ] || { echo "chromium is not installed and could not be installed" >&2; exit 1; }
command -v chromedriver >/dev/null || { echo "chromedriver is not installed and could not be installed" >&2; exit 1; }
echo "$binary"
