#!/usr/bin/env bash
# queue-bridge local stack: RabbitMQ (AMQP 127.0.0.1:5672) + Cassandra 5.0.8 (CQL 127.0.0.1:9042).
#
#   deploy/local/stack.sh up       start what is not running yet, wait until both answer (idempotent)
#   deploy/local/stack.sh down     stop only what these scripts started
#   deploy/local/stack.sh status   one line per server; exit 0 only if both answer
#   deploy/local/stack.sh wait     wait until both answer (starts nothing)
#   deploy/local/stack.sh postmortem  after a failed run: servers' state, Cassandra's last errors
#
# Servers that already answer on those ports (the real protocol handshake) are used as they are
# and never stopped by `down`. State lives in deploy/local/state (QB_STATE_DIR). See README.md.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail

QB_LOCAL_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
QB_STATE_DIR=${QB_STATE_DIR:-$QB_LOCAL_DIR/state}
QB_T0=$EPOCHSECONDS
export QB_LOCAL_DIR QB_STATE_DIR QB_T0

qb_log() { printf '[stack +%ds] %s\n' "$((EPOCHSECONDS - QB_T0))" "$*"; }
qb_die() { printf '[stack +%ds] ERROR: %s\n' "$((EPOCHSECONDS - QB_T0))" "$*" >&2; exit 1; }

source "$QB_LOCAL_DIR/cassandra.sh"
source "$QB_LOCAL_DIR/rabbitmq.sh"

stack_preflight() {
  command -v python3 >/dev/null || qb_die "python3 is needed for the readiness checks"
  command -v setsid >/dev/null || qb_die "setsid (util-linux) is needed"
}

# Tools the fault drills use (tests/integration/test_fault_drills.py): libfaketime plays a host
# whose clock is off. Installed once from Debian's packages.
stack_tools() {
  if [[ ! -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 ]] && ! command -v faketime >/dev/null; then
    qb_log "tools: installing faketime (for the clock-skew fault drill)..."
    mkdir -p "$QB_STATE_DIR"
    qb_apt_install "$QB_STATE_DIR/apt-tools.log" faketime || qb_die "apt-get install faketime failed (see $QB_STATE_DIR/apt-tools.log)"
  fi
}

stack_up() {
  stack_preflight
  qb_log "up: state in $QB_STATE_DIR"
  stack_tools
  # Cassandra first (jar download + a JVM that boots for a few seconds), RabbitMQ while it boots.
  cassandra_start
  rabbitmq_start
  rabbitmq_wait
  rabbitmq_users
  cassandra_wait
  local users="users: $QB_RABBITMQ_USERS, password = name"
  [[ -n ${R_USERS_LEFT:-} ]] && users="users not set up: see above"
  qb_log "up: done in $((EPOCHSECONDS - QB_T0))s: CQL $QB_CASSANDRA_HOST:$QB_CASSANDRA_PORT," \
    "AMQP amqp://guest:guest@$QB_AMQP_HOST:$QB_AMQP_PORT/ ($users)"
}

stack_down() {
  local rc=0 cpid
  # Both in parallel: Cassandra drains in a few seconds, RabbitMQ stops in a few seconds.
  cassandra_stop &
  cpid=$!
  rabbitmq_stop || rc=$?
  wait "$cpid" || rc=$?
  # The drills' 3-node clusters (make test starts them for its last pass and stops them after):
  # an interrupted run left them up (three JVMs and three brokers, about 3.5 GiB), which this
  # command, the README's cleanup, did not stop. A node not running is skipped.
  if [[ -d $QB_STATE_DIR/cluster ]]; then
    bash "$QB_LOCAL_DIR/cassandra-cluster.sh" down | grep -v ': not running$' || true
  fi
  if [[ -d $QB_STATE_DIR/rabbit-cluster ]]; then
    bash "$QB_LOCAL_DIR/rabbitmq-cluster.sh" down | grep -v ': not running$' || true
  fi
  return "$rc"
}

stack_status() {
  local rc=0
  cassandra_status || rc=1
  rabbitmq_status || rc=1
  return "$rc"
}

# After a failed run: is each server still up, and if Cassandra is not, why (its last errors, a
# JVM crash file, the kernel's OOM killer). Short: CI shows the end of its output.
stack_postmortem() {
  stack_status || true
  local errs
  errs=$(grep -hE '^ERROR |Terminating due to|OutOfMemoryError|StackOverflowError' \
    "$C_LOGS/system.log" "$C_LOGS/stdout.log" 2>/dev/null | grep -v 'JVM Arguments' | tail -n 8 | cut -c1-300 || true)
  [[ -n $errs ]] && printf 'cassandra: last errors in its logs:\n%s\n' "$errs"
  compgen -G "$C_LOGS/hs_err*.log" >/dev/null && echo "cassandra: JVM crash file(s): $(ls "$C_LOGS"/hs_err*.log)"
  compgen -G "$C_LOGS/*.hprof" >/dev/null && echo "cassandra: heap dump(s) (out of memory): $(ls "$C_LOGS"/*.hprof)"
  dmesg 2>/dev/null | grep -iE 'out of memory|killed process' | tail -n 3 || true
}

stack_wait() {
  stack_preflight
  rabbitmq_wait
  cassandra_wait
}

case ${1:-} in
  up) stack_up ;;
  down) stack_down ;;
  status) stack_status ;;
  postmortem) stack_postmortem ;;
  wait) stack_wait ;;
  *)
    echo "usage: $0 up|down|status|wait|postmortem" >&2
    exit 2
    ;;
esac
