#!/usr/bin/env bash
# Headless Chromium + its WebDriver for the operator console's browser test
# (tests/integration/test_console.py): Debian's `chromium` and `chromium-driver` packages, installed
# once (a no-op when /usr/bin/chromium and /usr/bin/chromedriver are there). Nothing else is
# downloaded: the test drives /usr/bin/chromedriver itself, never Selenium Manager.
#
#   deploy/local/browser.sh        (make browser; `make test` and .ci/run call it)
#
# Log: $QB_STATE_DIR/apt-browser.log (default deploy/local/state).
set -euo pipefail

QB_LOCAL_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
QB_STATE_DIR=${QB_STATE_DIR:-$QB_LOCAL_DIR/state}
t0=$SECONDS
say() { printf '[browser +%ss] %s\n' "$((SECONDS - t0))" "$*"; }

if [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]]; then
  say "chromium and chromedriver present: $(/usr/bin/chromium --version 2>/dev/null || echo '?')"
  exit 0
fi
[[ $EUID == 0 ]] || { say "ERROR: need root to apt-get install chromium chromium-driver" >&2; exit 1; }
mkdir -p "$QB_STATE_DIR"
log=$QB_STATE_DIR/apt-browser.log
say "installing chromium + chromium-driver (Debian packages, log $log)..."
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -q && apt-get install -y -q --no-install-recommends chromium chromium-driver fonts-dejavu-core; } >>"$log" 2>&1; then
  tail -n 20 "$log" >&2
  say "ERROR: apt-get install chromium chromium-driver failed (see $log)" >&2
  exit 1
fi
say "installed in $((SECONDS - t0))s: $(/usr/bin/chromium --version 2>/dev/null || echo '?')"
