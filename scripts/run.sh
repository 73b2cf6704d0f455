#!/usr/bin/env bash
# Runs keybroker on its embedded default: initialises the data directory on first start (database, master key,
# admin token printed once) and serves the API on 127.0.0.1:9443.
#   KEYBROKER_DATA_DIR       data directory (default: ./.data)
#   KEYBROKER_SERVER__LISTEN listen address (default: 127.0.0.1:9443); any other KEYBROKER_* setting works too
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
data_dir=${KEYBROKER_DATA_DIR:-.data}
.venv/bin/keybroker init --data-dir "$data_dir"
exec .venv/bin/keybroker serve --data-dir "$data_dir"
