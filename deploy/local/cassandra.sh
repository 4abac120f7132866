#!/usr/bin/env bash
# Local single-node Apache Cassandra 5.0.8 for queue-bridge, run from Maven Central jars on JDK 17.
#
#   deploy/local/cassandra.sh start|wait|stop|status|fetch
#
# stack.sh sources this file and calls the cassandra_* functions; it can also be run by itself.
# State: $QB_STATE_DIR/cassandra/{lib,conf,data,logs,cassandra.pid,owner} (default deploy/local/state).
# Env: QB_STATE_DIR, QB_CASSANDRA_HOST (127.0.0.1), QB_CASSANDRA_PORT (9042),
#      QB_CASSANDRA_STORAGE_PORT (7000), QB_CASSANDRA_HEAP (1G), QB_CASSANDRA_WAIT (180 s),
#      QB_CASSANDRA_JMX_PORT (unset = no JMX at all; set = local-only JMX on that port),
#      QB_CASSANDRA_UNSAFESYSTEM (1 = skip system-table flushes; dev/CI only), JAVA_HOME.

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

QB_CASSANDRA_HOST=${QB_CASSANDRA_HOST:-127.0.0.1}
QB_CASSANDRA_PORT=${QB_CASSANDRA_PORT:-9042}
QB_CASSANDRA_STORAGE_PORT=${QB_CASSANDRA_STORAGE_PORT:-7000}
QB_CASSANDRA_HEAP=${QB_CASSANDRA_HEAP:-1G}
QB_CASSANDRA_WAIT=${QB_CASSANDRA_WAIT:-180}
QB_CASSANDRA_UNSAFESYSTEM=${QB_CASSANDRA_UNSAFESYSTEM:-0}
# Cluster membership (deploy/local/cassandra-cluster.sh sets these per node; one node needs none).
QB_CASSANDRA_CLUSTER_NAME=${QB_CASSANDRA_CLUSTER_NAME:-queue-bridge-local}
QB_CASSANDRA_INITIAL_TOKEN=${QB_CASSANDRA_INITIAL_TOKEN:-0}
QB_CASSANDRA_SEEDS=${QB_CASSANDRA_SEEDS:-$QB_CASSANDRA_HOST:$QB_CASSANDRA_STORAGE_PORT}
QB_CASSANDRA_AUTO_BOOTSTRAP=${QB_CASSANDRA_AUTO_BOOTSTRAP:-true}
QB_CASSANDRA_COMMITLOG=${QB_CASSANDRA_COMMITLOG:-periodic}

cassandra_paths() {
  mkdir -p "$QB_STATE_DIR"
  QB_STATE_DIR=$(cd "$QB_STATE_DIR" && pwd)   # Cassandra needs absolute paths
  C_SRC=$QB_LOCAL_DIR/cassandra                # pom.xml, cassandra.yaml.tmpl, logback.xml
  C_DIR=$QB_STATE_DIR/cassandra
  C_LIB=${QB_CASSANDRA_LIB:-$C_DIR/lib}          # cluster nodes share the single node's jars
  C_CONF=$C_DIR/conf
  C_DATA=$C_DIR/data
  C_LOGS=$C_DIR/logs
  C_PIDFILE=$C_DIR/cassandra.pid
  C_OWNER=$C_DIR/owner                         # "started" (by these scripts) or "external"
  C_MARKER=$C_LIB/.complete
}
cassandra_paths

# --- helpers -------------------------------------------------------------------------------------

# The pid from the pid file if that process is alive and is our Cassandra (not a recycled pid).
cassandra_pid() {
  local pid
  [[ -f $C_PIDFILE ]] || return 1
  pid=$(<"$C_PIDFILE")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  [[ -r /proc/$pid/cmdline ]] || return 1
  grep -q "CassandraDaemon" "/proc/$pid/cmdline" 2>/dev/null || return 1
  grep -qF "$C_CONF/cassandra.yaml" "/proc/$pid/cmdline" 2>/dev/null || return 1
  [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]] || return 1
  echo "$pid"
}

