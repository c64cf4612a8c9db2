#!/usr/bin/env bash
# A three-node RabbitMQ cluster on this machine, beside any RabbitMQ already running:
# to try lockstep's failover by hand, and what tests/ha starts for its broker faults.
#
#   bash deploy/rabbitmq-cluster.sh start DIR [BASE_PORT]  # prints LOCKSTEP_AMQP_URL=...
#   bash deploy/rabbitmq-cluster.sh kill DIR N             # SIGKILL node N (1-3)
#   bash deploy/rabbitmq-cluster.sh revive DIR N           # start node N again
#   bash deploy/rabbitmq-cluster.sh stop DIR               # stop every node, remove DIR
#
# Node N is lockstep-N-<tag>@localhost, AMQP on 127.0.0.1:BASE_PORT+N (default base
# 5700: ports 5701-5703), Erlang distribution on BASE_PORT+N+20000. Everything of the
# cluster lives under DIR: one Erlang cookie (DIR/home), and per node its config, an
# empty plugin list, data and logs (DIR/nodeN). Nodes 2 and 3 join node 1. The user
# guest/guest may connect from 127.0.0.1, as on a fresh RabbitMQ. Run it as the user
# that may run RabbitMQ (root here); it needs only the rabbitmq-server package.
set -euo pipefail

sbin=$(dirname "$(readlink -f "$(command -v rabbitmq-server)")")  # not Debian's su wrappers

usage() { sed -n '2,15p' "$0" >&2; exit 2; }

node_env() {  # node_env DIR N: the environment of node N (and of rabbitmqctl on it)
    local dir=$1 n=$2 base
    base=$(cat "$dir/base_port")
    export HOME="$dir/home" LC_ALL=C.UTF-8
    export RABBITMQ_NODENAME="lockstep-$n-$(cat "$dir/tag")@localhost"
    export RABBITMQ_NODE_PORT=$((base + n)) RABBITMQ_DIST_PORT=$((base + n + 20000))
    export RABBITMQ_CONF_ENV_FILE="$dir/node$n/rabbitmq-env.conf"
    export RABBITMQ_CONFIG_FILE="$dir/node$n/rabbitmq.conf"
    export RABBITMQ_ADVANCED_CONFIG_FILE="$dir/node$n/advanced.config"
    export RABBITMQ_ENABLED_PLUGINS_FILE="$dir/node$n/enabled_plugins"
    export RABBITMQ_MNESIA_BASE="$dir/node$n/data" RABBITMQ_LOG_BASE="$dir/node$n/log"
    export RABBITMQ_PID_FILE="$dir/node$n/pid"
    export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
}

ctl() {  # ctl DIR N ARGS...: rabbitmqctl on node N
    local dir=$1 n=$2
    shift 2
    (node_env "$dir" "$n" && "$sbin/rabbitmqctl" -q -n "$RABBITMQ_NODENAME" "$@")
}

start_node() {  # start_node DIR N: boot node N and wait for it
    local dir=$1 n=$2
    (node_env "$dir" "$n" && "$sbin/rabbitmq-server" -detached >>"$dir/node$n/out" 2>&1)
    ctl "$dir" "$n" wait --timeout 60 "$dir/node$n/pid" >/dev/null
    ctl "$dir" "$n" await_startup --timeout 60
}

cmd_start() {
    local dir=${1:?DIR} base=${2:-5700} n
    mkdir -p "$dir/home"
    dir=$(readlink -f "$dir")
    echo "$base" >"$dir/base_port"
    head -c 4 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$dir/tag"
    head -c 20 /dev/urandom | od -An -tx1 | tr -d ' \n' | tr a-f A-F >"$dir/home/.erlang.cookie"
    chmod 400 "$dir/home/.erlang.cookie"
    for n in 1 2 3; do
        mkdir -p "$dir/node$n"
        : >"$dir/node$n/rabbitmq-env.conf"
        echo "[]." >"$dir/node$n/enabled_plugins"
        printf 'listeners.tcp.1 = 127.0.0.1:%s\n' $((base + n)) >"$dir/node$n/rabbitmq.conf"
        start_node "$dir" "$n"
    done
    for n in 2 3; do  # join's chatter goes to its log; a failure shows it
        if ! { ctl "$dir" "$n" stop_app &&
               ctl "$dir" "$n" join_cluster "lockstep-1-$(cat "$dir/tag")@localhost" &&
               ctl "$dir" "$n" start_app; } >"$dir/node$n/join.out" 2>&1; then
            cat "$dir/node$n/join.out" >&2
            exit 1
        fi
    done
    ctl "$dir" 1 await_online_nodes 3 --timeout 60 >/dev/null 2>&1 || true
    urls=""
    for n in 1 2 3; do urls+="${urls:+,}amqp://guest:guest@127.0.0.1:$((base + n))/"; done
    echo "LOCKSTEP_AMQP_URL=$urls"
}

cmd_kill() {
    local dir=$1 n=${2:?N}
    kill -9 "$(cat "$dir/node$n/pid")"
}

cmd_revive() {
    local dir=$1 n=${2:?N}
    start_node "$(readlink -f "$dir")" "$n"
}

cmd_stop() {
    local dir=${1:?DIR} n
    [ -d "$dir" ] || return 0
    dir=$(readlink -f "$dir")
    for n in 3 2 1; do
        if [ -f "$dir/node$n/pid" ]; then
            timeout 60 bash -c "$(declare -f node_env ctl); sbin=$sbin; ctl $dir $n stop" \
                >/dev/null 2>&1 || kill -9 "$(cat "$dir/node$n/pid")" 2>/dev/null || true
        fi
    done
    rm -rf "$dir"
}

case "${1:-}" in
    start) shift; cmd_start "$@" ;;
    kill) shift; cmd_kill "$@" ;;
    revive) shift; cmd_revive "$@" ;;
    stop) shift; cmd_stop "$@" ;;
    *) usage ;;
esac
