#!/usr/bin/env bash
# A 3-node RabbitMQ cluster on 127.0.0.1 (nodes qbc1-3@localhost, AMQP ports 5681-5683; the single
# dev broker of stack.sh keeps 5672), for the drill that kills a node under load with the bridge's
# queues as quorum queues (BRIDGE_QUEUE_TYPE=quorum, tests/integration/test_rabbitmq_cluster.py).
#
#   deploy/local/rabbitmq-cluster.sh up        start the nodes not running yet; 2 and 3 join 1 (a
#                                              fresh cluster when none runs)
#   deploy/local/rabbitmq-cluster.sh down      stop all three
#   deploy/local/rabbitmq-cluster.sh kill N    kill -9 node N (1-3)
#   deploy/local/rabbitmq-cluster.sh start N   start node N again (it rejoins) and wait for it
#   deploy/local/rabbitmq-cluster.sh urls      print the nodes' AMQP host:port (comma separated)
#
# Each node runs deploy/local/rabbitmq.sh with its own state dir (state/rabbit-cluster/nodeN),
# node name and port (its Erlang distribution port is the AMQP port + 20000); no management UI.
# The users and permissions are the single broker's (rabbitmq.sh), set once on the cluster.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BASE=${QB_STATE_DIR:-$HERE/state}
PORTS=(5681 5682 5683)
case ":$PATH:" in *:/usr/sbin:*) ;; *) PATH=$PATH:/usr/sbin ;; esac

name() { echo "qbc$1@localhost"; }

node() {
  local i=$1
  shift
  QB_STATE_DIR=$BASE/rabbit-cluster/node$i \
    QB_AMQP_PORT=${PORTS[$((i - 1))]} \
    QB_RABBITMQ_NODENAME=$(name "$i") \
    QB_RABBITMQ_MANAGEMENT=0 \
    bash "$HERE/rabbitmq.sh" "$@"
}

ctl() {
  local i=$1
  shift
  timeout 60 rabbitmqctl -q -n "$(name "$i")" "$@"
}

# Node N (2 or 3) joins node 1 unless it is a member already (a restarted node rejoins by itself).
join() {
  local i=$1
  if ctl 1 cluster_status --formatter json 2>/dev/null | grep -q "\"$(name "$i")\""; then
    return 0
  fi
  local log=$BASE/rabbit-cluster/node$i/join.log
  { ctl "$i" stop_app && ctl "$i" reset && ctl "$i" join_cluster "$(name 1)" && ctl "$i" start_app; } >"$log" 2>&1 \
    || { tail -n 20 "$log" >&2; echo "rabbitmq cluster: $(name "$i") could not join $(name 1) (see $log)" >&2; exit 1; }
  echo "rabbitmq cluster: $(name "$i") joined $(name 1)"
}

# Node N's broker folder (pid file, Mnesia, logs): rabbitmq.sh's own choice (under the state dir,
# or under /var/tmp when the broker's user cannot reach that).
rdir() {
  QB_STATE_DIR=$BASE/rabbit-cluster/node$1 bash -c 'source "$1" >/dev/null && echo "$R_DIR"' _ "$HERE/rabbitmq.sh"
}

# Node N's process is alive (its pid file names a live process), whether or not it serves yet.
running() {
  local f
  f=$(rdir "$1")/rabbitmq.pid
  [[ -f $f ]] && kill -0 "$(tr -dc '0-9' <"$f")" 2>/dev/null
}

case ${1:-} in
  up)
    if ! running 1 && ! running 2 && ! running 3; then
      # A fresh cluster each time none runs: one stopped in another order than it started (a node
      # the drill killed, then started again) waits at boot for the node that stopped last (Mnesia:
      # "Waiting for Mnesia tables"), and node 1 never came up. The drills keep nothing across runs.
      for i in 1 2 3; do rm -rf "$(rdir "$i")"; done
      rm -rf "$BASE/rabbit-cluster"
    fi
    # `up` (start, wait, users) in one process each: its wait knows when the node was launched.
    node 1 up
    for i in 2 3; do
      node "$i" serve # no users: joining resets the node (11-13 s of rabbitmqctl saved per node)
      join "$i"
    done
    node 1 users # a joining node is reset: the cluster's users are node 1's
    ;;
  down) for i in 3 2 1; do node "$i" stop || true; done ;;
  start) node "${2:?node 1-3}" up ;;
  kill)
    pid=$(tr -dc '0-9' <"$(rdir "${2:?node 1-3}")/rabbitmq.pid")
    kill -9 "$pid"
    echo "rabbitmq node $2 (pid $pid) killed"
    ;;
  urls) echo "127.0.0.1:5681,127.0.0.1:5682,127.0.0.1:5683" ;;
  *) echo "usage: $0 up|down|kill N|start N|urls" >&2; exit 2 ;;
esac