# qb_spawn_detached LOG CMD...: runs CMD in a new session (setsid: a Ctrl-C in this terminal does
# not reach it), output to LOG, and sets QB_SPAWNED_PID. Returns once that pid runs CMD's own
# program (setsid and nohup exec'd away), or 1 if it died first. Without this wait, a check of the
# pid right after the launch could still see the forked shell, or a cmdline read mid-exec (9% of
# bare launches on an idle 2-core machine): a CI run took a healthy node for a dead one.
qb_spawn_detached() {
  local log=$1 pid i program arg0
  shift
  program=$(readlink -f "$(command -v "$1")")
  setsid nohup "$@" >"$log" 2>&1 </dev/null &
  pid=$!
  QB_SPAWNED_PID=$pid
  for ((i = 0; i < 400; i++)); do   # up to ~10 s
    [[ -e /proc/$pid/stat && $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]] || return 1
    if [[ $(readlink "/proc/$pid/exe" 2>/dev/null) == "$program" ]]; then
      # The kernel points exe at the new program before it lays out the new argv: a cmdline
      # read in between is empty (1 launch in 300 in a CI run). Done once argv[0] is CMD's.
      arg0=
      IFS= read -r -d '' arg0 <"/proc/$pid/cmdline" 2>/dev/null || true
      [[ $arg0 == "$1" ]] && return 0
    fi
    sleep 0.025
  done
  return 1
}

cassandra_rss_mib() {
  local kib
  kib=$(ps -o rss= -p "$1" 2>/dev/null | tr -d ' ') || true
  echo $(( ${kib:-0} / 1024 ))
}

cassandra_cql_once() {
  python3 "$QB_LOCAL_DIR/cql_ready.py" --host "$QB_CASSANDRA_HOST" --port "$QB_CASSANDRA_PORT" \
    --once --io-timeout 2 "$@"
}

