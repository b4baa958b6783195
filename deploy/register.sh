#!/usr/bin/env bash
# Register SuperNode public keys with the SuperLink (operator's machine, after connect.sh).
#
#   deploy/register.sh [PUBLIC_KEY ...]        default: every keys/supernode-*.pub
#
# Only registered keys can join a SuperLink started with SuperNode authentication. Register
# a key before its SuperNode starts. With an in-memory SuperLink database (the default),
# registrations are lost when the SuperLink restarts: register again, or start it with
# --database FILE. Prints Flower's answer (the node id) for each key.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[[ "${1:-}" == -h || "${1:-}" == --help ]] && { usage; exit 0; }
need flwr
home="$(cli_home)"
[[ -f "$home/config.toml" ]] || die "no CLI connection; run deploy/connect.sh first"
keys=("$@")
if [[ ${#keys[@]} -eq 0 ]]; then
    shopt -s nullglob
    keys=("$KEY_DIR"/supernode-*.pub)
    shopt -u nullglob
fi
[[ ${#keys[@]} -gt 0 ]] || die "no public keys given and none in $KEY_DIR"
for k in "${keys[@]}"; do
    [[ -f "$k" ]] || die "public key $k does not exist"
    name="$(basename "$k" .pub)"
    FLWR_HOME="$home" flwr supernode register "$k" --name "$name"
done
