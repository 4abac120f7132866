#!/usr/bin/env bash
# Local RabbitMQ (Debian's rabbitmq-server package) for queue-bridge.
#
#   deploy/local/rabbitmq.sh start|wait|users|up|serve|stop|status|install
#
# stack.sh sources this file and calls the rabbitmq_* functions; it can also be run by itself.
# The broker runs as the `rabbitmq` user (the Debian wrapper su's to it) with its data, logs,
# pid file, config and enabled-plugins file under $QB_STATE_DIR/rabbitmq.
# Env: QB_STATE_DIR, QB_AMQP_HOST (127.0.0.1), QB_AMQP_PORT (5672), QB_RABBITMQ_WAIT (120 s),
#      QB_RABBITMQ_MANAGEMENT (1 = enable the management UI on 127.0.0.1:15672),
#      QB_RABBITMQ_MGMT_PORT (15672), QB_RABBITMQ_USERS ("queue-bridge engine worker-a worker-b"),
#      QB_RABBITMQ_NODENAME (the Erlang node name; default rabbit@<host>: rabbitmq-cluster.sh runs
#      several nodes, each with its own name, state dir and port).

QB_LOCAL_DIR=${QB_LOCAL_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
QB_STATE_DIR=${QB_STATE_DIR:-$QB_LOCAL_DIR/state}
: "${QB_T0:=$EPOCHSECONDS}"
export QB_T0
if ! declare -F qb_log >/dev/null; then
  qb_log() { printf '[stack +%ds] %s\n' "$((EPOCHSECONDS - QB_T0))" "$*"; }
  qb_die() { printf '[stack +%ds] ERROR: %s\n' "$((EPOCHSECONDS - QB_T0))" "$*" >&2; exit 1; }
fi
if ! declare -F qb_apt_install >/dev/null; then
  # qb_apt_install LOGFILE PACKAGE...: apt-get update (once per run) + install, as root, with a
  # temporary policy-rc.d that forbids service starts (a package's postinst would otherwise start
  # its service through invoke-rc.d, or fail on a machine without an init system).
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

# rabbitmq-server/rabbitmqctl live in /usr/sbin, which a trimmed PATH may lack.
case ":$PATH:" in *:/usr/sbin:*) ;; *) PATH=$PATH:/usr/sbin ;; esac

QB_AMQP_HOST=${QB_AMQP_HOST:-127.0.0.1}
QB_AMQP_PORT=${QB_AMQP_PORT:-5672}
QB_RABBITMQ_WAIT=${QB_RABBITMQ_WAIT:-120}
QB_RABBITMQ_MANAGEMENT=${QB_RABBITMQ_MANAGEMENT:-1}
QB_RABBITMQ_MGMT_PORT=${QB_RABBITMQ_MGMT_PORT:-15672}
QB_RABBITMQ_USERS=${QB_RABBITMQ_USERS:-queue-bridge engine worker-a worker-b}
# The node rabbitmq-server starts and rabbitmqctl talks to (both read RABBITMQ_NODENAME).
if [[ -n ${QB_RABBITMQ_NODENAME:-} ]]; then
  export RABBITMQ_NODENAME=$QB_RABBITMQ_NODENAME
fi

# Whether every folder from / down to $1 lets other users through (the broker runs as
# `rabbitmq`, not as the user who runs these scripts).
qb_traversable_by_others() {
  local d=$1
  while [[ -n $d && $d != / ]]; do
    [[ $(stat -L -c %A "$d" 2>/dev/null) =~ ^d........[xt]$ ]] || return 1
    d=$(dirname "$d")
  done
}

rabbitmq_paths() {
  mkdir -p "$QB_STATE_DIR"
  QB_STATE_DIR=$(cd "$QB_STATE_DIR" && pwd)
  R_DIR=$QB_STATE_DIR/rabbitmq
  if ! qb_traversable_by_others "$QB_STATE_DIR"; then
    # A checkout in root's home (mode 0700 on Debian): the broker's state goes where `rabbitmq`
    # can reach it, one folder per state dir (the same one at every call), instead of failing.
    R_DIR=/var/tmp/queue-bridge-rabbitmq-$(printf '%s' "$QB_STATE_DIR" | md5sum | cut -c1-12)
  fi
  R_MNESIA=$R_DIR/mnesia
  R_LOGS=$R_DIR/logs
  R_PIDFILE=$R_DIR/rabbitmq.pid
  R_OWNER=$R_DIR/owner                         # "started" (by these scripts) or "external"
}
rabbitmq_paths