port_in_use() {  # host port: true if something accepts TCP connections there
  (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

# JDK 17: $JAVA_HOME if it is 17, else the Debian OpenJDK 17, else `java` on PATH if it is 17.
cassandra_java() {
  local cand ver
  local -a cands=()
  [[ -n ${JAVA_HOME:-} ]] && cands+=("$JAVA_HOME/bin/java")
  cands+=(/usr/lib/jvm/java-17-openjdk-amd64/bin/java)
  cand=$(command -v java 2>/dev/null) && cands+=("$cand")
  for cand in "${cands[@]}"; do
    [[ -x $cand ]] || continue
    ver=$("$cand" -version 2>&1 | awk -F'"' '/version/ {print $2; exit}')
    if [[ $ver == 17 || $ver == 17.* ]]; then
      echo "$cand"
      return 0
    fi
    [[ $cand == "${JAVA_HOME:-}/bin/java" ]] && qb_log "cassandra: JAVA_HOME=$JAVA_HOME is Java $ver, not 17: ignoring it" >&2
  done
  return 1
}

cassandra_print_log_tail() {
  local log=$C_LOGS/system.log offset=0 new
  # Only what the last launch wrote (system.log is appended to across restarts).
  [[ -f $C_DIR/launch ]] && read -r _ offset <"$C_DIR/launch"
  new=$(tail -c +"$((${offset:-0} + 1))" "$log" 2>/dev/null | tail -n 40 | cut -c1-400 || true)
  if [[ -n $new ]]; then
    echo "----- last 40 lines of $log from this launch (cut at 400 characters) -----" >&2
    echo "$new" >&2
    echo "-----" >&2
  fi
  # JVM-level errors (bad flags, crashes) only reach stdout.log, outside the logback format.
  # (The JDK 17 setSecurityManager deprecation notice is always there: skipped.)
  local other
  other=$(grep -vE '^(TRACE|DEBUG|INFO|WARN|ERROR) |^WARNING: .*([Ss]ecurity ?[Mm]anager|terminally deprecated)' \
    "$C_LOGS/stdout.log" 2>/dev/null | tail -n 15 | cut -c1-400 || true)
  if [[ -n $other ]]; then
    echo "----- other lines of $C_LOGS/stdout.log (last 15) -----" >&2
    echo "$other" >&2
    echo "-----" >&2
  fi
}

# --- jars ----------------------------------------------------------------------------------------

# Copies cassandra-all + its runtime dependencies into state/cassandra/lib with Maven, unless the
# marker written after the last successful copy matches the current pom.xml and jar count.
cassandra_fetch() {
  local pom=$C_SRC/pom.xml stamp count tmp
  stamp=$(sha256sum "$pom" | cut -c1-16)
  if [[ -f $C_MARKER ]]; then
    count=$(find "$C_LIB" -maxdepth 1 -name '*.jar' | wc -l)
    if [[ $(<"$C_MARKER") == "pom=$stamp jars=$count" ]]; then
      return 0
    fi
    qb_log "cassandra: jar set in $C_LIB is stale or incomplete: fetching again"
  fi
  if ! command -v mvn >/dev/null; then
    qb_log "cassandra: mvn missing: apt-get install maven (log $C_LOGS/apt.log)..."
    qb_apt_install "$C_LOGS/apt.log" maven && command -v mvn >/dev/null \
      || qb_die "cassandra: mvn not found and apt-get install maven failed (see $C_LOGS/apt.log)"
  fi
  mkdir -p "$C_LOGS"
  tmp=$C_DIR/lib.tmp
  rm -rf "$tmp"
  qb_log "cassandra: downloading jars (mvn dependency:copy-dependencies, log $C_LOGS/mvn.log)..."
  local t0=$EPOCHSECONDS
  # -C: a jar whose checksum does not match (a flaky mirror or proxy) fails the download; Maven only
  # warned (hidden by -q), and the broken jar was kept for every later run by the .complete marker.
  if ! mvn -B -q -C -f "$pom" dependency:copy-dependencies -Dcassandra.lib.dir="$tmp" >"$C_LOGS/mvn.log" 2>&1; then
    tail -n 30 "$C_LOGS/mvn.log" >&2
    qb_die "cassandra: mvn dependency:copy-dependencies failed (see $C_LOGS/mvn.log)"
  fi
  compgen -G "$tmp/cassandra-all-*.jar" >/dev/null && compgen -G "$tmp/jamm-*.jar" >/dev/null \
    || qb_die "cassandra: mvn finished but $tmp lacks cassandra-all/jamm jars"
  rm -rf "$C_LIB"
  mv "$tmp" "$C_LIB"
  count=$(find "$C_LIB" -maxdepth 1 -name '*.jar' | wc -l)
  echo "pom=$stamp jars=$count" >"$C_MARKER"
  qb_log "cassandra: $count jars ($(du -sm "$C_LIB" | cut -f1) MiB) in $((EPOCHSECONDS - t0))s"
}

# --- config --------------------------------------------------------------------------------------

cassandra_render_config() {
  local commitlog
  case $QB_CASSANDRA_COMMITLOG in
    periodic) commitlog='commitlog_sync: periodic\ncommitlog_sync_period: 10000ms' ;;
    batch) commitlog='commitlog_sync: batch' ;;
    *) qb_die "QB_CASSANDRA_COMMITLOG must be periodic or batch, not $QB_CASSANDRA_COMMITLOG" ;;
  esac
  mkdir -p "$C_CONF" "$C_DATA" "$C_LOGS"
  sed -e "s#@LISTEN_ADDRESS@#$QB_CASSANDRA_HOST#g" \
      -e "s#@NATIVE_PORT@#$QB_CASSANDRA_PORT#g" \
      -e "s#@STORAGE_PORT@#$QB_CASSANDRA_STORAGE_PORT#g" \
      -e "s#@DATA_DIR@#$C_DATA#g" \
      -e "s#@CLUSTER_NAME@#$QB_CASSANDRA_CLUSTER_NAME#g" \
      -e "s#@INITIAL_TOKEN@#$QB_CASSANDRA_INITIAL_TOKEN#g" \
      -e "s#@SEEDS@#$QB_CASSANDRA_SEEDS#g" \
      -e "s#@AUTO_BOOTSTRAP@#$QB_CASSANDRA_AUTO_BOOTSTRAP#g" \
      -e "s#@COMMITLOG@#$commitlog#g" \
      "$C_SRC/cassandra.yaml.tmpl" >"$C_CONF/cassandra.yaml.new"
  mv "$C_CONF/cassandra.yaml.new" "$C_CONF/cassandra.yaml"
  cp "$C_SRC/logback.xml" "$C_CONF/logback.xml"
}

