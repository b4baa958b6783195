#!/usr/bin/env bash
# Start the SuperLink (on the server machine) in the background.
#
#   deploy/superlink.sh [--host 0.0.0.0] [--port 9093] [--database FILE] [--insecure]
#
# Flower 1.42 serves every API (Fleet for SuperNodes, Control for `flwr`, the ServerApp
# runtime) over ONE HTTPS port: open --port (TCP) to the SuperNodes and the operator, nothing
# else. Default: TLS with certs/server.pem + server.key + ca.crt and SuperNode authentication
# (only SuperNodes whose public key was registered with deploy/register.sh may join).
# --insecure: plain HTTP, no SuperNode authentication (Flower requires TLS for it); for
# debugging on a trusted network only. Runtime dependency installation is always disabled:
# the ServerApp runs in this machine's environment.
# Waits until the port accepts connections; PID in pids/superlink.pid, log in logs/superlink.log.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

host=0.0.0.0
port=9093
insecure=0
database=""
while [[ $# -gt 0 ]]; do
    case "$1" in
    --host) host="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --database) database="$2"; shift 2 ;;
    --insecure) insecure=1; shift ;;
    -h | --help) sed -n '2,14p' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
    esac
done
need flower-superlink

args=(--host "$host" --port "$port" --disable-runtime-dependency-installation)
if [[ -n "$database" ]]; then
    args+=(--database "$database") # survives restarts (registered nodes, runs); default: memory
fi
if [[ $insecure == 1 ]]; then
    args+=(--insecure)
else
    for f in ca.crt server.pem server.key; do
        [[ -f "$CERT_DIR/$f" ]] || die "$CERT_DIR/$f missing; run deploy/make-certs.sh first"
    done
    args+=(--ssl-ca-certfile "$CERT_DIR/ca.crt" --ssl-certfile "$CERT_DIR/server.pem"
        --ssl-keyfile "$CERT_DIR/server.key" --enable-supernode-auth)
fi

# Relative output-dir values of a run resolve against the ServerApp's working directory,
# which is this one: start from the repository root so "runs" means <repo>/runs.
cd "$REPO_ROOT"
start_bg superlink flower-superlink "${args[@]}"
probe="$host"
[[ "$probe" == 0.0.0.0 ]] && probe=127.0.0.1
if ! wait_port "$probe" "$port" "${FEDTUNE_START_TIMEOUT:-60}" "$PID_DIR/superlink.pid"; then
    tail -n 20 "$LOG_DIR/superlink.log" >&2 || true
    die "SuperLink did not come up on $host:$port (log above)"
fi
note "SuperLink listening on $host:$port ($([[ $insecure == 1 ]] && echo 'INSECURE HTTP' || echo 'TLS + SuperNode auth'))"
