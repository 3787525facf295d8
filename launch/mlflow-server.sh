#!/usr/bin/env bash
# An MLflow tracking server that the runs of a cluster share (each rank-0 process logs to it
# through MLFLOW_TRACKING_URI). Runs are kept in a SQLite file, artifacts are uploaded through
# the server (--serve-artifacts), so the training nodes need no shared file system for them.
#
#   bash launch/mlflow-server.sh start [options]   # background, pid file, waits for /health
#   bash launch/mlflow-server.sh status [options]
#   bash launch/mlflow-server.sh stop [options]
#   bash launch/mlflow-server.sh run [options]     # foreground (Ctrl-C stops it)
#
# Options (environment variable in brackets, then the default):
#   --host H                  [DISTALEX_MLFLOW_HOST] 127.0.0.1; 0.0.0.0 to serve other nodes
#   --port P                  [DISTALEX_MLFLOW_PORT] 5000
#   --dir D                   [DISTALEX_MLFLOW_DIR] <repo>/runs/mlflow-server: database,
#                             artifacts, log and pid file
#   --backend-store-uri U     [DISTALEX_MLFLOW_BACKEND] sqlite:///D/mlflow.db
#   --artifacts-destination U [DISTALEX_MLFLOW_ARTIFACTS] D/artifacts (served by the server)
#   --no-serve-artifacts      clients write artifacts straight to --artifacts-destination
#                             (then it must be on a file system that every node shares)
#   --allowed-hosts LIST      [DISTALEX_MLFLOW_ALLOWED_HOSTS] Host headers the server accepts.
#                             The server rejects any Host header but localhost and private IPs;
#                             when --host is not a loopback address this defaults to those plus
#                             this machine's names.
#   --workers N               [DISTALEX_MLFLOW_WORKERS] 1
#   --timeout S               [DISTALEX_MLFLOW_TIMEOUT] 120 seconds for start to see /health
# PYTHON selects the interpreter whose mlflow runs (default python3). MLflow's job runner (huey
# workers for its GenAI features; seven more processes) is off unless
# MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true: tracking runs does not use it.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
HOST=${DISTALEX_MLFLOW_HOST:-127.0.0.1}
PORT=${DISTALEX_MLFLOW_PORT:-5000}
DIR=${DISTALEX_MLFLOW_DIR:-$REPO/runs/mlflow-server}
BACKEND=${DISTALEX_MLFLOW_BACKEND:-}
ARTIFACTS=${DISTALEX_MLFLOW_ARTIFACTS:-}
ALLOWED_HOSTS=${DISTALEX_MLFLOW_ALLOWED_HOSTS:-}
WORKERS=${DISTALEX_MLFLOW_WORKERS:-1}
TIMEOUT=${DISTALEX_MLFLOW_TIMEOUT:-120}
SERVE_ARTIFACTS=1
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}

say() { echo "[mlflow-server] $*"; }
die() { echo "[mlflow-server] error: $*" >&2; exit 1; }

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

CMD=${1:-}
[[ -n $CMD ]] && shift
case $CMD in -h | --help | help) usage; exit 0 ;; esac
while (($#)); do
    case $1 in
        --host) HOST=$2; shift 2 ;;
        --port) PORT=$2; shift 2 ;;
        --dir) DIR=$2; shift 2 ;;
        --backend-store-uri) BACKEND=$2; shift 2 ;;
        --artifacts-destination) ARTIFACTS=$2; shift 2 ;;
        --no-serve-artifacts) SERVE_ARTIFACTS=0; shift ;;
        --allowed-hosts) ALLOWED_HOSTS=$2; shift 2 ;;
        --workers) WORKERS=$2; shift 2 ;;
        --timeout) TIMEOUT=$2; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
BACKEND=${BACKEND:-sqlite:///$DIR/mlflow.db}
ARTIFACTS=${ARTIFACTS:-$DIR/artifacts}
PID_FILE=$DIR/server-$PORT.pid
LOG_FILE=$DIR/server-$PORT.log

is_loopback() { [[ $1 == 127.* || $1 == localhost || $1 == ::1 ]]; }

# The address other processes use: a wildcard bind is reached through this machine's name.
client_host() {
    case $HOST in
        0.0.0.0 | ::) hostname -f 2>/dev/null || hostname ;;
        *) echo "$HOST" ;;
    esac
}