# The JVM command line. Flags: conf/jvm17-server.options + conf/jvm-server.options +
# cassandra-env.sh of Cassandra 5.0, minus what a single dev node does not need.
cassandra_command() {
  local java=$1 jam cp
  jam=$(compgen -G "$C_LIB/jamm-*.jar" | head -n1)
  cp="$C_CONF:$(find "$C_LIB" -maxdepth 1 -name '*.jar' | sort | paste -sd: -)"
  C_CMD=(
    "$java"
    -Xms"$QB_CASSANDRA_HEAP" -Xmx"$QB_CASSANDRA_HEAP" -Xss256k
    -XX:+UseG1GC -XX:+ParallelRefProcEnabled -XX:MaxTenuringThreshold=1 -XX:MaxGCPauseMillis=300
    -XX:G1RSetUpdatingPauseTimePercent=5 -XX:InitiatingHeapOccupancyPercent=70
    -XX:ParallelGCThreads=2 -XX:ConcGCThreads=1
    # 4 MiB regions: a value of up to 2 MiB is an ordinary allocation, not a humongous one (with
    # 1 MiB regions every 1 MiB value took two contiguous regions and fragmented the old gen).
    -XX:G1HeapRegionSize=4m
    -XX:+UseThreadPriorities -XX:+UseTLAB -XX:+ResizeTLAB -XX:+PerfDisableSharedMem
    -XX:+HeapDumpOnOutOfMemoryError -XX:HeapDumpPath="$C_LOGS" -XX:+ExitOnOutOfMemoryError
    "-Xlog:gc=info:file=$C_LOGS/gc.log:time,uptime:filecount=3,filesize=10M"
    -ea -da:net.openhft...
    -Djava.net.preferIPv4Stack=true
    -Djdk.attach.allowAttachSelf=true
    --add-exports java.base/jdk.internal.misc=ALL-UNNAMED
    --add-exports java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED
    --add-exports java.management/com.sun.jmx.remote.security=ALL-UNNAMED
    --add-exports java.rmi/sun.rmi.registry=ALL-UNNAMED
    --add-exports java.rmi/sun.rmi.server=ALL-UNNAMED
    --add-exports java.sql/java.sql=ALL-UNNAMED
    --add-exports java.base/java.lang.ref=ALL-UNNAMED
    --add-exports jdk.unsupported/sun.misc=ALL-UNNAMED
    --add-opens java.base/java.lang.module=ALL-UNNAMED
    --add-opens java.base/jdk.internal.loader=ALL-UNNAMED
    --add-opens java.base/jdk.internal.ref=ALL-UNNAMED
    --add-opens java.base/jdk.internal.reflect=ALL-UNNAMED
    --add-opens java.base/jdk.internal.math=ALL-UNNAMED
    --add-opens java.base/jdk.internal.module=ALL-UNNAMED
    --add-opens java.base/jdk.internal.util.jar=ALL-UNNAMED
    --add-opens jdk.management/com.sun.management.internal=ALL-UNNAMED
    --add-opens java.base/sun.nio.ch=ALL-UNNAMED
    --add-opens java.base/java.io=ALL-UNNAMED
    --add-opens java.base/java.lang.reflect=ALL-UNNAMED
    --add-opens java.base/java.lang=ALL-UNNAMED
    --add-opens java.base/java.util=ALL-UNNAMED
    --add-opens java.base/java.nio=ALL-UNNAMED
  )
  # bin/cassandra.in.sh adds these when the JDK has a compiler (a JDK, not a JRE).
  if [[ -x $(dirname "$java")/javac ]]; then
    C_CMD+=(
      --add-exports jdk.attach/sun.tools.attach=ALL-UNNAMED
      --add-exports jdk.compiler/com.sun.tools.javac.file=ALL-UNNAMED
      --add-opens jdk.compiler/com.sun.tools.javac=ALL-UNNAMED
    )
  fi
  C_CMD+=(
    -Dio.netty.tryReflectionSetAccessible=true
    -Dio.netty.allocator.useCacheForAllThreads=true
    -Dio.netty.allocator.maxOrder=11
    -Dchronicle.analytics.disable=true
    "-javaagent:$jam"
    -Dcassandra-foreground=yes
    "-Dcassandra.config=file://$C_CONF/cassandra.yaml"
    "-Dlogback.configurationFile=$C_CONF/logback.xml"
    "-Dcassandra.logdir=$C_LOGS"
    "-Dcassandra.storagedir=$C_DATA"
    "-Djna.tmpdir=$C_DIR/tmp"
    # snappy-java and lz4-java unpack their native library into java.io.tmpdir at every start
    # (about 0.5 MB, never removed): into the node's own state, not /tmp.
    "-Djava.io.tmpdir=$C_DIR/tmp"
    "-Dcassandra.triggers_dir=$C_CONF/triggers"
    -Dcassandra.skip_wait_for_gossip_to_settle=0
    -Dcassandra.superuser_setup_delay_ms=0
    -Dcassandra.libjemalloc=-
  )
  if [[ $QB_CASSANDRA_UNSAFESYSTEM == 1 ]]; then
    C_CMD+=(-Dcassandra.unsafesystem=true)
  fi
  if [[ -n ${QB_CASSANDRA_JMX_PORT:-} ]]; then
    C_CMD+=("-Dcassandra.jmx.local.port=$QB_CASSANDRA_JMX_PORT" -Dcom.sun.management.jmxremote.authenticate=false)
  fi
  C_CMD+=(-cp "$cp" org.apache.cassandra.service.CassandraDaemon)
}

