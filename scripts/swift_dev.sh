#!/usr/bin/env bash
# Start, stop or check a real single-node OpenStack Swift on 127.0.0.1 for sqapi's tests.
#
#   scripts/swift_dev.sh start    # idempotent: does nothing when Swift already answers
#   scripts/swift_dev.sh stop     # stops what `start` started (pid files in the state dir)
#   scripts/swift_dev.sh status   # exit 0 when auth works and a token is accepted
#
# What `start` does, when Swift does not answer yet:
#   * installs Debian's swift + memcached packages if missing (needs root or sudo);
#   * renders scripts/swift/*.conf.in into $SQAPI_SWIFT_DIR/etc, builds one-replica
#     rings there, and keeps the data in $SQAPI_SWIFT_DIR/devices (a plain directory:
#     mount_check = false; its file system must support user.* xattrs);
#   * starts memcached (tempauth keeps its tokens there; without it every request
#     after login is 401) unless something already listens on its port;
#   * starts only the proxy, account, container and object servers, under Debian's
#     /usr/bin/python3 -- no replicators, auditors or updaters;
#   * waits (at most SQAPI_SWIFT_WAIT seconds, default 60) until a login works and an
#     object can be written, read and deleted.
#
# Environment (all optional):
#   SQAPI_SWIFT_DIR             state dir: configs, rings, data, logs, pids  [/tmp/sqapi-swift]
#   SQAPI_SWIFT_PROXY_PORT      [8080]    SQAPI_SWIFT_OBJECT_PORT     [6210]
#   SQAPI_SWIFT_CONTAINER_PORT  [6211]    SQAPI_SWIFT_ACCOUNT_PORT    [6212]
#   SQAPI_SWIFT_MEMCACHED_PORT  [11211]   SQAPI_SWIFT_WAIT            [60]
#
# Tempauth users: test:tester / testing (admin of account AUTH_test), test:tester2 / testing2.
set -euo pipefail
# Job control off even when the caller exports SHELLOPTS=monitor: with it on, each background
# job leads its own process group, so setsid(1) forks and $! names a parent that has already
# exited -- we would lose the daemons' pids (and think memcached died while it starts).
set +m

STATE_DIR=${SQAPI_SWIFT_DIR:-/tmp/sqapi-swift}
PROXY_PORT=${SQAPI_SWIFT_PROXY_PORT:-8080}
OBJECT_PORT=${SQAPI_SWIFT_OBJECT_PORT:-6210}
CONTAINER_PORT=${SQAPI_SWIFT_CONTAINER_PORT:-6211}
ACCOUNT_PORT=${SQAPI_SWIFT_ACCOUNT_PORT:-6212}
MEMCACHED_PORT=${SQAPI_SWIFT_MEMCACHED_PORT:-11211}
WAIT_SECONDS=${SQAPI_SWIFT_WAIT:-60}

AUTH_URL="http://127.0.0.1:${PROXY_PORT}/auth/v1.0"
AUTH_USER="test:tester"
AUTH_KEY="testing"

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TEMPLATE_DIR="$SCRIPT_DIR/swift"
ETC_DIR="$STATE_DIR/etc"
DEVICES_DIR="$STATE_DIR/devices"
LOG_DIR="$STATE_DIR/log"
RUN_DIR="$STATE_DIR/run"
SERVERS=(account container object proxy)
PACKAGES=(swift swift-proxy swift-account swift-container swift-object memcached)
SYSTEM_PYTHON=/usr/bin/python3
# The swift servers are Debian's: keep any venv / pyenv settings away from them.
CLEAN_ENV=(env -u PYTHONPATH -u PYTHONHOME -u VIRTUAL_ENV -u PYTHONSTARTUP)

log() { printf 'swift_dev: %s\n' "$*" >&2; }
die() { printf 'swift_dev: ERROR: %s\n' "$*" >&2; exit 1; }

server_port() {
    case $1 in
        proxy) echo "$PROXY_PORT" ;;
        object) echo "$OBJECT_PORT" ;;
        container) echo "$CONTAINER_PORT" ;;
        account) echo "$ACCOUNT_PORT" ;;
        memcached) echo "$MEMCACHED_PORT" ;;
    esac
}

