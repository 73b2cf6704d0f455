#!/usr/bin/env bash
# Runs the whole test suite from scratch: bootstrap, lint (ruff), types (mypy --strict on src/), then pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh -k keys -x).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh --test
echo "== ruff" >&2
.venv/bin/ruff check src client/src tests bench scripts
.venv/bin/ruff format --check src client/src tests bench scripts
echo "== mypy --strict src client/src" >&2
.venv/bin/mypy src client/src
echo "== pytest" >&2
exec .venv/bin/python -m pytest "$@"