# --- commands ------------------------------------------------------------------------------------

# Starts Cassandra in the background unless it already runs (ours) or something already answers
# CQL on the port (external: used as is). Does not wait for readiness: see cassandra_wait.
cassandra_start() {
  local pid java
  mkdir -p "$C_DIR"
  if pid=$(cassandra_pid); then
    qb_log "cassandra: already running (pid $pid, started by these scripts)"
    C_ALREADY_RUNNING=1
    echo started >"$C_OWNER"
    return 0
  fi
  if cassandra_cql_once --quiet; then
    qb_log "cassandra: something already answers CQL on $QB_CASSANDRA_HOST:$QB_CASSANDRA_PORT: using it, not starting ours"
    echo external >"$C_OWNER"
    rm -f "$C_PIDFILE"
    return 0
  fi
  port_in_use "$QB_CASSANDRA_HOST" "$QB_CASSANDRA_PORT" \
    && qb_die "cassandra: $QB_CASSANDRA_HOST:$QB_CASSANDRA_PORT is taken by something that does not speak CQL"
  port_in_use "$QB_CASSANDRA_HOST" "$QB_CASSANDRA_STORAGE_PORT" \
    && qb_die "cassandra: storage port $QB_CASSANDRA_HOST:$QB_CASSANDRA_STORAGE_PORT is already in use (set QB_CASSANDRA_STORAGE_PORT)"

  if ! java=$(cassandra_java); then
    qb_log "cassandra: no Java 17 (JAVA_HOME, /usr/lib/jvm/java-17-openjdk-amd64, PATH): apt-get install openjdk-17-jdk-headless..."
    mkdir -p "$C_LOGS"
    qb_apt_install "$C_LOGS/apt.log" openjdk-17-jdk-headless && java=$(cassandra_java) \
      || qb_die "cassandra: no Java 17 found and apt-get install openjdk-17-jdk-headless failed (see $C_LOGS/apt.log; Debian 13 has no such package: install a JDK 17, such as Eclipse Temurin 17, and set JAVA_HOME to it)"
  fi
  cassandra_fetch
  cassandra_render_config
  cassandra_command "$java"
  mkdir -p "$C_DIR/tmp" "$C_CONF/triggers"
  if [[ -d $C_DATA/data/system ]]; then C_START_KIND="existing data"; else C_START_KIND="cold, empty data dir"; fi
  qb_log "cassandra: starting 5.0.8 on $QB_CASSANDRA_HOST:$QB_CASSANDRA_PORT (${C_START_KIND}, heap $QB_CASSANDRA_HEAP, $("$java" -version 2>&1 | head -n1))"
  rm -f "$C_LOGS/stdout.log"
  # system.log is appended to across restarts: readiness only scans what this launch writes.
  C_LAUNCHED_AT=$EPOCHSECONDS
  echo "$C_LAUNCHED_AT $(stat -c %s "$C_LOGS/system.log" 2>/dev/null || echo 0)" >"$C_DIR/launch"
  # (a launch that dies before exec'ing java is reported by cassandra_wait, with stdout.log)
  qb_spawn_detached "$C_LOGS/stdout.log" "${C_CMD[@]}" || true
  pid=$QB_SPAWNED_PID
  echo "$pid" >"$C_PIDFILE"
  echo started >"$C_OWNER"
  qb_log "cassandra: pid $pid, log $C_LOGS/system.log"
}