server_args() {
    local args=(--host "$HOST" --port "$PORT" --workers "$WORKERS" --backend-store-uri "$BACKEND")
    if ((SERVE_ARTIFACTS)); then
        args+=(--serve-artifacts --artifacts-destination "$ARTIFACTS")
    else
        args+=(--no-serve-artifacts --default-artifact-root "$ARTIFACTS")
    fi
    if [[ -z $ALLOWED_HOSTS ]] && ! is_loopback "$HOST"; then
        local names=(localhost 127.0.0.1 "$(hostname -s)" "$(hostname -f 2>/dev/null || hostname)")
        [[ $HOST == 0.0.0.0 || $HOST == :: ]] || names+=("$HOST")
        local n list=","
        for n in "${names[@]}"; do
            [[ $list == *",$n,"* ]] || list+="$n,$n:*,"
        done
        list=${list#,}
        ALLOWED_HOSTS="${list}10.*,192.168.*"
    fi
    [[ -z $ALLOWED_HOSTS ]] || args+=(--allowed-hosts "$ALLOWED_HOSTS")
    printf '%s\n' "${args[@]}"
}

healthy() {
    "$PYTHON" - "$(client_host)" "$PORT" <<'EOF' 2>/dev/null
import sys, urllib.request
host, port = sys.argv[1], sys.argv[2]
host = f"[{host}]" if ":" in host else host
with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=2) as r:
    sys.exit(0 if r.status == 200 else 1)
EOF
}

live_pid() {
    local pid
    [[ -s $PID_FILE ]] || return 1
    pid=$(<"$PID_FILE")
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

print_uri() {
    say "export MLFLOW_TRACKING_URI=http://$(client_host):$PORT"
}

cmd_start() {
    local pid
    if pid=$(live_pid); then
        healthy || die "pid $pid from $PID_FILE is alive but http://$(client_host):$PORT/health does not answer"
        say "already running (pid $pid) on $HOST:$PORT"
        print_uri
        return
    fi
    if healthy; then
        die "something else already answers on $(client_host):$PORT; pick another --port"
    fi
    local args
    mapfile -t args < <(server_args)
    say "starting: $PYTHON -m mlflow server ${args[*]}"
    say "backend $BACKEND, artifacts $ARTIFACTS, log $LOG_FILE"
    # Own session: stop kills the server and its uvicorn workers as one process group, and the
    # server holds none of the caller's pipes.
    setsid "$PYTHON" -m mlflow server "${args[@]}" </dev/null >>"$LOG_FILE" 2>&1 &
    pid=$!
    echo "$pid" >"$PID_FILE"
    local deadline=$((SECONDS + TIMEOUT))
    say "waiting up to ${TIMEOUT}s for http://$(client_host):$PORT/health"
    until healthy; do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 30 "$LOG_FILE" >&2
            rm -f "$PID_FILE"
            die "server exited before answering"
        fi
        if ((SECONDS >= deadline)); then
            tail -n 30 "$LOG_FILE" >&2
            stop_group "$pid"
            die "no answer on /health after ${TIMEOUT}s"
        fi
        sleep 0.5
    done
    say "up (pid $pid)"
    print_uri
}

stop_group() {
    local pid=$1 pgid i
    pgid=$(ps -o pgid= -p "$pid" | tr -d ' ')
    # Only signal the group when the server leads it (it was started with setsid).
    if [[ $pgid == "$pid" ]]; then
        say "stopping process group $pgid (server and workers)"
        kill -TERM -- "-$pgid" 2>/dev/null || true
    else
        say "stopping pid $pid"
        kill -TERM "$pid" 2>/dev/null || true
    fi
    for i in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        say "still alive after 10 s; sending SIGKILL"
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
    # uvicorn workers may outlive the parent for a moment.
    for i in $(seq 50); do
        pgrep -g "$pid" >/dev/null 2>&1 || break
        sleep 0.1
    done
    rm -f "$PID_FILE"
}

cmd_stop() {
    local pid
    if pid=$(live_pid); then
        stop_group "$pid"
        say "stopped"
    else
        rm -f "$PID_FILE"
        say "not running (no live pid in $PID_FILE)"
    fi
}

cmd_status() {
    local pid
    if pid=$(live_pid) && healthy; then
        say "running (pid $pid) on $HOST:$PORT, backend $BACKEND"
        print_uri
    else
        say "not running on $HOST:$PORT"
        return 1
    fi
}

case $CMD in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    run)
        mapfile -t args < <(server_args)
        say "running in the foreground: $PYTHON -m mlflow server ${args[*]}"
        print_uri
        exec "$PYTHON" -m mlflow server "${args[@]}"
        ;;
    *)
        usage >&2
        exit 2
        ;;
esac
