#!/usr/bin/env bash
# Install Debian's chromium for the dashboard browser test, only when it is missing.
# Prints the path of the chromium binary.
set -euo pipefail
find_chromium() { command -v chromium || command -v chromium-browser || true; }
binary=$(find_chromium)
if [ -z "$binary" ]; then
    echo "installing chromium (apt-get)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -qq >&2
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends chromium fonts-dejavu-core >&2
    binary=$(find_chromium)
fi
[ -n "$binary" ] || { echo "chromium is not installed and could not be installed" >&2; exit 1; }
echo "$binary"
