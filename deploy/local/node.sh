#!/usr/bin/env bash
# Node.js for the Node client example (examples/node) and its test (tests/integration/test_node_client.py).
#
#   deploy/local/node.sh      node + npm (Debian's nodejs/npm packages if missing), then the
#                             example's locked dependencies: `npm ci --prefix examples/node`,
#                             skipped while node_modules matches package-lock.json (idempotent)
#
# `make test` and .ci/run run it. Env: QB_STATE_DIR (apt log).
set -euo pipefail

QB_LOCAL_DIR=${QB_LOCAL_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
QB_STATE_DIR=${QB_STATE_DIR:-$QB_LOCAL_DIR/state}
: "${QB_T0:=$EPOCHSECONDS}"
export QB_T0
if ! declare -F qb_log >/dev/null; then
  qb_log() { printf '[node +%ds] %s\n' "$((EPOCHSECONDS - QB_T0))" "$*"; }
  qb_die() { printf '[node +%ds] ERROR: %s\n' "$((EPOCHSECONDS - QB_T0))" "$*" >&2; exit 1; }
fi
if ! declare -F qb_apt_install >/dev/null; then
  # qb_apt_install LOGFILE PACKAGE...: apt-get update (once per run) + install, as root, with a
  # temporary policy-rc.d that forbids service starts (as in rabbitmq.sh and cassandra.sh).
  qb_apt_install() {
    local log=$1 policy=/usr/sbin/policy-rc.d rc=0
    shift
    [[ $EUID == 0 ]] || qb_die "need root to apt-get install $*"
    mkdir -p "$(dirname "$log")"
    (
      created=0
      if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\n# temporary (queue-bridge deploy/local): no service starts during apt-get\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        created=1
      fi
      trap '[[ $created == 1 ]] && rm -f "$policy"' EXIT
      export DEBIAN_FRONTEND=noninteractive
      if [[ -z ${QB_APT_UPDATED:-} ]]; then
        apt-get -o DPkg::Lock::Timeout=300 update -q
      fi
      apt-get -o DPkg::Lock::Timeout=300 install -y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$@" \
        || { dpkg --configure -a && apt-get -o DPkg::Lock::Timeout=300 install -y -q \
          -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$@"; }
    ) >>"$log" 2>&1 || rc=$?
    QB_APT_UPDATED=1
    export QB_APT_UPDATED
    return "$rc"
  }
fi

NODE_EXAMPLE=$(cd "$QB_LOCAL_DIR/../../examples/node" && pwd)
NODE_MIN_MAJOR=18 # amqplib 2 (package.json engines)

node_install() {
  local missing=()
  command -v node >/dev/null || missing+=(nodejs)
  command -v npm >/dev/null || missing+=(npm)
  ((${#missing[@]})) || return 0
  local t0=$EPOCHSECONDS log=$QB_STATE_DIR/apt-node.log
  qb_log "node: ${missing[*]} missing: apt-get install (log $log)..."
  qb_apt_install "$log" "${missing[@]}" || { tail -n 30 "$log" >&2; qb_die "apt-get install ${missing[*]} failed (see $log)"; }
  command -v node >/dev/null && command -v npm >/dev/null || qb_die "node or npm still missing after apt-get install"
  qb_log "node: installed ${missing[*]} in $((EPOCHSECONDS - t0))s"
}

node_deps() {
  local major stamp want
  major=$(node -p 'process.versions.node.split(".")[0]')
  ((major >= NODE_MIN_MAJOR)) || qb_die "node $(node --version) is too old: examples/node needs $NODE_MIN_MAJOR or later"
  stamp=$NODE_EXAMPLE/node_modules/.qb-installed
  want="$(node --version) $(sha256sum "$NODE_EXAMPLE/package-lock.json" | cut -d' ' -f1)"
  if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
    qb_log "node: examples/node dependencies up to date (node $(node --version))"
    return 0
  fi
  local t0=$EPOCHSECONDS
  npm ci --prefix "$NODE_EXAMPLE" --no-audit --no-fund --loglevel=error >/dev/null
  echo "$want" >"$stamp"
  qb_log "node: npm ci examples/node in $((EPOCHSECONDS - t0))s (node $(node --version), npm $(npm --version))"
}

node_install
node_deps
