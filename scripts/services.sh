#!/usr/bin/env bash
# The services sqapi's tests talk to -- PostgreSQL, Redis, RabbitMQ on 127.0.0.1 -- brought up
# when they are not, and stopped again by whoever brought them up.
#
#   scripts/services.sh up [SERVICE...]   start each one that does not answer on its port,
#                                         installing it from Debian's packages if missing;
#                                         one that answers already is left alone
#   scripts/services.sh down              stop (and remove) exactly what `up` started
#
# SERVICE is postgres, redis or rabbitmq (default: all three).  `make test` runs `up` before
# the tests and `down` when they end, also when they fail or are interrupted.
#
# Environment (all optional):
#   SQAPI_TEST_PG_PORT        [5432]   SQAPI_TEST_REDIS_PORT   [6379]
#   SQAPI_TEST_RABBITMQ_PORT  [5672]
#   SQAPI_SERVICES_STATE      where `up` notes what it started, for `down`  [.sqapi/services]
#
# What `up` starts when a port does not answer:
#   postgres  a cluster already set up on that port (pg_lsclusters) is started; otherwise a
#             cluster of its own is made -- pg_createcluster --port P <newest> sqapi_test_P,
#             trust authentication on loopback -- and `down` drops it again
#   redis     redis-server on 127.0.0.1:P, nothing kept on disk
#   rabbitmq  on 5672 the machine's own node (rabbitmq-server -detached, guest/guest); on any
#             other port a node of its own, sqapi-test-P@localhost, listening on 127.0.0.1:P
#             only (distribution port P+10000), its data in the state folder
# Installing needs root (or sudo): apt-get install postgresql / redis-server / rabbitmq-server.
# A PostgreSQL installed here creates no `main` cluster (createcluster.d), so none runs that
# the tests cannot log in to.
set -euo pipefail
cd "$(dirname "$0")/.."

PG_PORT=${SQAPI_TEST_PG_PORT:-5432}
REDIS_PORT=${SQAPI_TEST_REDIS_PORT:-6379}
RABBITMQ_PORT=${SQAPI_TEST_RABBITMQ_PORT:-5672}
STATE=${SQAPI_SERVICES_STATE:-$PWD/.sqapi/services}
STARTED="$STATE/started"   # one line per thing `up` started: "<kind> <args...>"

say() { echo "services: $*"; }
die() { echo "services: $*" >&2; exit 1; }

