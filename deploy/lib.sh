# Shared helpers for the deploy/ scripts. Source it; do not run it.
#
# Every script keeps its state in one run folder, FEDTUNE_DEPLOY_DIR (default: runs/deploy
# in the repository, which git ignores):
#   certs/   ca.crt (give to every machine), ca.key (keep safe), server.pem + server.key (SuperLink)
#   keys/    supernode-N (private: only SuperNode N's machine) + supernode-N.pub (operator)
#   pids/    one file per process started here: <name>.pid
#   logs/    one log per process
#   home/    a FLWR_HOME per process (Flower's state, installed app bundles, CLI config.toml);
#            ~/.flwr is never touched

DEPLOY_SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$DEPLOY_SRC/.." && pwd)"
DEPLOY_DIR="${FEDTUNE_DEPLOY_DIR:-$REPO_ROOT/runs/deploy}"
mkdir -p "$DEPLOY_DIR"
DEPLOY_DIR="$(cd "$DEPLOY_DIR" && pwd)"
CERT_DIR="$DEPLOY_DIR/certs"
KEY_DIR="$DEPLOY_DIR/keys"
PID_DIR="$DEPLOY_DIR/pids"
LOG_DIR="$DEPLOY_DIR/logs"
HOME_DIR="$DEPLOY_DIR/home"

# Use the project's virtual environment when it exists and none is active.
if [[ -z "${VIRTUAL_ENV:-}" && -x "$REPO_ROOT/.venv/bin/flwr" ]]; then
    export PATH="$REPO_ROOT/.venv/bin:$PATH"
fi
# The machines already hold the environment; never let Flower `uv sync` one per run (torch!).
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_DISABLE_UPDATE_CHECK=1
export PYTHONUNBUFFERED=1

die() {
    echo "fedtune-deploy: error: $*" >&2
    exit 2
}

note() {
    echo "fedtune-deploy: $*" >&2
}

need() {
    command -v "$1" >/dev/null 2>&1 || die "'$1' not found on PATH (activate the fedtune venv?)"
}

# start_bg NAME CMD...: run CMD in its own session (so it and its children form one process
# group), with FLWR_HOME=home/NAME, output in logs/NAME.log, PID in pids/NAME.pid.
start_bg() {
    local name="$1"
    shift
    mkdir -p "$PID_DIR" "$LOG_DIR" "$HOME_DIR/$name"
    if [[ -f "$PID_DIR/$name.pid" ]] && kill -0 "$(cat "$PID_DIR/$name.pid")" 2>/dev/null; then
        die "$name is already running (PID $(cat "$PID_DIR/$name.pid")); run deploy/stop.sh first"
    fi
    FLWR_HOME="$HOME_DIR/$name" setsid "$@" >"$LOG_DIR/$name.log" 2>&1 </dev/null &
    echo $! >"$PID_DIR/$name.pid"
    note "started $name (PID $!, log $LOG_DIR/$name.log)"
}

# wait_port HOST PORT SECONDS PIDFILE: until something accepts TCP connections there.
wait_port() {
    local host="$1" port="$2" limit="$3" pidfile="$4" i
    for ((i = 0; i < limit * 4; i++)); do
        if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
            return 1
        fi
        if (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then
            return 0
        fi
        sleep 0.25
    done
    return 1
}

# write_connection NAME ADDRESS (insecure | ROOT_CERT): the CLI's FLWR_HOME/config.toml.
write_connection() {
    local name="$1" address="$2" trust="$3" home="$HOME_DIR/cli"
    mkdir -p "$home"
    {
        echo "[superlink]"
        echo "default = \"$name\""
        echo
        echo "[superlink.$name]"
        echo "address = \"$address\""
        if [[ "$trust" == insecure ]]; then
            echo "insecure = true"
        else
            echo "root-certificates = \"$(cd "$(dirname "$trust")" && pwd)/$(basename "$trust")\""
        fi
    } >"$home/config.toml"
    note "CLI connection '$name' -> $address written to $home/config.toml"
}

cli_home() {
    echo "$HOME_DIR/cli"
}

# usage: print the comment block at the top of the calling script.
usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}
