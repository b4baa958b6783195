#!/usr/bin/env bash
# Point the `flwr` CLI (on the operator's machine) at a SuperLink.
#
#   deploy/connect.sh --superlink HOST:PORT [--name fedtune] [--insecure]
#
# Writes home/cli/config.toml (FLWR_HOME for the CLI; ~/.flwr is not touched) with a
# [superlink.<name>] connection that trusts certs/ca.crt (or `insecure = true`).
# deploy/register.sh and deploy/run.sh use it. To use `flwr` by hand afterwards:
#   FLWR_HOME=runs/deploy/home/cli flwr list fedtune
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

superlink=""
name=fedtune
insecure=0
while [[ $# -gt 0 ]]; do
    case "$1" in
    --superlink) superlink="$2"; shift 2 ;;
    --name) name="$2"; shift 2 ;;
    --insecure) insecure=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
    esac
done
[[ -n "$superlink" ]] || die "--superlink HOST:PORT is required"
[[ "$name" =~ ^[A-Za-z0-9_-]+$ ]] || die "--name must be letters, digits, '-' or '_', got '$name'"
if [[ $insecure == 1 ]]; then
    write_connection "$name" "$superlink" insecure
else
    [[ -f "$CERT_DIR/ca.crt" ]] || die "$CERT_DIR/ca.crt missing (copy it from the machine that ran make-certs.sh)"
    write_connection "$name" "$superlink" "$CERT_DIR/ca.crt"
fi