# Waits for a real CQL handshake. Fails fast if our process dies or logs a startup exception.
cassandra_wait() {
  local pid="" rc owner launched="" log_offset=0
  owner=$(cat "$C_OWNER" 2>/dev/null || true)
  [[ -f $C_DIR/launch ]] && read -r launched log_offset <"$C_DIR/launch"
  local -a watch=()
  if pid=$(cassandra_pid); then
    watch=(--pid "$pid" --log "$C_LOGS/system.log" --log-offset "${log_offset:-0}")
  elif [[ $owner == started ]]; then
    cassandra_cql_once --quiet && return 0
    cassandra_print_log_tail
    qb_die "cassandra: the server we started is not running any more"
  fi
  cassandra_cql_once --quiet \
    || qb_log "cassandra: waiting for CQL on $QB_CASSANDRA_HOST:$QB_CASSANDRA_PORT (timeout ${QB_CASSANDRA_WAIT}s)"
  rc=0
  python3 "$QB_LOCAL_DIR/cql_ready.py" --host "$QB_CASSANDRA_HOST" --port "$QB_CASSANDRA_PORT" \
    --timeout "$QB_CASSANDRA_WAIT" --quiet "${watch[@]}" || rc=$?
  if [[ $rc != 0 ]]; then
    case $rc in
      2) qb_log "cassandra: process $pid died during startup" >&2 ;;
      3) qb_log "cassandra: 'Exception encountered during startup' in the log" >&2 ;;
      *) qb_log "cassandra: no CQL handshake on $QB_CASSANDRA_HOST:$QB_CASSANDRA_PORT within ${QB_CASSANDRA_WAIT}s" >&2 ;;
    esac
    if [[ -n $pid ]]; then
      cassandra_print_log_tail
      if cassandra_pid >/dev/null; then
        qb_log "cassandra: stopping the half-started server (pid $pid)" >&2
        cassandra_stop >&2
      fi
    fi
    qb_die "cassandra: not ready"
  fi
  if [[ -n $pid ]]; then
    local took="" line
    # Launch-to-ready from the log ("Startup complete" comes right after the CQL listener opens),
    # since this script may have been busy with RabbitMQ when Cassandra became ready.
    line=$(tail -c +"$((${log_offset:-0} + 1))" "$C_LOGS/system.log" 2>/dev/null | grep -m1 ' - Startup complete' || true)
    # (only for a launch of this run, or a recent one when `wait` runs by itself)
    if [[ -n $line && $launched =~ ^[0-9]+$ && -z ${C_ALREADY_RUNNING:-} ]] \
      && { [[ -n ${C_LAUNCHED_AT:-} ]] || ((EPOCHSECONDS - launched < QB_CASSANDRA_WAIT + 60)); }; then
      line=$(awk '{print $3 " " $4}' <<<"$line")
      line=$(date -d "${line%,*}" +%s 2>/dev/null || true)
      [[ -n $line ]] && took=" in $((line - launched))s"
    fi
    qb_log "cassandra: ready${took} (pid $pid, rss $(cassandra_rss_mib "$pid") MiB)"
  else
    qb_log "cassandra: ready (external server on $QB_CASSANDRA_HOST:$QB_CASSANDRA_PORT)"
  fi
}