# A Python for the probes: Debian's if installed, else whatever python3 is on PATH.
probe_python() {
    if [[ -x $SYSTEM_PYTHON ]]; then echo "$SYSTEM_PYTHON"; else command -v python3 || true; fi
}

# probe MODE: "light" = log in and HEAD the account with the token;
# "full" = also create a container, write, read back and delete an object.
# Prints the reason on stderr and exits non-zero when Swift does not work.
probe() {
    local py
    py=$(probe_python)
    [[ -n $py ]] || { echo "no python3 to probe with" >&2; return 1; }
    "$py" - "$AUTH_URL" "$AUTH_USER" "$AUTH_KEY" "$1" <<'PY'
import sys
import urllib.error
import urllib.request
import uuid

auth_url, user, key, mode = sys.argv[1:5]
# Never go through an HTTP proxy from the environment for 127.0.0.1.
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def call(method, url, headers, data=None):
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def need(ok, what):
    if not ok:
        sys.stderr.write(what + "\n")
        sys.exit(1)


try:
    status, headers, _ = call("GET", auth_url, {"X-Auth-User": user, "X-Auth-Key": key})
    need(status // 100 == 2, "login returned HTTP %s" % status)
    token, storage_url = headers.get("X-Auth-Token"), headers.get("X-Storage-Url")
    need(bool(token and storage_url), "login returned no token / storage URL")
    auth = {"X-Auth-Token": token}
    status, _, _ = call("HEAD", storage_url, auth)
    need(status // 100 == 2, "HEAD account with a fresh token returned HTTP %s "
         "(401 usually means memcached is not reachable)" % status)
    if mode == "full":
        container = "%s/sqapi-swift-dev-probe-%s" % (storage_url, uuid.uuid4().hex)
        payload = uuid.uuid4().bytes * 64
        status, _, _ = call("PUT", container, auth, b"")
        need(status // 100 == 2, "PUT container returned HTTP %s" % status)
        try:
            status, _, _ = call("PUT", container + "/probe", auth, payload)
            need(status // 100 == 2, "PUT object returned HTTP %s (see object.log; "
                 "the devices dir needs user.* xattrs)" % status)
            status, _, body = call("GET", container + "/probe", auth)
            need(status == 200 and body == payload, "GET object returned HTTP %s / other bytes" % status)
        finally:
            call("DELETE", container + "/probe", auth)
            call("DELETE", container, auth)
except OSError as err:
    need(False, "cannot reach %s: %s" % (auth_url, err))
PY
}

port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# the pid recorded for NAME when we started it, or nothing.
recorded_pid() {
    local pidfile="$RUN_DIR/$1.pid" pid
    [[ -f $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    echo "$pid"
}

# pid of a process we started and that is still that process, or nothing.
live_pid() {
    local name=$1 pid
    pid=$(recorded_pid "$name") || return 1
    [[ -r /proc/$pid/cmdline ]] || return 1
    # Guard against pid reuse: the command line names our state dir (swift servers) or port (memcached).
    if [[ $name == memcached ]]; then
        tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "-p $MEMCACHED_PORT" || return 1
    else
        tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$ETC_DIR/" || return 1
    fi
    echo "$pid"
}

# pid of a daemon this very script started (its parent is us), whatever its command line says yet:
# one that has not exec'd its program still shows this script's command line, so live_pid misses it.
own_child() {
    local pid
    pid=$(recorded_pid "$1") || return 1
    [[ $(ps -o ppid= -p "$pid" 2>/dev/null | tr -d ' ') == "$$" ]] || return 1
    echo "$pid"
}

# All swift servers we started are alive (memcached may be someone else's).
ours_alive() {
    local name
    [[ -d $RUN_DIR ]] || return 0
    for name in "${SERVERS[@]}"; do
        if [[ -f $RUN_DIR/$name.pid ]] && ! live_pid "$name" >/dev/null; then
            return 1
        fi
    done
    return 0
}

is_up() {
    probe light 2>/dev/null && ours_alive
}

# Signal every process we started (its whole setsid group: parent + workers) at once, then
# wait for all of them together; SIGKILL what is still there after 10 s.
stop_all() {
    [[ -d $RUN_DIR ]] || return 0
    local name pid pgid i
    local -A pids=() groups=()
    for name in proxy object container account memcached; do
        if pid=$(live_pid "$name") || pid=$(own_child "$name"); then
            pgid=$(ps -o pgid= -p "$pid" | tr -d ' ' || true)
            pids[$name]=$pid
            if [[ $pgid == "$pid" ]]; then groups[$name]="-$pid"; else groups[$name]=$pid; fi
            kill -TERM -- "${groups[$name]}" 2>/dev/null || true
        fi
        rm -f "$RUN_DIR/$name.pid"
    done
    for i in $(seq 1 100); do
        for name in "${!pids[@]}"; do
            kill -0 "${pids[$name]}" 2>/dev/null || { log "stopped $name (pid ${pids[$name]})"; unset "pids[$name]"; }
        done
        ((${#pids[@]} == 0)) && return 0
        sleep 0.1
    done
    for name in "${!pids[@]}"; do
        log "$name (pid ${pids[$name]}) ignored SIGTERM; sending SIGKILL"
        kill -KILL -- "${groups[$name]}" 2>/dev/null || true
    done
}

ensure_packages() {
    local missing=() bin
    for bin in swift-proxy-server swift-account-server swift-container-server \
               swift-object-server swift-ring-builder memcached; do
        [[ -x /usr/bin/$bin ]] || missing+=("$bin")
    done
    [[ -x $SYSTEM_PYTHON ]] || missing+=("$SYSTEM_PYTHON")
    ((${#missing[@]} == 0)) && return 0
    log "missing ${missing[*]}; installing: ${PACKAGES[*]}"
    local sudo=()
    if [[ $(id -u) != 0 ]]; then
        command -v sudo >/dev/null && sudo -n true 2>/dev/null \
            || die "installing ${PACKAGES[*]} needs root; run: sudo apt-get install -y ${PACKAGES[*]}"
        sudo=(sudo -n)
    fi
    local apt=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 -q)
    "${apt[@]}" update >"$LOG_DIR/apt.log" 2>&1 \
        || { tail -n 20 "$LOG_DIR/apt.log" >&2; die "apt-get update failed (log: $LOG_DIR/apt.log)"; }
    "${apt[@]}" install -y --no-install-recommends "${PACKAGES[@]}" >>"$LOG_DIR/apt.log" 2>&1 \
        || { tail -n 20 "$LOG_DIR/apt.log" >&2; die "apt-get install ${PACKAGES[*]} failed (log: $LOG_DIR/apt.log)"; }
}

# The servers always read /etc/swift/swift.conf (hash prefix/suffix, storage policies).
ensure_swift_conf() {
    local conf=/etc/swift/swift.conf
    if [[ -f $conf ]] && grep -Eq '^[[:space:]]*swift_hash_path_(suffix|prefix)[[:space:]]*=[[:space:]]*[^[:space:]]' "$conf"; then
        return 0
    fi
    log "writing $conf (hash suffix + one storage policy)"
    [[ -w /etc/swift || -w $conf ]] || die "$conf is missing or has no swift_hash_path_suffix, and I cannot write it; run as root"
    [[ -f $conf ]] && cp "$conf" "$conf.before-sqapi"
    cat >"$conf" <<'EOF'
# Written by sqapi's scripts/swift_dev.sh for a development Swift.
[swift-hash]
swift_hash_path_suffix = sqapi-dev-suffix
swift_hash_path_prefix = sqapi-dev-prefix

[storage-policy:0]
name = Policy-0
default = yes
EOF
}

check_xattrs() {
    "$SYSTEM_PYTHON" - "$DEVICES_DIR/d1" <<'PY' || die "$DEVICES_DIR does not support user.* xattrs, which the object server needs; set SQAPI_SWIFT_DIR to a directory on ext4/xfs (or tmpfs on Linux >= 6.6)"
import os, sys, tempfile
with tempfile.NamedTemporaryFile(dir=sys.argv[1]) as f:
    os.setxattr(f.name, "user.sqapi-probe", b"1")
PY
}

render_configs() {
    local name run_user
    run_user=$(id -un)
    for name in "${SERVERS[@]}"; do
        sed -e "s|@STATE_DIR@|$STATE_DIR|g" \
            -e "s|@PROXY_PORT@|$PROXY_PORT|g" \
            -e "s|@OBJECT_PORT@|$OBJECT_PORT|g" \
            -e "s|@CONTAINER_PORT@|$CONTAINER_PORT|g" \
            -e "s|@ACCOUNT_PORT@|$ACCOUNT_PORT|g" \
            -e "s|@MEMCACHED_PORT@|$MEMCACHED_PORT|g" \
            -e "s|@RUN_USER@|$run_user|g" \
            "$TEMPLATE_DIR/$name-server.conf.in" >"$ETC_DIR/$name-server.conf"
    done
}

# One replica, one device (d1), part power 8, built in one Python process (the
# swift-ring-builder CLI costs ~1 s of imports per call).  Rebuilt only when the ports
# changed; the data on d1 stays valid either way.
build_rings() {
    local stamp="$ETC_DIR/rings.stamp" want="account=$ACCOUNT_PORT container=$CONTAINER_PORT object=$OBJECT_PORT"
    if [[ -f $stamp && $(<"$stamp") == "$want" && -s $ETC_DIR/account.ring.gz \
          && -s $ETC_DIR/container.ring.gz && -s $ETC_DIR/object.ring.gz ]]; then
        return 0
    fi
    rm -f "$stamp"
    "${CLEAN_ENV[@]}" "$SYSTEM_PYTHON" - "$ETC_DIR" "$ACCOUNT_PORT" "$CONTAINER_PORT" "$OBJECT_PORT" \
        >>"$LOG_DIR/rings.log" 2>&1 <<'PY' || die "building the rings failed (log: $LOG_DIR/rings.log)"
import os
import sys

from swift.common.ring import RingBuilder

etc_dir = sys.argv[1]
for kind, port in zip(("account", "container", "object"), sys.argv[2:5]):
    builder = RingBuilder(8, 1, 1)  # part power, replicas, min_part_hours
    builder.add_dev({"id": 0, "region": 1, "zone": 1, "ip": "127.0.0.1", "port": int(port),
                     "device": "d1", "weight": 1.0, "meta": ""})
    builder.rebalance()
    for suffix, save in ((".ring.gz", builder.get_ring().save), (".builder", builder.save)):
        tmp = os.path.join(etc_dir, kind + suffix + ".tmp")
        save(tmp)
        os.replace(tmp, os.path.join(etc_dir, kind + suffix))
    print("built %s ring: 127.0.0.1:%s/d1" % (kind, port))
PY
    echo "$want" >"$stamp"
}

start_memcached() {
    if live_pid memcached >/dev/null; then return 0; fi
    if port_open "$MEMCACHED_PORT"; then
        log "memcached port 127.0.0.1:$MEMCACHED_PORT already in use; using that memcached"
        return 0
    fi
    local mc_user
    if id memcache >/dev/null 2>&1; then mc_user=memcache; else mc_user=$(id -un); fi
    local user_opt=()
    [[ $(id -u) == 0 ]] && user_opt=(-u "$mc_user")
    # 9>&-: the daemons must not inherit (and so hold forever) the start lock.
    setsid /usr/bin/memcached -l 127.0.0.1 -p "$MEMCACHED_PORT" -U 0 -m 64 "${user_opt[@]}" \
        </dev/null >>"$LOG_DIR/memcached.log" 2>&1 9>&- &
    local pid=$! i status=""
    echo "$pid" >"$RUN_DIR/memcached.pid"
    # Watch the pid itself, not live_pid: until the child has exec'd setsid and then
    # memcached, its command line is still this script's, and live_pid would call a
    # memcached that is still starting dead.
    for i in $(seq 1 100); do
        port_open "$MEMCACHED_PORT" && return 0
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    tail -n 20 "$LOG_DIR/memcached.log" >&2 || true
    if ! kill -0 "$pid" 2>/dev/null; then
        wait "$pid" 2>/dev/null && status=" (it exited with status 0)" || status=" (it exited with status $?)"
    fi
    die "memcached did not start$status on 127.0.0.1:$MEMCACHED_PORT (log: $LOG_DIR/memcached.log)"
}

start_server() {
    local name=$1
    # -v: also log to stdout, i.e. into the log file (there is no syslog here).
    setsid "${CLEAN_ENV[@]}" "$SYSTEM_PYTHON" "/usr/bin/swift-$name-server" "$ETC_DIR/$name-server.conf" -v \
        </dev/null >>"$LOG_DIR/$name.log" 2>&1 9>&- &
    echo $! >"$RUN_DIR/$name.pid"
}

# The server started by start_server is still running (whatever its command line says yet).
started_alive() {
    local pid
    pid=$(recorded_pid "$1") && kill -0 "$pid" 2>/dev/null
}

print_info() {
    cat <<EOF
Swift is up on 127.0.0.1 (state dir $STATE_DIR).
  auth URL: $AUTH_URL   (auth_version 1, tempauth)
  user:     $AUTH_USER
  key:      $AUTH_KEY
  for the swift CLI: export ST_AUTH=$AUTH_URL ST_USER=$AUTH_USER ST_KEY=$AUTH_KEY
EOF
}

cmd_start() {
    if is_up; then
        log "already running"
        print_info
        return 0
    fi
    mkdir -p "$STATE_DIR" "$ETC_DIR" "$DEVICES_DIR/d1" "$LOG_DIR" "$RUN_DIR"
    exec 9>"$STATE_DIR/lock"
    flock -w 300 9 || die "another swift_dev.sh start has held $STATE_DIR/lock for 300s"
    # Another start may have finished while we waited for the lock.
    if is_up; then
        log "already running"
        print_info
        return 0
    fi
    local started=$SECONDS
    ensure_packages
    stop_all
    local name port
    for name in "${SERVERS[@]}"; do
        port=$(server_port "$name")
        if port_open "$port"; then
            die "127.0.0.1:$port (for the $name server) is taken by another process: $(ss -ltnpH "sport = :$port" 2>/dev/null | head -n 1). Stop it or set SQAPI_SWIFT_${name^^}_PORT."
        fi
    done
    ensure_swift_conf
    check_xattrs
    render_configs
    build_rings
    start_memcached
    for name in "${SERVERS[@]}"; do
        start_server "$name"
    done
    local deadline=$((SECONDS + WAIT_SECONDS)) reason=""
    while :; do
        if reason=$(probe full 2>&1); then break; fi
        for name in "${SERVERS[@]}"; do
            if ! started_alive "$name"; then
                reason="the $name server exited"
                break 2
            fi
        done
        if ((SECONDS >= deadline)); then break; fi
        sleep 0.5
    done
    if [[ -n $reason ]] && ! probe full >/dev/null 2>&1; then
        for name in "${SERVERS[@]}" memcached; do
            [[ -s $LOG_DIR/$name.log ]] || continue
            printf -- '--- last lines of %s ---\n' "$LOG_DIR/$name.log" >&2
            tail -n 15 "$LOG_DIR/$name.log" >&2
        done
        stop_all
        die "Swift did not come up within ${WAIT_SECONDS}s: $reason"
    fi
    log "started in $((SECONDS - started))s"
    print_info
}

cmd_stop() {
    stop_all
    log "stopped"
}

cmd_status() {
    local reason
    if reason=$(probe light 2>&1) && ours_alive; then
        print_info
        return 0
    fi
    [[ -n $reason ]] || reason="one of the servers started from $STATE_DIR has exited"
    log "Swift is not up at $AUTH_URL: $reason"
    return 1
}

case ${1:-} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    restart) cmd_stop; cmd_start ;;
    *) echo "usage: $0 start|stop|status|restart" >&2; exit 2 ;;
esac