answers() {  # answers PORT: something accepts TCP connections on 127.0.0.1:PORT
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

wait_for() {  # wait_for PORT WHAT SECONDS
    local deadline=$((SECONDS + $3))
    until answers "$1"; do
        [ $SECONDS -lt $deadline ] || die "$2 did not answer on 127.0.0.1:$1 within $3s"
        sleep 0.2
    done
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        die "installing needs root: run as root, or install it yourself: $*"; fi
}

apt_install() {  # apt_install PACKAGE...
    say "installing $* from Debian's packages"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

note() { mkdir -p "$STATE"; echo "$*" >> "$STARTED"; }

# -- PostgreSQL --------------------------------------------------------------------------------
postgres_up() {
    local port=$1
    if answers "$port"; then say "postgres answers on 127.0.0.1:$port: left alone"; return; fi
    if ! command -v pg_createcluster >/dev/null || [ -z "$(ls /usr/lib/postgresql 2>/dev/null)" ]; then
        as_root mkdir -p /etc/postgresql-common/createcluster.d
        echo "create_main_cluster = false" | as_root tee /etc/postgresql-common/createcluster.d/sqapi-tests.conf >/dev/null
        apt_install postgresql postgresql-contrib
    fi
    local version name
    read -r version name < <(pg_lsclusters -h | awk -v p="$port" '$3 == p {print $1, $2; exit}') || true
    if [ -n "${name:-}" ]; then
        say "starting PostgreSQL cluster $version/$name on port $port"
        as_root pg_ctlcluster --skip-systemctl-redirect "$version" "$name" start
        note "postgres-started $version $name"
    else
        version=$(ls /usr/lib/postgresql | sort -V | tail -1)
        name="sqapi_test_$port"
        say "creating PostgreSQL cluster $version/$name on 127.0.0.1:$port (trust authentication)"
        as_root pg_createcluster --port "$port" "$version" "$name" -- --auth-local=trust --auth-host=trust >/dev/null
        as_root pg_ctlcluster --skip-systemctl-redirect "$version" "$name" start
        note "postgres-created $version $name"
    fi
    wait_for "$port" "PostgreSQL" 60
}

# -- Redis ---------------------------------------------------------------------------------------
redis_up() {
    local port=$1
    if answers "$port"; then say "redis answers on 127.0.0.1:$port: left alone"; return; fi
    command -v redis-server >/dev/null || apt_install redis-server
    mkdir -p "$STATE/redis-$port"
    say "starting redis-server on 127.0.0.1:$port"
    redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --save "" --appendonly no \
        --dir "$STATE/redis-$port" --pidfile "$STATE/redis-$port/redis.pid" --logfile "$STATE/redis-$port/redis.log"
    note "redis $port"
    wait_for "$port" "Redis" 30
}

rabbit_env() {  # rabbit_env NODE PORT BASE COMMAND...: a node of our own, not the machine's (its own
    # cookie in HOME, its own env file, data and logs), run by the package's scripts themselves --
    # /usr/sbin's wrappers would switch to user rabbitmq, which cannot write to our state folder
    local node=$1 port=$2 base=$3; shift 3
    HOME="$base/home" RABBITMQ_NODENAME=$node RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT=$port \
        RABBITMQ_DIST_PORT=$((port + 10000)) RABBITMQ_MNESIA_BASE="$base/mnesia" RABBITMQ_LOG_BASE="$base/log" \
        RABBITMQ_CONFIG_FILE="$base/rabbitmq.conf" RABBITMQ_CONF_ENV_FILE="$base/rabbitmq-env.conf" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$base/enabled_plugins" RABBITMQ_PID_FILE="$base/pid" \
        ERL_CRASH_DUMP="$base/erl_crash.dump" "$@"
}

# -- RabbitMQ ------------------------------------------------------------------------------------
rabbitmq_up() {
    local port=$1
    if answers "$port"; then say "rabbitmq answers on 127.0.0.1:$port: left alone"; return; fi
    command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
    if [ "$port" = 5672 ]; then
        say "starting the machine's RabbitMQ node (rabbitmq-server -detached)"
        as_root rabbitmq-server -detached
        note "rabbitmq-default"
        local deadline=$((SECONDS + 180))
        until as_root rabbitmqctl -q await_startup --timeout 60 >/dev/null 2>&1 </dev/null; do
            [ $SECONDS -lt $deadline ] || die "RabbitMQ did not start: see /var/log/rabbitmq"
            sleep 0.5
        done
    else
        local node="sqapi-test-$port@localhost" base="$STATE/rabbitmq-$port"
        mkdir -p "$base/mnesia" "$base/log" "$base/home"
        printf 'listeners.tcp.default = 127.0.0.1:%s\n' "$port" > "$base/rabbitmq.conf"
        echo "[]." > "$base/enabled_plugins"
        echo "# scripts/services.sh: everything is in the environment" > "$base/rabbitmq-env.conf"
        say "starting RabbitMQ node $node on 127.0.0.1:$port"
        rabbit_env "$node" "$port" "$base" /usr/lib/rabbitmq/bin/rabbitmq-server -detached
        note "rabbitmq-node $node $base $port"
        local deadline=$((SECONDS + 180))  # await_startup fails at once until the node has registered
        until rabbit_env "$node" "$port" "$base" /usr/lib/rabbitmq/bin/rabbitmqctl -q -n "$node" await_startup \
                --timeout 60 >/dev/null 2>&1 </dev/null; do
            [ $SECONDS -lt $deadline ] || die "RabbitMQ node $node did not start: see $base/log"
            sleep 0.5
        done
    fi
    wait_for "$port" "RabbitMQ" 120
}

# -- down: what up started, last first ----------------------------------------------------------
down() {
    [ -f "$STARTED" ] || { say "nothing to stop"; return; }
    # the commands below read no line of the list: some (rabbitmqctl) would swallow the rest of stdin
    while read -r kind a b c <&3; do
        case $kind in
            postgres-started) say "stopping PostgreSQL cluster $a/$b"
                as_root pg_ctlcluster --skip-systemctl-redirect "$a" "$b" stop -m fast || true ;;
            postgres-created) say "stopping and dropping PostgreSQL cluster $a/$b"
                as_root pg_dropcluster --stop "$a" "$b" || true ;;
            redis) say "stopping redis-server on 127.0.0.1:$a"
                redis-cli -p "$a" shutdown nosave >/dev/null 2>&1 || true
                rm -rf "$STATE/redis-$a" ;;
            rabbitmq-default) say "stopping the machine's RabbitMQ node"
                as_root rabbitmqctl -q stop >/dev/null 2>&1 </dev/null || true ;;
            rabbitmq-node) say "stopping RabbitMQ node $a"
                rabbit_env "$a" "$c" "$b" /usr/lib/rabbitmq/bin/rabbitmqctl -q -n "$a" stop "$b/pid" \
                    >/dev/null 2>&1 </dev/null || true
                rm -rf "$b" ;;
        esac
    done 3< <(tac "$STARTED")
    rm -f "$STARTED"
}

command=${1:-}
shift || true
case $command in
    up)
        [ $# -gt 0 ] || set -- postgres redis rabbitmq
        for service in "$@"; do
            case $service in
                postgres) postgres_up "$PG_PORT" ;;
                redis) redis_up "$REDIS_PORT" ;;
                rabbitmq) rabbitmq_up "$RABBITMQ_PORT" ;;
                *) die "unknown service '$service': postgres, redis or rabbitmq" ;;
            esac
        done ;;
    down) down ;;
    *) die "usage: scripts/services.sh up [postgres|redis|rabbitmq ...] | down" ;;
esac
