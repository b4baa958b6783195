#!/usr/bin/env bash
# Stop processes that the deploy scripts started on THIS machine, by the PIDs they recorded.
#
#   deploy/stop.sh [NAME ...]          default: every pids/*.pid (SuperNodes first, then SuperLink)
#
# Each recorded process gets SIGTERM together with its process group and every process
# below it (SuperExec, ServerApp / ClientApp processes), then SIGKILL after 10 s if any is
# still there. Nothing else is touched.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[[ "${1:-}" == -h || "${1:-}" == --help ]] && { usage; exit 0; }
names=("$@")
if [[ ${#names[@]} -eq 0 ]]; then
    shopt -s nullglob
    for f in "$PID_DIR"/*.pid; do
        n="$(basename "$f" .pid)"
        [[ "$n" == superlink ]] || names+=("$n")
    done
    [[ -f "$PID_DIR/superlink.pid" ]] && names+=(superlink)
    shopt -u nullglob
fi
[[ ${#names[@]} -gt 0 ]] || { note "nothing to stop (no PID files in $PID_DIR)"; exit 0; }

# descendants PID: every process below PID. Flower starts its SuperExec in a NEW session
# (start_new_session=True), so the process group of PID does not cover it and its
# ServerApp / ClientApp children: they are found through their parent PIDs instead.
descendants() {
    local table kids k
    table="$(ps -e -o pid=,ppid=)"
    kids=("$1")
    local all=()
    while [[ ${#kids[@]} -gt 0 ]]; do
        local next=()
        for k in "${kids[@]}"; do
            while read -r c; do
                [[ -n "$c" ]] && next+=("$c") && all+=("$c")
            done < <(awk -v p="$k" '$2 == p {print $1}' <<<"$table")
        done
        kids=("${next[@]+"${next[@]}"}")
    done
    echo "${all[@]+"${all[@]}"}"
}

targets=()
for n in "${names[@]}"; do
    f="$PID_DIR/$n.pid"
    [[ -f "$f" ]] || { note "no PID file for $n"; continue; }
    pid="$(cat "$f")"
    rm -f "$f"
    [[ "$pid" =~ ^[0-9]+$ ]] || { note "bad PID file $f"; continue; }
    if ! kill -0 "$pid" 2>/dev/null; then
        note "$n (PID $pid) was not running"
        continue
    fi
    # a PID file left from long ago may name a PID that now belongs to something else
    if ! ps -o args= -p "$pid" | grep -q -E 'flower-super(link|node)'; then
        note "PID $pid of $n is no longer a Flower process; not touching it"
        continue
    fi
    # shellcheck disable=SC2207
    below=($(descendants "$pid"))
    note "stopping $n (PID $pid${below[0]:+ and its children ${below[*]}})"
    # the recorded PID leads its own process group (setsid in start_bg)
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for c in "${below[@]+"${below[@]}"}"; do
        kill -TERM "$c" 2>/dev/null || true
    done
    targets+=("$pid" "${below[@]+"${below[@]}"}")
done
for ((i = 0; i < 40; i++)); do
    left=()
    for pid in "${targets[@]+"${targets[@]}"}"; do
        kill -0 "$pid" 2>/dev/null && left+=("$pid")
    done
    [[ ${#left[@]} -eq 0 ]] && exit 0
    sleep 0.25
done
note "still running after SIGTERM: ${left[*]}; sending SIGKILL"
for pid in "${left[@]}"; do
    kill -KILL "$pid" 2>/dev/null || true
done
