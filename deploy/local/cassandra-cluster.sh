#!/usr/bin/env bash
# A 3-node Cassandra 5.0.8 cluster on 127.0.0.2, .3, .4 (ports 9042/7000 on each address; the single
# dev node of stack.sh keeps 127.0.0.1), for the fault drill that kills a node under load at RF 3.
#
#   deploy/local/cassandra-cluster.sh up        start the nodes not running yet (the seed, then the others)
#   deploy/local/cassandra-cluster.sh down      stop all three
#   deploy/local/cassandra-cluster.sh kill N    kill -9 node N (1-3)
#   deploy/local/cassandra-cluster.sh start N   start node N again and wait for it
#   deploy/local/cassandra-cluster.sh hosts     print the contact points (comma separated)
#
# Each node runs deploy/local/cassandra.sh with its own state dir (state/cluster/nodeN), address,
# token and seed (node 1). Fixed tokens and auto_bootstrap false skip the 30 s bootstrap sleeps on
# an empty cluster (see ../shared/reference/cassandra-from-maven.md, "3-node cluster"). The jars are
# the single node's (fetched first if missing). Heap 768 MiB per node.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BASE=${QB_STATE_DIR:-$HERE/state}
TOKENS=(-9223372036854775808 -3074457345618258603 3074457345618258602)

node() {
  local i=$1
  shift
  QB_STATE_DIR=$BASE/cluster/node$i \
    QB_CASSANDRA_HOST=127.0.0.$((i + 1)) \
    QB_CASSANDRA_SEEDS=127.0.0.2:7000 \
    QB_CASSANDRA_INITIAL_TOKEN=${TOKENS[$((i - 1))]} \
    QB_CASSANDRA_CLUSTER_NAME=queue-bridge-cluster \
    QB_CASSANDRA_AUTO_BOOTSTRAP=false \
    QB_CASSANDRA_HEAP=${QB_CLUSTER_HEAP:-768M} \
    QB_CASSANDRA_LIB=$BASE/cassandra/lib \
    bash "$HERE/cassandra.sh" "$@"
}

# The jars of the single node (fetched from Maven Central if this machine has none yet).
[[ -f $BASE/cassandra/lib/.complete ]] || QB_STATE_DIR=$BASE bash "$HERE/cassandra.sh" fetch

case ${1:-} in
  up)
    node 1 up
    # Nodes 2 and 3 side by side, once the seed answers: with fixed tokens and no bootstrap neither
    # streams data nor waits on the other (both in turn: about 45 s on two cores, together: less).
    pids=()
    for i in 2 3; do
      node "$i" up &
      pids+=($!)
    done
    rc=0
    for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
    exit "$rc"
    ;;
  down) for i in 1 2 3; do node "$i" stop || true; done ;;
  start) node "${2:?node 1-3}" up ;;
  kill)
    pid=$(cat "$BASE/cluster/node${2:?node 1-3}/cassandra/cassandra.pid")
    kill -9 "$pid"
    echo "node $2 (pid $pid) killed"
    ;;
  status) for i in 1 2 3; do node "$i" status || true; done ;;
  hosts) echo "127.0.0.2,127.0.0.3,127.0.0.4" ;;
  *) echo "usage: $0 up|down|kill N|start N|status|hosts" >&2; exit 2 ;;
esac
