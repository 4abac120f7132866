#!/usr/bin/env bash
# Creates .venv with the locked dependencies (uv.lock). Installs uv first if it is missing:
# with pip when there is one, else from Debian's python3-venv into a private bootstrap venv; the
# version and its wheels' hashes are pinned in deploy/python/uv-requirements.txt.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
start=$SECONDS
say() { printf '[python +%ss] %s\n' "$((SECONDS - start))" "$*"; }

find_uv() {
  if command -v uv >/dev/null 2>&1; then command -v uv; return; fi
  if [ -x "$ROOT/.uv-bootstrap/bin/uv" ]; then echo "$ROOT/.uv-bootstrap/bin/uv"; return; fi
  return 1
}

# uv pinned by hash, as the Dockerfile installs it.
UV_PINNED="$ROOT/deploy/python/uv-requirements.txt"

if ! UV=$(find_uv); then
  say "installing uv"
  if python3 -m pip --version >/dev/null 2>&1 && python3 -m pip install -q --require-hashes --no-deps -r "$UV_PINNED" 2>/dev/null && command -v uv >/dev/null; then
    UV=$(command -v uv)
  else
    if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -q >/dev/null && apt-get install -y -q python3-venv >/dev/null
    fi
    python3 -m venv "$ROOT/.uv-bootstrap"
    "$ROOT/.uv-bootstrap/bin/pip" install -q --require-hashes --no-deps -r "$UV_PINNED"
    UV="$ROOT/.uv-bootstrap/bin/uv"
  fi
fi
say "syncing .venv from uv.lock ($("$UV" --version))"
"$UV" sync --frozen --all-extras --quiet
say "ready: $(.venv/bin/python --version)"
