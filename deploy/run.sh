#!/usr/bin/env bash
# Submit a fedtune run to the SuperLink and follow its log (operator's machine).
#
#   deploy/run.sh [--name fedtune] [--app DIR] [--detach] [-c "k=v ..." | -c FILE.toml]...
#                 [--federation-config "num-supernodes=N ..."]   (simulation SuperLinks only)
#
# = `flwr run <app> <name> --stream --run-config ...` with the CLI connection written by
# connect.sh. The app (default: this repository) is packed into a bundle and sent to the
# SuperLink, which starts the ServerApp; every SuperNode runs the ClientApp from the same
# bundle in ITS OWN Python environment (fedtune, torch, ... must be installed there).
# Paths in the run config are read on the machine that uses them: output-dir on the SuperLink
# machine (relative = under the repository there), data-path on every machine unless a
# SuperNode overrides it in its node config.
# --detach: print the run id and return without following the log (`flwr log RUN_ID
# <name> --stream` follows it later; `flwr list <name>` shows the status).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

name=fedtune
app="$REPO_ROOT"
detach=0
overrides=()
while [[ $# -gt 0 ]]; do
    case "$1" in
    --name) name="$2"; shift 2 ;;
    --app) app="$2"; shift 2 ;;
    --detach) detach=1; shift ;;
    -c | --run-config) overrides+=(--run-config "$2"); shift 2 ;;
    --federation-config) overrides+=(--federation-config "$2"); shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
    esac
done
need flwr
home="$(cli_home)"
[[ -f "$home/config.toml" ]] || die "no CLI connection; run deploy/connect.sh first"
if [[ $detach == 1 ]]; then
    FLWR_HOME="$home" flwr run "$app" "$name" "${overrides[@]+"${overrides[@]}"}" --format json
else
    FLWR_HOME="$home" flwr run "$app" "$name" "${overrides[@]+"${overrides[@]}"}" --stream
fi
