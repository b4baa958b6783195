#!/usr/bin/env bash
# Start the SuperLink (on the server machine) in the background.
#
#   deploy/superlink.sh [--host 0.0.0.0] [--port 9093] [--database FILE] [--insecure]
#                       [--simulation [--ray-address HOST:PORT]]
#
# Flower 1.42 serves every API (Fleet for SuperNodes, Control for `flwr`, the ServerApp
# runtime) over ONE HTTPS port: open --port (TCP) to the SuperNodes and the operator, nothing
# else. Default: TLS with certs/server.pem + server.key + ca.crt and SuperNode authentication
# (only SuperNodes whose public key was registered with deploy/register.sh may join).
# --insecure: plain HTTP, no SuperNode authentication (Flower requires TLS for it); for
# debugging on a trusted network only. Runtime dependency installation is always disabled:
# the ServerApp runs in this machine's environment.
# --simulation: a SuperLink that runs simulations (virtual SuperNodes in Ray) instead of
# waiting for real SuperNodes; with --ray-address it attaches Ray to an existing cluster
# (`ray start --head` here, `ray start --address ...` on the other machines) through the
# RAY_ADDRESS variable, which ray.init() reads. Size the federation per run with
# deploy/run.sh --federation-config "num-supernodes=N client-resources-num-gpus=1.0".
# Waits until the port accepts connections; PID in pids/superlink.pid, log in logs/superlink.log.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

host=0.0.0.0
port=9093
insecure=0
database=""
simulation=0
ray_address=""
while [[ $# -gt 0 ]]; do
    case "$1" in
    --host) host="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --database) database="$2"; shift 2 ;;
    --insecure) insecure=1; shift ;;
    --simulation) simulation=1; shift ;;
    --ray-address) ray_address="$2"; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
    esac
done
need flower-superlink
[[ -z "$ray_address" || $simulation == 1 ]] || die "--ray-address needs --simulation"

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
        --ssl-keyfile "$CERT_DIR/server.key")
    # no real SuperNodes connect to a simulation SuperLink: nothing to authenticate
    [[ $simulation == 1 ]] || args+=(--enable-supernode-auth)
fi
if [[ $simulation == 1 ]]; then
    args+=(--simulation)
    if [[ -n "$ray_address" ]]; then
        # Flower's Ray backend calls ray.init() without an address (and passes no num-cpus /
        # num-gpus unless the federation config sets init-args-*, which an existing cluster
        # refuses), so ray.init() joins the cluster named by RAY_ADDRESS.
        export RAY_ADDRESS="$ray_address"
    fi
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
mode="TLS + SuperNode auth"
[[ $simulation == 1 ]] && mode="TLS, simulation${ray_address:+ on Ray cluster $ray_address}"
[[ $insecure == 1 ]] && mode="INSECURE HTTP"
[[ $insecure == 1 && $simulation == 1 ]] && mode="INSECURE HTTP, simulation${ray_address:+ on Ray cluster $ray_address}"
note "SuperLink listening on $host:$port ($mode)"