# The broker's folder, made if missing. The /var/tmp fallback's name can be computed by anyone: a
# folder another local user made there first (symlinks in it) had root write through them (the
# config, the apt log) and let that user swap the broker's config. It is made here (mode 0750),
# or must be a real folder owned by root or rabbitmq that nobody else may write to.
rabbitmq_dir() {
  if [[ $R_DIR != /var/tmp/* ]]; then
    mkdir -p "$R_DIR"
    return 0
  fi
  if [[ ! -e $R_DIR && ! -L $R_DIR ]] && mkdir -m 0750 "$R_DIR" 2>/dev/null; then
    return 0
  fi
  local owner mode
  [[ -d $R_DIR && ! -L $R_DIR ]] || qb_die "rabbitmq: $R_DIR is not a folder these scripts made: remove it"
  owner=$(stat -c %U "$R_DIR")
  mode=$(stat -c %a "$R_DIR")
  if [[ $owner != root && $owner != rabbitmq ]] || ((8#$mode & 8#022)); then
    qb_die "rabbitmq: $R_DIR belongs to $owner (mode $mode), not made by these scripts: remove it"
  fi
}

# --- helpers -------------------------------------------------------------------------------------

rabbitmq_amqp_once() {
  python3 "$QB_LOCAL_DIR/amqp_ready.py" --host "$QB_AMQP_HOST" --port "$QB_AMQP_PORT" --once --io-timeout 2 "$@"
}

# The broker's pid if the pid file names a live beam.smp that runs on our state folder.
rabbitmq_pid() {
  local pid
  [[ -f $R_PIDFILE ]] || return 1
  pid=$(tr -dc '0-9' <"$R_PIDFILE")
  [[ -n $pid && -r /proc/$pid/cmdline ]] || return 1
  grep -q beam "/proc/$pid/cmdline" 2>/dev/null || return 1
  tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qxF "RABBITMQ_MNESIA_BASE=$R_MNESIA" || return 1
  [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]] || return 1
  echo "$pid"
}

rabbitmq_rss_mib() {
  local kib
  kib=$(ps -o rss= -p "$1" 2>/dev/null | tr -d ' ') || true
  echo $(( ${kib:-0} / 1024 ))
}

rabbitmq_log_file() {
  local f
  for f in "$R_LOGS"/*@*.log; do
    [[ -f $f && $f != *_upgrade.log ]] && { echo "$f"; return 0; }
  done
  return 1
}

rabbitmq_print_log_tail() {
  local log
  if log=$(rabbitmq_log_file) && [[ -s $log ]]; then
    echo "----- last 40 lines of $log -----" >&2
    tail -n 40 "$log" >&2
    echo "-----" >&2
  fi
  if [[ -s $R_LOGS/startup.log ]]; then
    echo "----- last 20 lines of $R_LOGS/startup.log -----" >&2
    tail -n 20 "$R_LOGS/startup.log" >&2
    echo "-----" >&2
  fi
}

# --- install -------------------------------------------------------------------------------------

# apt-get installs rabbitmq-server if it is missing (see qb_apt_install: the package's postinst
# does not get to start the broker with Debian's own data dir; these scripts start it).
rabbitmq_install() {
  if command -v rabbitmq-server >/dev/null || [[ -x /usr/sbin/rabbitmq-server ]]; then
    return 0
  fi
  rabbitmq_dir
  local t0=$EPOCHSECONDS
  qb_log "rabbitmq: rabbitmq-server missing: apt-get update + install (log $R_DIR/apt.log)..."
  if ! qb_apt_install "$R_DIR/apt.log" rabbitmq-server || ! [[ -x /usr/sbin/rabbitmq-server ]]; then
    tail -n 30 "$R_DIR/apt.log" >&2
    qb_die "rabbitmq: apt-get install rabbitmq-server failed (see $R_DIR/apt.log)"
  fi
  # shellcheck disable=SC2016  # ${Version} is dpkg-query's field, not a shell expansion
  qb_log "rabbitmq: installed rabbitmq-server $(dpkg-query -W -f='${Version}' rabbitmq-server) in $((EPOCHSECONDS - t0))s"
}

# Debian's postinst enables its own broker at boot (rabbitmq-server.service, and epmd.socket),
# listening on every interface with Debian's data dir: after a reboot that broker answered on 5672,
# these scripts took it for an external one and gave it the dev users (password = name), reachable
# from the network. This stack starts its own broker, on loopback: Debian's is kept off at boot
# (links only: nothing running is stopped; our broker starts epmd itself when it needs one).
rabbitmq_debian_service_off() {
  [[ $EUID == 0 ]] || return 0
  if [[ -e /etc/systemd/system/multi-user.target.wants/rabbitmq-server.service ]] \
    || [[ -e /etc/systemd/system/sockets.target.wants/epmd.socket ]]; then
    qb_log "rabbitmq: Debian's rabbitmq-server service was enabled at boot: disabling it (this stack starts its own)"
    # (systemctl edits the links without a running systemd too; deb-systemd-helper runs only under dpkg)
    systemctl disable rabbitmq-server.service epmd.socket >/dev/null 2>&1 || true
  fi
  if compgen -G '/etc/rc[2-5].d/S*rabbitmq-server' >/dev/null; then
    update-rc.d rabbitmq-server disable >/dev/null 2>&1 || true
  fi
}

# --- commands ------------------------------------------------------------------------------------

# The largest message body the broker takes (bytes): RabbitMQ 4.x's default, 3.x's is 128 MiB. The
# bridge reads a whole delivery into memory before it can check its size (the AMQP library buffers
# the body), so without it any tenant could have a bridge hold 128 MiB messages, a few of them at
# once, and redeliver each to the next bridge once this one died. It must stay above what the
# bridge itself sends: a result carries a token and a result of up to BRIDGE_MAX_VALUE_BYTES each
# (docs/security.md, "Limits"). As deploy/compose/rabbitmq.conf.
R_MAX_MESSAGE_SIZE=16777216

# The broker's config file, as rendered for its start.
rabbitmq_conf() {
  echo "# Rendered by deploy/local/rabbitmq.sh; edits are overwritten."
  echo "listeners.tcp.default = $QB_AMQP_HOST:$QB_AMQP_PORT"
  echo "max_message_size = $R_MAX_MESSAGE_SIZE"
  # The stack is left running between runs: its log grew without end (11.6 MiB in 4.5 hours).
  echo "log.file.rotation.size = 10485760"
  echo "log.file.rotation.count = 5"
  if [[ $QB_RABBITMQ_MANAGEMENT == 1 ]]; then
    echo "management.tcp.ip = 127.0.0.1"
    echo "management.tcp.port = $QB_RABBITMQ_MGMT_PORT"
  fi
}

# A broker these scripts started earlier runs on the config rendered for its start, and `up` leaves
# it running. max_message_size is read by each channel as it opens: applied to the running broker
# here (new channels get it). Any other change waits for the broker's next start (stack.sh down, up).
rabbitmq_apply_conf_live() {
  if [[ -f $R_DIR/rabbitmq.conf ]] && rabbitmq_conf | cmp -s - "$R_DIR/rabbitmq.conf"; then
    return 0
  fi
  if timeout 60 rabbitmqctl -q eval "application:set_env(rabbit, max_message_size, $R_MAX_MESSAGE_SIZE)." >/dev/null 2>&1; then
    qb_log "rabbitmq: its config predates this script's: max_message_size = $R_MAX_MESSAGE_SIZE applied to the running broker; any other change takes effect at its next start (stack.sh down, then up)"
  else
    qb_log "rabbitmq: its config predates this script's, and rabbitmqctl could not apply max_message_size: restart it (stack.sh down, then up)"
  fi
}

rabbitmq_prepare_state() {
  mkdir -p "$R_MNESIA" "$R_LOGS"
  rabbitmq_conf >"$R_DIR/rabbitmq.conf"
  if [[ $QB_RABBITMQ_MANAGEMENT == 1 ]]; then
    echo '[rabbitmq_management].' >"$R_DIR/enabled_plugins"
  else
    echo '[].' >"$R_DIR/enabled_plugins"
  fi
  chown -R rabbitmq:rabbitmq "$R_DIR"
  # The broker runs as `rabbitmq`: every folder above the state dir must let it through.
  su rabbitmq -s /bin/sh -c "test -w '$R_MNESIA' && test -w '$R_LOGS'" \
    || qb_die "rabbitmq: user 'rabbitmq' cannot write $R_DIR (a parent folder is not world-executable?); set QB_STATE_DIR elsewhere, e.g. /var/tmp/qb-state"
}

# Starts the broker unless ours already runs or something already answers AMQP on the port
# (external: used as is). Does not wait: see rabbitmq_wait.
rabbitmq_start() {
  local pid
  rabbitmq_dir
  if pid=$(rabbitmq_pid); then
    qb_log "rabbitmq: already running (pid $pid, started by these scripts)"
    echo started >"$R_OWNER"
    rabbitmq_apply_conf_live
    return 0
  fi
  if rabbitmq_amqp_once --quiet; then
    qb_log "rabbitmq: something already answers AMQP on $QB_AMQP_HOST:$QB_AMQP_PORT: using it, not starting ours"
    if systemctl is-active --quiet rabbitmq-server 2>/dev/null; then
      # Debian's own broker (started at boot): on every interface, and given the dev users below.
      qb_log "rabbitmq: it is Debian's rabbitmq-server service; to use this stack's own broker (loopback only):" \
        "systemctl disable --now rabbitmq-server epmd.socket, then make stack-up"
    fi
    echo external >"$R_OWNER"
    return 0
  fi
  (exec 3<>"/dev/tcp/$QB_AMQP_HOST/$QB_AMQP_PORT") 2>/dev/null \
    && qb_die "rabbitmq: $QB_AMQP_HOST:$QB_AMQP_PORT is taken by something that does not speak AMQP 0-9-1"
  rabbitmq_install
  rabbitmq_debian_service_off
  rabbitmq_prepare_state
  rm -f "$R_PIDFILE"
  # shellcheck disable=SC2016  # ${Version} is dpkg-query's field, not a shell expansion
  qb_log "rabbitmq: starting rabbitmq-server $(dpkg-query -W -f='${Version}' rabbitmq-server 2>/dev/null) on $QB_AMQP_HOST:$QB_AMQP_PORT$([[ $QB_RABBITMQ_MANAGEMENT == 1 ]] && echo ", management on 127.0.0.1:$QB_RABBITMQ_MGMT_PORT")"
  # As root the Debian wrapper runs the broker as user rabbitmq (su keeps these variables).
  R_LAUNCHED_AT=$EPOCHSECONDS
  # Many durable queues need many file handles (RabbitMQ warns below one per queue).
  if ! (cd /tmp && ulimit -n 65536 2>/dev/null; env \
      RABBITMQ_MNESIA_BASE="$R_MNESIA" \
      RABBITMQ_LOG_BASE="$R_LOGS" \
      RABBITMQ_PID_FILE="$R_PIDFILE" \
      RABBITMQ_CONFIG_FILE="$R_DIR/rabbitmq.conf" \
      RABBITMQ_ENABLED_PLUGINS_FILE="$R_DIR/enabled_plugins" \
      ERL_EPMD_ADDRESS=127.0.0.1 \
      RABBITMQ_DIST_PORT=$((QB_AMQP_PORT + 20000)) \
      RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
      rabbitmq-server -detached) >"$R_LOGS/startup.log" 2>&1; then
    rabbitmq_print_log_tail
    qb_die "rabbitmq: rabbitmq-server -detached failed"
  fi
  echo started >"$R_OWNER"
}

# Waits for Connection.Start on the AMQP port, then `rabbitmqctl await_startup`.
rabbitmq_wait() {
  local owner deadline pid=""
  owner=$(cat "$R_OWNER" 2>/dev/null || true)
  rabbitmq_amqp_once --quiet || qb_log "rabbitmq: waiting for AMQP on $QB_AMQP_HOST:$QB_AMQP_PORT (timeout ${QB_RABBITMQ_WAIT}s)"
  deadline=$((EPOCHSECONDS + QB_RABBITMQ_WAIT))
  until rabbitmq_amqp_once --quiet; do
    if [[ $owner == started ]] && ! pid=$(rabbitmq_pid); then
      # -detached returns before the pid file exists: allow a few seconds before calling it dead.
      if ((EPOCHSECONDS - ${R_LAUNCHED_AT:-0} > 15)) || ! pgrep -u rabbitmq -f "beam.*rabbit" >/dev/null; then
        rabbitmq_print_log_tail
        qb_die "rabbitmq: the broker exited during startup"
      fi
    fi
    if ((EPOCHSECONDS >= deadline)); then
      rabbitmq_print_log_tail
      qb_die "rabbitmq: no AMQP Connection.Start on $QB_AMQP_HOST:$QB_AMQP_PORT within ${QB_RABBITMQ_WAIT}s"
    fi
    sleep 0.5
  done
  if ! timeout 60 rabbitmqctl await_startup >/dev/null 2>&1; then
    if [[ $owner == started ]]; then
      rabbitmq_print_log_tail
      qb_die "rabbitmq: rabbitmqctl await_startup failed"
    fi
    qb_log "rabbitmq: rabbitmqctl cannot reach the external broker (AMQP answers, so going on)"
    return 0
  fi
  pid=$(rabbitmq_pid) || true
  if [[ -n $pid ]]; then
    qb_log "rabbitmq: ready${R_LAUNCHED_AT:+ in $((EPOCHSECONDS - R_LAUNCHED_AT))s} (pid $pid, rss $(rabbitmq_rss_mib "$pid") MiB)"
  else
    qb_log "rabbitmq: ready (external broker on $QB_AMQP_HOST:$QB_AMQP_PORT)"
  fi
}

# Test users (password = user name); guest (administrator) is kept. Idempotent.
# Least privilege as shipped (the same rules as `queue-bridge permissions`, bridge/transport/permissions.py):
# names are those of the default prefix `queue-bridge`, of the test suite's per-test prefixes
# X. The bridge runs
# as `queue-bridge`; engines and workers can publish to the bridge's exchange and nothing else (an
# engine may also consume `<prefix>.results`).
QB_RABBITMQ_NAMES=${QB_RABBITMQ_NAMES:-'(queue-bridge|qb-test-[0-9a-f]{8}|qb-bench-[0-9a-f]{8}(\.echo)?)'}

rabbitmq_role_of() {
  case $1 in
    queue-bridge) echo bridge ;;
    engine) echo engine ;;
    *) echo worker ;;
  esac
}

# Prints "configure<TAB>write<TAB>read" for a role.
rabbitmq_permissions_of() {
  local n=$QB_RABBITMQ_NAMES own
  own="$n(\\.(dead|unrouted|results|add|fetch|ack|lifecycle|dead-letter|duty|add-retry|hints\\.p?[0-9a-f]{24}))?"
  case $1 in
    bridge) printf '%s\t%s\t%s' "^$own\$" "^($own|amq\\.default)\$" "^$own\$" ;;
    engine) printf '%s\t%s\t%s' '^$' "^$n\$" "^$n\\.results\$" ;;
    worker) printf '%s\t%s\t%s' '^$' "^$n\$" '^$' ;;
  esac
}

rabbitmq_users() {
  local users perms u want added=() granted=()
  if ! users=$(rabbitmqctl list_users --silent 2>&1); then
    if [[ $(cat "$R_OWNER" 2>/dev/null) == external ]]; then
      qb_log "rabbitmq: cannot run rabbitmqctl against the external broker: create users $QB_RABBITMQ_USERS yourself"
      return 0
    fi
    echo "$users" >&2
    qb_die "rabbitmq: rabbitmqctl list_users failed"
  fi
  users=$(awk '{print $1}' <<<"$users")
  perms=$(rabbitmqctl list_permissions -p / --silent)
  # A broker these scripts did not start (Debian's own service, on every interface) gets no dev
  # users (password = user name) unless asked: shown what to run instead (found by review).
  local dry=0 cmd
  if [[ $(cat "$R_OWNER" 2>/dev/null) == external && ${QB_RABBITMQ_USERS_ON_EXTERNAL:-0} != 1 ]]; then
    dry=1
  fi
  for u in $QB_RABBITMQ_USERS; do
    if ! grep -qxF "$u" <<<"$users"; then
      if ((dry)); then
        cmd+="  rabbitmqctl add_user $u $u"$'\n'
      else
        rabbitmqctl add_user "$u" "$u" >/dev/null
      fi
      added+=("$u")
    fi
    want=$(rabbitmq_permissions_of "$(rabbitmq_role_of "$u")")
    if ! grep -qxF "$(printf '%s\t%s' "$u" "$want")" <<<"$perms"; then
      IFS=$'\t' read -r c w r <<<"$want"
      if ((dry)); then
        cmd+="  rabbitmqctl set_permissions -p / $u '$c' '$w' '$r'"$'\n'
      else
        rabbitmqctl set_permissions -p / "$u" "$c" "$w" "$r" >/dev/null
      fi
      granted+=("$u")
    fi
  done
  if ((dry)) && ((${#added[@]} + ${#granted[@]})); then
    qb_log "rabbitmq: the broker on $QB_AMQP_HOST:$QB_AMQP_PORT was not started by these scripts: its users are left" \
      "as they are. The bridge and the tests need users [${added[*]}] and permissions for [${granted[*]}]; run:"
    printf '%s' "$cmd" >&2
    qb_log "rabbitmq: (make bridge, make run and make test log in with password = user name), or set" \
      "QB_RABBITMQ_USERS_ON_EXTERNAL=1 to have them created so (only on a broker nobody else can reach)"
    R_USERS_LEFT=1
    return 0
  fi
  if ((${#added[@]} + ${#granted[@]})); then
    qb_log "rabbitmq: users: added [${added[*]}], least-privilege permissions set for [${granted[*]}] (password = user name; guest kept)"
  else
    qb_log "rabbitmq: users $QB_RABBITMQ_USERS already set up"
  fi
}

# Stops the broker only if these scripts started it.
rabbitmq_stop() {
  local owner pid
  owner=$(cat "$R_OWNER" 2>/dev/null || true)
  if [[ $owner == external ]]; then
    qb_log "rabbitmq: not started by these scripts (external broker): leaving it running"
    rm -f "$R_OWNER"
    return 0
  fi
  if ! pid=$(rabbitmq_pid); then
    qb_log "rabbitmq: not running"
    # Its pid file too (a node the drills killed): the cluster script's check of a node trusts it,
    # and a pid the system gave to another process since kept a dead cluster's state for the next.
    rm -f "$R_OWNER" "$R_PIDFILE"
    return 0
  fi
  qb_log "rabbitmq: stopping pid $pid (rabbitmqctl stop)"
  timeout 60 rabbitmqctl stop "$R_PIDFILE" >/dev/null 2>&1 || true
  if rabbitmq_pid >/dev/null; then
    qb_log "rabbitmq: still alive after rabbitmqctl stop: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    sleep 1
  fi
  rm -f "$R_OWNER" "$R_PIDFILE"
  qb_log "rabbitmq: stopped"
}

rabbitmq_status() {
  local pid owner amqp
  owner=$(cat "$R_OWNER" 2>/dev/null || true)
  if amqp=$(rabbitmq_amqp_once 2>&1); then amqp="answers AMQP (${amqp#*(}"; amqp=${amqp%)}")"; else amqp="no AMQP answer"; fi
  if pid=$(rabbitmq_pid); then
    echo "rabbitmq:  running, started by these scripts, pid $pid, rss $(rabbitmq_rss_mib "$pid") MiB, $QB_AMQP_HOST:$QB_AMQP_PORT $amqp"
    echo "           data $R_MNESIA, log $(rabbitmq_log_file || echo "$R_LOGS")"
    [[ $amqp == answers* ]]
  elif [[ $amqp == answers* ]]; then
    echo "rabbitmq:  external broker (not started by these scripts) on $QB_AMQP_HOST:$QB_AMQP_PORT, $amqp${owner:+ [owner file: $owner]}"
  else
    echo "rabbitmq:  not running ($QB_AMQP_HOST:$QB_AMQP_PORT $amqp)"
    return 1
  fi
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  set -euo pipefail
  case ${1:-} in
    install) rabbitmq_install ;;
    start) rabbitmq_start ;;
    wait) rabbitmq_wait ;;
    users) rabbitmq_users ;;
    up) rabbitmq_start; rabbitmq_wait; rabbitmq_users ;;
    serve) rabbitmq_start; rabbitmq_wait ;; # up without the users (a node about to join a cluster)
    stop | down) rabbitmq_stop ;;
    status) rabbitmq_status ;;
    *) echo "usage: $0 install|start|wait|users|up|serve|stop|status" >&2; exit 2 ;;
  esac
fi
