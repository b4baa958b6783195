#!/usr/bin/env bash
# Start SuperNode N (on a client machine) in the background.
#
#   deploy/supernode.sh --partition N --num-partitions M --superlink HOST:PORT
#       [--key keys/supernode-N] [--insecure] [--gpu INDEX] [--device cuda|cpu|auto]
#       [--data-path FILE] [--runtime-port 9094+N] [--name supernode-N] [--max-retries R]
#
# The node tells the ClientApp which data partition it holds through --node-config
# ("partition-id=N num-partitions=M", plus device= / data-path= when given). It connects OUT
# to the SuperLink only: client machines need no open inbound port. Its local runtime API
# (where its ClientApp processes fetch work) listens on 127.0.0.1:--runtime-port; several
# SuperNodes on one machine need different ports (the default 9094+N does that).
# --gpu I sets CUDA_VISIBLE_DEVICES=I for this node and everything it starts (one GPU per
# node); the ClientApp then sees that GPU as cuda:0.
# Default: TLS (verifies the SuperLink with certs/ca.crt) and authentication with the private
# key keys/supernode-N, whose public half must be registered (deploy/register.sh).
# Returns once the SuperLink has accepted the node (fails if the node exits first, e.g. for an
# unregistered key; returns with a note if it is still retrying after $FEDTUNE_START_TIMEOUT
# seconds, default 60). PID in pids/<name>.pid, log in logs/<name>.log.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

partition=""
num_partitions=""
superlink=""
key=""
insecure=0
gpu=""
device=""
data_path=""
runtime_port=""
name=""
max_retries=""
while [[ $# -gt 0 ]]; do
    case "$1" in
    --partition) partition="$2"; shift 2 ;;
    --num-partitions) num_partitions="$2"; shift 2 ;;
    --superlink) superlink="$2"; shift 2 ;;
    --key) key="$2"; shift 2 ;;
    --insecure) insecure=1; shift ;;
    --gpu) gpu="$2"; shift 2 ;;
    --device) device="$2"; shift 2 ;;
    --data-path) data_path="$2"; shift 2 ;;
    --runtime-port) runtime_port="$2"; shift 2 ;;
    --name) name="$2"; shift 2 ;;
    --max-retries) max_retries="$2"; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
    esac
done
[[ "$partition" =~ ^[0-9]+$ ]] || die "--partition N (a number) is required"
[[ "$num_partitions" =~ ^[0-9]+$ ]] || die "--num-partitions M (a number) is required"
((partition < num_partitions)) || die "--partition $partition must be below --num-partitions $num_partitions"
[[ -n "$superlink" ]] || die "--superlink HOST:PORT is required"
need flower-supernode
name="${name:-supernode-$partition}"
runtime_port="${runtime_port:-$((9094 + partition))}"

node_config="partition-id=$partition num-partitions=$num_partitions"
[[ -n "$device" ]] && node_config+=" device=\"$device\""
if [[ -n "$data_path" ]]; then
    [[ -f "$data_path" ]] || die "--data-path $data_path does not exist on this machine"
    node_config+=" data-path=\"$(cd "$(dirname "$data_path")" && pwd)/$(basename "$data_path")\""
fi

args=(--superlink "$superlink" --node-config "$node_config" --port "$runtime_port")
[[ -n "$max_retries" ]] && args+=(--max-retries "$max_retries")
if [[ $insecure == 1 ]]; then
    args+=(--insecure)
else
    key="${key:-$KEY_DIR/supernode-$partition}"
    [[ -f "$key" ]] || die "private key $key missing (deploy/make-certs.sh --supernodes M makes them)"
    [[ -f "$CERT_DIR/ca.crt" ]] || die "$CERT_DIR/ca.crt missing (copy it from the machine that ran make-certs.sh)"
    args+=(--root-certificates "$CERT_DIR/ca.crt" --auth-supernode-private-key "$key")
fi
[[ -n "$gpu" ]] && export CUDA_VISIBLE_DEVICES="$gpu"

cd "$REPO_ROOT"
start_bg "$name" flower-supernode "${args[@]}"
note "$name: node config '$node_config'${gpu:+, CUDA_VISIBLE_DEVICES=$gpu}"

# Wait until the SuperLink has accepted the node (its log then names its node id), so that a
# refused key or a TLS problem shows up here and not at the first round.
limit="${FEDTUNE_START_TIMEOUT:-60}"
log="$LOG_DIR/$name.log"
for ((t = 0; t < limit * 2; t++)); do
    if grep -q "SuperNode ID:" "$log"; then
        note "$name joined the SuperLink ($(grep -m1 -o 'SuperNode ID: [0-9]*' "$log"))"
        exit 0
    fi
    if ! kill -0 "$(cat "$PID_DIR/$name.pid")" 2>/dev/null; then
        grep -v '^\s*$' "$log" | tail -n 25 >&2 || true
        rm -f "$PID_DIR/$name.pid"
        die "$name exited without joining the SuperLink (log above)"
    fi
    sleep 0.5
done
note "$name has not joined after ${limit}s; it keeps retrying (is the SuperLink up?). Log: $log"
