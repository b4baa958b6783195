#!/usr/bin/env bash
# Create a private CA, the SuperLink's TLS certificate, and one EC key pair per SuperNode.
#
#   deploy/make-certs.sh [--host NAME_OR_IP]... [--supernodes N] [--days D] [--force]
#
# The server certificate is valid for localhost, 127.0.0.1, ::1 and every --host given (the
# name or address the SuperNodes and the operator use to reach the SuperLink). Output (in
# $FEDTUNE_DEPLOY_DIR, default runs/deploy):
#   certs/ca.crt                 -> every machine (SuperNodes and the operator verify with it)
#   certs/ca.key                 -> nobody; keep it offline (it signs new server certificates)
#   certs/server.pem, server.key -> the SuperLink machine only
#   keys/supernode-N             -> SuperNode N's machine only (its identity)
#   keys/supernode-N.pub         -> the operator, who registers it with `flwr supernode register`
# Existing files are kept (so adding SuperNodes later does not invalidate anything) unless
# --force is given.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

hosts=()
supernodes=0
days=825
force=0
while [[ $# -gt 0 ]]; do
    case "$1" in
    --host) hosts+=("$2"); shift 2 ;;
    --supernodes) supernodes="$2"; shift 2 ;;
    --days) days="$2"; shift 2 ;;
    --force) force=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
    esac
done
[[ "$supernodes" =~ ^[0-9]+$ ]] || die "--supernodes must be a number, got '$supernodes'"
need openssl
mkdir -p "$CERT_DIR" "$KEY_DIR"
chmod 700 "$KEY_DIR"

if [[ $force == 1 || ! -f "$CERT_DIR/ca.crt" ]]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -sha256 -days "$days" \
        -subj "/CN=fedtune deployment CA" \
        -keyout "$CERT_DIR/ca.key" -out "$CERT_DIR/ca.crt" 2>/dev/null
    chmod 600 "$CERT_DIR/ca.key"
    note "CA written: $CERT_DIR/ca.crt"
    new_ca=1 # a new CA invalidates the old server certificate
fi

if [[ $force == 1 || ${new_ca:-0} == 1 || ! -f "$CERT_DIR/server.pem" ]]; then
    san="DNS:localhost,IP:127.0.0.1,IP:::1"
    for h in "${hosts[@]+"${hosts[@]}"}"; do
        if [[ "$h" =~ ^[0-9.]+$ || "$h" == *:* ]]; then
            san="$san,IP:$h"
        else
            san="$san,DNS:$h"
        fi
    done
    cn="${hosts[0]:-localhost}"
    ext="$(mktemp)"
    trap 'rm -f "$ext"' EXIT
    printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n' \
        "$san" >"$ext"
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -sha256 -subj "/CN=$cn" \
        -keyout "$CERT_DIR/server.key" -out "$CERT_DIR/server.csr" 2>/dev/null
    openssl x509 -req -in "$CERT_DIR/server.csr" -CA "$CERT_DIR/ca.crt" -CAkey "$CERT_DIR/ca.key" \
        -CAcreateserial -days "$days" -sha256 -extfile "$ext" -out "$CERT_DIR/server.pem" 2>/dev/null
    rm -f "$CERT_DIR/server.csr"
    chmod 600 "$CERT_DIR/server.key"
    note "server certificate written: $CERT_DIR/server.pem (SAN $san)"
fi

# SuperNode identities: ECDSA P-384 in OpenSSH format, which is what `flwr supernode register`
# (load_ssh_public_key) and `flower-supernode --auth-supernode-private-key`
# (load_ssh_private_key) read.
for ((i = 0; i < supernodes; i++)); do
    k="$KEY_DIR/supernode-$i"
    if [[ $force == 1 ]]; then rm -f "$k" "$k.pub"; fi
    [[ -f "$k" ]] && continue
    if command -v ssh-keygen >/dev/null 2>&1; then
        ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedtune-supernode-$i" -f "$k"
    else
        python - "$k" <<'EOF'
import sys
from cryptography.hazmat.primitives import serialization as s
from cryptography.hazmat.primitives.asymmetric import ec

key = ec.generate_private_key(ec.SECP384R1())
path = sys.argv[1]
with open(path, "wb") as f:
    f.write(key.private_bytes(s.Encoding.PEM, s.PrivateFormat.OpenSSH, s.NoEncryption()))
with open(path + ".pub", "wb") as f:
    f.write(key.public_key().public_bytes(s.Encoding.OpenSSH, s.PublicFormat.OpenSSH))
EOF
    fi
    chmod 600 "$k"
done
[[ $supernodes -gt 0 ]] && note "SuperNode key pairs in $KEY_DIR (supernode-0 .. supernode-$((supernodes - 1)))"
exit 0