# Stops Cassandra only if these scripts started it: SIGTERM (drains), SIGKILL after 30 s.
cassandra_stop() {
  local pid owner i
  owner=$(cat "$C_OWNER" 2>/dev/null || true)
  if [[ $owner == external ]]; then
    qb_log "cassandra: not started by these scripts (external server): leaving it running"
    rm -f "$C_OWNER"
    return 0
  fi
  if ! pid=$(cassandra_pid); then
    qb_log "cassandra: not running"
    rm -f "$C_PIDFILE" "$C_OWNER"
    return 0
  fi
  qb_log "cassandra: stopping pid $pid (SIGTERM)"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 300; i++)); do
    cassandra_pid >/dev/null || break
    sleep 0.1
  done
  if cassandra_pid >/dev/null; then
    qb_log "cassandra: still alive after 30s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
      cassandra_pid >/dev/null || break
      sleep 0.1
    done
  fi
  rm -f "$C_PIDFILE" "$C_OWNER"
  qb_log "cassandra: stopped"
}

cassandra_status() {
  local pid owner cql
  owner=$(cat "$C_OWNER" 2>/dev/null || true)
  if cql=$(cassandra_cql_once 2>&1); then cql="answers CQL (${cql#*(}"; cql=${cql%)}")"; else cql="no CQL answer"; fi
  if pid=$(cassandra_pid); then
    echo "cassandra: running, started by these scripts, pid $pid, rss $(cassandra_rss_mib "$pid") MiB, $QB_CASSANDRA_HOST:$QB_CASSANDRA_PORT $cql"
    echo "           data $C_DATA, log $C_LOGS/system.log"
    [[ $cql == answers* ]]
  elif [[ $cql == answers* ]]; then
    echo "cassandra: external server (not started by these scripts) on $QB_CASSANDRA_HOST:$QB_CASSANDRA_PORT, $cql${owner:+ [owner file: $owner]}"
  else
    echo "cassandra: not running ($QB_CASSANDRA_HOST:$QB_CASSANDRA_PORT $cql)"
    return 1
  fi
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  set -euo pipefail
  case ${1:-} in
    start) cassandra_start ;;
    wait) cassandra_wait ;;
    up) cassandra_start; cassandra_wait ;;
    stop | down) cassandra_stop ;;
    status) cassandra_status ;;
    fetch) cassandra_fetch ;;
    print-command)
      java=$(cassandra_java) || qb_die "no Java 17"
      cassandra_command "$java"
      printf '%q ' "${C_CMD[@]}"
      echo
      ;;
    *) echo "usage: $0 start|wait|up|stop|status|fetch|print-command" >&2; exit 2 ;;
  esac
fi
