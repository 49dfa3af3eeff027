#!/usr/bin/env bash
# (run by tests/test_browser.py, or by CI first)
# chromium_up.sh - make sure Debian's headless Chromium is installed; prints the binary's path.
# Idempotent and quick when it is already there: apt runs only when no binary is found.
set -euo pipefail

find_chromium() { command -v chromium || command -v chromium-browser || true; }

bin=$(find_chromium)
if [ -z "$bin" ]; then
  [ "$(id -u)" = 0 ] || { echo "chromium_up.sh: Chromium is missing; run as root to install it (apt-get install chromium)" >&2; exit 1; }
  export DEBIAN_FRONTEND=noninteractive
  # the package lists may be absent (slim images) or stale (a candidate that is gone): update once
  apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null 2>&1 || {
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
  }
  bin=$(find_chromium)
  [ -n "$bin" ] || { echo "chromium_up.sh: apt-get installed chromium but no chromium binary is on PATH" >&2; exit 1; }
fi
echo "$bin"
