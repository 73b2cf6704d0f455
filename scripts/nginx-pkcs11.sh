#!/usr/bin/env bash
# Starts Debian's nginx serving TLS on 127.0.0.1:PORT with its private key in a PKCS#11 token (Intel guide §6.4):
#   ssl_certificate_key "engine:pkcs11:pkcs11:token=KMS;object=RSAKEY;type=private;pin-value=...";
# through the libp11 OpenSSL engine (libengine-pkcs11-openssl; nginx 1.22 has no store: keys). It writes nginx.conf
# and openssl.cnf into a work directory and runs nginx there; the key is never in a file.
#
#   scripts/nginx-pkcs11.sh --port 18443 --cert cert.pem --token KMS --object RSAKEY --pin-file pin.txt \
#       [--module /usr/lib/softhsm/libsofthsm2.so] [--workdir DIR] [--softhsm-conf FILE] [--user U --group G]
#   scripts/nginx-pkcs11.sh --stop [--workdir DIR]
#
# The token's user PIN: --pin-file FILE (its first line; the file must not be accessible by group or others, e.g.
# mode 0600), or --pin-env VAR (the script reads VAR and removes it from the environment of everything it starts).
# --pin PIN still works but puts the PIN on the command line, where every local user sees it (ps, /proc/*/cmdline).
# The script never passes the PIN on a command line (pkcs11-tool gets it as --pin env:VAR, openssl as -passin env:VAR).
# nginx itself reads it from WORKDIR/nginx.conf (pin-value= in the key's URI, as in the guide): that file is mode 0600.
#
# Provision the key first (keybroker-client provision --keys keys.txt ...); this script refuses to start when the
# token holds no private key with that label, or when it cannot check that --cert is for that key.
#
# Privileges: as root, the master starts as root (it reads the config and loads the key) and the workers run as
# nobody:softhsm (Debian's softhsm2 group; nogroup only if softhsm does not exist), never as root. After fork the
# engine re-opens the token in each worker, and SoftHSM re-reads the token's files there, so for a SoftHSM module this
# script gives that group read access (no write) to the token's directory; reading is enough, also for SoftHSM's
# locks. It records what it changed (with each file's device and inode) in WORKDIR/token-access, and --stop puts it
# back: only entries for the token directory the record names, for the very files changed, and only ever taking
# permissions away (or, when a root nginx of this script in another root work directory still uses that token
# directory, it leaves the record to that one's --stop). Every directory above the token directory and SOFTHSM2_CONF
# must be traversable by the worker user; the script checks that as that user before starting and refuses otherwise
# (or pass --user root). The workers need nothing in the work directory (the master opens the config, certificate,
# key, logs and pid file before they start; the page is a fixed text), so as root it is root's alone: it must be
# owned by root and writable by nobody else, and so must every directory above it (or be sticky, like /tmp), and every
# symbolic link on the way to it must be root's; otherwise the script refuses it. A new one is made with mode 0700.
# The same holds for the token's directory and every directory above it (SoftHSM's token directory may be sticky):
# otherwise whoever can rename one of them could swap in files of theirs for root to chgrp and chmod, so the script
# refuses (use --user root, or give the token a directory that only root can change).
# As a normal user, nginx runs as that user and nothing is changed.
#
# nginx reads the certificate from a copy in the work directory (WORKDIR/cert.pem: only its PEM certificates), never
# from the path given. Every path written into nginx.conf or openssl.cnf (the work directory, --module, the engine,
# SOFTHSM2_CONF), the real path of --cert and the token's directories may only hold letters, digits and . _ / + -
# (no spaces, quotes, ';', '#', '{', '}', '$' or control characters), user and group names likewise; the token and
# object labels are percent-encoded and may not hold control characters. Anything else is refused (exit 2).
set -euo pipefail

say() { printf 'nginx: %s\n' "$*"; }
warn() { printf 'nginx: %s\n' "$*" >&2; }
die() { printf 'nginx: %s\n' "$1" >&2; exit "${2:-1}"; }
usage() { sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }
# Whether PATH is plain: absolute, and only letters, digits and . _ / + - (nothing that could end a directive of
# nginx.conf or a value of openssl.cnf, start a comment or a variable, or a line or a field of the record).
plain_path() { [[ $1 =~ ^/[A-Za-z0-9._/+-]+$ ]]; }
# WHAT PATH: refuses (exit 2) a PATH that is not plain.
need_plain_path() {
  plain_path "$2" || die "refusing $1: its path $(printf %q "$2") may only hold letters, digits and . _ / + -" 2
}

port= cert= token=KMS object=RSAKEY pin= pin_file= pin_env= pin_arg=0 module= workdir=./nginx-pkcs11
softhsm_conf=${SOFTHSM2_CONF:-} user= group= stop=0
while [ $# -gt 0 ]; do
  case $1 in
    --port) port=${2:?}; shift 2 ;;
    --cert) cert=${2:?}; shift 2 ;;
    --token) token=${2:?}; shift 2 ;;
    --object) object=${2:?}; shift 2 ;;
    --pin) pin=${2:?}; pin_arg=1; shift 2 ;;
    --pin-file) pin_file=${2:?}; shift 2 ;;
    --pin-env) pin_env=${2:?}; shift 2 ;;
    --module) module=${2:?}; shift 2 ;;
    --workdir) workdir=${2:?}; shift 2 ;;
    --softhsm-conf) softhsm_conf=${2:?}; shift 2 ;;
    --user) user=${2:?}; shift 2 ;;
    --group) group=${2:?}; shift 2 ;;
    --stop) stop=1; shift ;;
    -h|--help) usage ;;
    *) printf 'nginx: unknown option %s\n' "$1" >&2; usage ;;
  esac
done
given_workdir=$workdir
[[ $given_workdir = /* ]] || given_workdir=$(pwd -P)/$given_workdir
workdir=$(realpath -m -- "$workdir")
need_plain_path "--workdir $(printf %q "$given_workdir")" "$workdir"  # nginx.conf names it (pid, logs, temporary files)
pidfile=$workdir/logs/nginx.pid
access_record=$workdir/token-access  # what this script changed for the workers' access to the token (root only)
PIN_VAR=KEYBROKER_NGINX_PKCS11_PIN   # the PIN reaches pkcs11-tool and openssl in this variable, never in argv
umask0=$(umask)
umask 077        # whatever this script and nginx write (nginx.conf holds the PIN, the record) is private
set -o noclobber # and never over an existing file: each one is removed first
is_root=0; [ "$(id -u)" = 0 ] && is_root=1

# Whether DIR is root's and only root can change what is in it: a directory (not a symbolic link) owned by root and
# not writable by group or others; with "sticky", a directory writable by others that is sticky (like /tmp) passes
# too: others cannot rename or remove root's entries there. Prints why not.
safe_dir() {
  local info uid mode type
  info=$(stat -c '%u %a %F' -- "$1" 2>/dev/null) || { echo "cannot stat $1"; return 1; }
  read -r uid mode type <<<"$info"
  [ "$type" = directory ] || { echo "$1 is a $type, not a directory"; return 1; }
  [ "$uid" = 0 ] || { echo "$1 is owned by $(id -nu "$uid" 2>/dev/null || echo "uid $uid"), not by root"; return 1; }
  (( (8#$mode & 8#022) == 0 )) || { [ "${2:-}" = sticky ] && (( (8#$mode & 8#1000) != 0 )); } \
    || { echo "$1 is writable by group or others (mode $mode)"; return 1; }
}
# GIVEN REAL: whether the directory REAL (the real path of GIVEN) is root's alone: REAL passes safe_dir, every
# directory above it passes safe_dir with "sticky", and every symbolic link on the way to it (as GIVEN) is root's.
# Parts that do not exist yet pass. Prints why not.
trusted_path() {
  local part p= d=$2
  local -a parts
  IFS=/ read -ra parts <<<"$1"
  for part in "${parts[@]}"; do
    [ -n "$part" ] || continue
    p=$p/$part
    if [ -L "$p" ] && [ "$(stat -c %u -- "$p")" != 0 ]; then
      echo "the way to it goes through $p, a symbolic link owned by $(stat -c %U -- "$p"), not by root"; return 1
    fi
  done
  if [ -e "$d" ] || [ -L "$d" ]; then safe_dir "$d" || return 1; fi
  while [ "$d" != / ]; do
    d=$(dirname -- "$d")
    if [ -e "$d" ] || [ -L "$d" ]; then safe_dir "$d" sticky || return 1; fi
  done
}
# As root, whether the work directory is root's alone (the record in it says which files to chmod as root; nginx.conf
# holds the PIN).
trusted_workdir() { trusted_path "$given_workdir" "$workdir"; }
refuse_workdir() {
  die "refusing the work directory $workdir: $1. As root, the work directory must be owned by root and writable by \
nobody else, and so must every directory above it (or be sticky, like /tmp); give another --workdir (a new one \
is made with mode 0700)" 2
}

# Whether PID is a live (not zombie) nginx master of this work directory: pid files go stale and pids are reused.
alive() {
  local state
  state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ] || return 1
  tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -q "nginx.*$workdir/nginx.conf"
}
# The master's pid, if it is running.
running_pid() {
  local pid
  pid=$(cat "$pidfile" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] && alive "$pid" || return 1
  echo "$pid"
}

# The live nginx masters this script started elsewhere: "PID<tab>WORKDIR" (from their "-c WORKDIR/nginx.conf").
other_masters() {
  local proc state cmd
  for proc in /proc/[0-9]*; do
    [ "$(cat "$proc/comm" 2>/dev/null)" = nginx ] || continue
    state=$(awk '{print $3}' "$proc/stat" 2>/dev/null) || continue
    [ -n "$state" ] && [ "$state" != Z ] || continue
    cmd=$(tr '\0' ' ' <"$proc/cmdline" 2>/dev/null) || continue
    [[ $cmd =~ \ -c\ ([^ ]+)/nginx\.conf ]] || continue
    [ "${BASH_REMATCH[1]}" != "$workdir" ] && printf '%s\t%s\n' "${proc#/proc/}" "${BASH_REMATCH[1]}"
  done
}

# cd into DIR, the very directory found at that name (not a symbolic link, not swapped meanwhile): what is done there
# to "." or to ./NAME is done to what DIR was when checked. Call it in a subshell.
enter() {
  local info
  info=$(stat -c '%d:%i %F' -- "$1" 2>/dev/null) && [ "${info#* }" = directory ] && cd -P -- "$1" 2>/dev/null \
    && [ "$(stat -c %d:%i .)" = "${info%% *}" ]
}

# TOP MODE GID GRANTED DEV:INO PATH LINE: puts back one entry (LINE) of the record, from inside its directory, and
# only when all of this holds: PATH is the token directory TOP, a token's directory in it or a file in one of those;
# it is still the file that was changed (device and inode), in a directory only root can change, still in the group
# it was given (GRANTED); and the old MODE takes permissions away, never adds any. Exit status: 0 put back, 1 failed,
# 2 refused (a malformed or planted entry), 3 changed since (another file at that name, or another group: left alone,
# and the entry must stay in the record), 4 gone since (nothing left to put back).
restore_entry() (
  local top=$1 mode=$2 gid=$3 granted=$4 id=$5 path=$6 rel target info cur_id cur_mode cur_gid type why dir
  [[ $mode =~ ^[0-7]{1,4}$ && $gid =~ ^[0-9]+$ && $granted =~ ^[0-9]+$ && $id =~ ^[0-9]+:[0-9]+$ ]] \
    || { warn "ignored a malformed entry of $access_record: ${7//$'\t'/ }"; exit 2; }
  rel=${path#"$top"/}
  if [ "$path" != "$top" ] && { [ "$rel" = "$path" ] || ! [[ $rel =~ ^[^/]+(/[^/]+)?$ ]] \
       || [[ /$rel/ =~ /\.\.?/ ]]; }; then
    warn "ignored the entry of $access_record for $path: not in the token directory $top"; exit 2
  fi
  if [ -d "$path" ] && [ ! -L "$path" ]; then
    enter "$path" || { warn "could not restore $path: it changed while this script looked at it"; exit 3; }
    target=.
  else
    dir=$(dirname -- "$path")
    [ -e "$dir" ] || [ -L "$dir" ] || exit 4  # gone since, with its directory (a deleted token)
    enter "$dir" || { warn "could not restore $path: $dir is not the directory it was"; exit 3; }
    why=$(safe_dir .) || { warn "ignored the entry of $access_record for $path: ${why/#./its directory}"; exit 2; }
    target=./$(basename -- "$path")
  fi
  info=$(stat -c '%d:%i %a %g %F' -- "$target" 2>/dev/null) || exit 4  # gone since (SoftHSM deletes object files)
  read -r cur_id cur_mode cur_gid type <<<"$info"
  [ "$cur_id" = "$id" ] || {
    warn "could not restore $path: it is another file (device:inode $cur_id) than the one changed ($id)"; exit 3
  }
  case $type in directory | "regular file" | "regular empty file") ;;
    *) warn "ignored the entry of $access_record for $path: a $type"; exit 2 ;;
  esac
  [ "$cur_gid" = "$granted" ] \
    || { warn "could not restore $path: its group changed since (now gid $cur_gid, was given gid $granted)"; exit 3; }
  (( (8#$mode & ~8#$cur_mode) == 0 )) \
    || { warn "ignored the entry of $access_record for $path: mode $mode would add permissions to $cur_mode"; exit 2; }
  chgrp -h -- "$gid" "$target" && chmod -- "$mode" "$target" || exit 1
)

# Puts back what the record says this script changed (in reverse order), unless another nginx of this script, run by
# root in a root work directory, needs the same token directory: then the record goes to that one, and its --stop
# puts it back.
restore_access() {
  local pid other heir= d top line kind mode gid granted id path why n=0 ignored=0 rc i
  local -a kept=()
  [ -e "$access_record" ] || [ -L "$access_record" ] || return 0
  [ "$is_root" = 1 ] || { warn "$access_record was written by root: run --stop as root"; return 1; }
  why=$(trusted_workdir) || { warn "not restoring what $access_record records: $why"; return 1; }
  [ -f "$access_record" ] && [ ! -L "$access_record" ] && [ "$(stat -c %u -- "$access_record")" = 0 ] \
    || { warn "not restoring what $access_record records: not a regular file of root's"; return 1; }
  top=$(sed -n $'1s/^needs\t//p' "$access_record")
  if [[ $top != /* ]] || [ "$top" = / ] || [ "$(realpath -m -- "$top")" != "$top" ]; then
    warn "not restoring what $access_record records: it names no token directory"; return 1
  fi
  while IFS=$'\t' read -r pid other; do
    [ "$(awk '$1 == "Uid:" { print $2 $3 $4 $5 }' "/proc/$pid/status" 2>/dev/null)" = 0000 ] || continue
    [ -f "$other/token-access" ] && [ ! -L "$other/token-access" ] || continue
    [ "$(stat -c %u -- "$other/token-access")" = 0 ] || continue
    safe_dir "$other" >/dev/null || continue
    d=$other; while [ "$d" != / ]; do d=$(dirname -- "$d"); safe_dir "$d" sticky >/dev/null || continue 2; done
    [ "$(head -n 1 "$other/token-access")" = "$(head -n 1 "$access_record")" ] && { heir=$other; break; }
  done < <(other_masters)
  if [ -n "$heir" ]; then
    if grep -q "^was"$'\t' "$access_record"; then
      grep "^was"$'\t' "$access_record" >>"$heir/token-access"
      say "the nginx in $heir uses the same token directory: left its permissions to that one's --stop"
    fi
    rm -f -- "$access_record"
    return 0
  fi
  while IFS= read -r line; do
    IFS=$'\t' read -r kind mode gid granted id path <<<"$line"
    [ "$kind" = was ] || continue
    rc=0; restore_entry "$top" "$mode" "$gid" "$granted" "$id" "$path" "$line" || rc=$?
    case $rc in
      0) n=$((n + 1)) ;;
      2) ignored=$((ignored + 1)) ;;
      4) ;;                  # gone: what was granted went with it
      *) kept+=("$line") ;;  # failed, or changed since: still to be put back, by hand
    esac
  done < <(tac "$access_record")
  [ "$ignored" = 0 ] || warn "ignored $ignored entr$([ "$ignored" = 1 ] && echo y || echo ies) of $access_record"
  [ "$n" = 0 ] || say "restored the group and mode of $n token file(s)/directories changed for the workers"
  if [ "${#kept[@]}" != 0 ]; then
    # Fail closed: the record keeps what is still to be put back (the rest was), so nothing is forgotten.
    rm -f -- "$access_record.new"
    { grep "^needs"$'\t' "$access_record" || true
      for ((i = ${#kept[@]} - 1; i >= 0; i--)); do printf '%s\n' "${kept[i]}"; done
    } >"$access_record.new" && mv -f -- "$access_record.new" "$access_record"
    warn "could not restore ${#kept[@]} entr$([ "${#kept[@]}" = 1 ] && echo y || echo ies) of $access_record" \
      "(see above): kept in it. Put back the group and mode of those files by hand (the record has, tab-separated:" \
      "was, old mode, old gid, gid given, device:inode, path), then remove $access_record"
    return 1
  fi
  rm -f -- "$access_record"
}

if [ "$stop" = 1 ]; then
  if pid=$(running_pid); then
    kill -QUIT "$pid"  # graceful: workers finish their connections
    for _ in $(seq 200); do alive "$pid" || break; sleep 0.05; done
    if alive "$pid"; then
      say "master $pid did not quit in 10 s; sending TERM"
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 100); do alive "$pid" || break; sleep 0.05; done
      alive "$pid" && die "master $pid is still running"
    fi
    say "stopped (master pid $pid)"
  else
    say "not running (no live master in $pidfile)"
  fi
  restore_access || exit 1
  exit 0
fi

# ---- the PIN -----------------------------------------------------------------------------------------------------
pin_sources=$pin_arg
[ -n "$pin_file" ] && pin_sources=$((pin_sources + 1))
[ -n "$pin_env" ] && pin_sources=$((pin_sources + 1))
[ "$pin_sources" -le 1 ] || die "give only one of --pin-file, --pin-env and --pin" 2
if [ -n "$pin_file" ]; then
  [ -f "$pin_file" ] || die "--pin-file $pin_file: no such file" 2
  exec 3<"$pin_file" || die "--pin-file $pin_file: cannot read it" 2
  pin_mode=$(stat -L -c %a /dev/fd/3)  # of the file just opened, not of whatever the name points to now
  (( (8#$pin_mode & 8#077) == 0 )) \
    || die "--pin-file $pin_file is accessible by group or others (mode $pin_mode): chmod 600 $pin_file" 2
  IFS= read -r pin <&3 || true
  exec 3<&-
  pin=${pin%$'\r'}
  [ -n "$pin" ] || die "--pin-file $pin_file is empty" 2
elif [ -n "$pin_env" ]; then
  [[ $pin_env =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "--pin-env $pin_env is not a variable name" 2
  pin=${!pin_env:-}
  [ -n "$pin" ] || die "--pin-env $pin_env: the variable is not set or empty" 2
  unset "$pin_env"  # nginx and the tools started here do not inherit it
elif [ "$pin_arg" = 1 ]; then
  warn "warning: --pin puts the PIN on the command line, visible to every local user (ps, /proc/*/cmdline);" \
    "use --pin-file or --pin-env"
fi

# ---- checks -----------------------------------------------------------------------------------------------------
[ -n "$port" ] && [ -n "$cert" ] && [ -n "$pin" ] \
  || { printf 'nginx: --port, --cert and --pin-file (or --pin-env) are required\n' >&2; usage; }
[[ $port =~ ^[0-9]+$ ]] && [ "$port" -ge 1 ] && [ "$port" -le 65535 ] || die "--port $port is not a port" 2
[ -f "$cert" ] && [ -r "$cert" ] || die "--cert $cert: no such file" 2
cert_real=$(realpath -- "$cert") || die "--cert $cert: no such file" 2
need_plain_path "--cert $(printf %q "$cert")" "$cert_real"
# nginx gets a copy in the work directory (written below) holding only the PEM certificates of the file, read once.
cert_pem=$(head -c 1048576 -- "$cert_real" | tr -d '\r' \
             | sed -n '/^-----BEGIN CERTIFICATE-----$/,/^-----END CERTIFICATE-----$/p' \
             | grep -E '^(-----(BEGIN|END) CERTIFICATE-----|[A-Za-z0-9+/=]+)$' || true)
[ -n "$cert_pem" ] && openssl x509 -noout 2>/dev/null <<<"$cert_pem" || die "--cert $cert is not a PEM certificate" 2
for label in "--token:$token" "--object:$object"; do
  if [[ ${label#*:} =~ [[:cntrl:]] ]]; then
    die "refusing ${label%%:*} $(printf %q "${label#*:}"): it holds a control character" 2
  fi
done
for name in "--user:$user" "--group:$group"; do
  [ -z "${name#*:}" ] || [[ ${name#*:} =~ ^[A-Za-z0-9_.][A-Za-z0-9_.-]*$ ]] \
    || die "refusing ${name%%:*} $(printf %q "${name#*:}"): not a user or group name" 2
done
if [ -z "$module" ]; then
  for m in /usr/lib/softhsm/libsofthsm2.so "/usr/lib/$(uname -m)-linux-gnu/softhsm/libsofthsm2.so"; do
    [ -e "$m" ] && { module=$m; break; }
  done
  [ -n "$module" ] || die "no --module given and SoftHSM2 is not installed" 2
fi
[ -r "$module" ] || die "--module $module: no such file" 2
module_given=$module
module=$(realpath -- "$module")
need_plain_path "--module $(printf %q "$module_given")" "$module"  # openssl.cnf's MODULE_PATH
if [ -n "$softhsm_conf" ]; then
  [ -r "$softhsm_conf" ] || die "--softhsm-conf $softhsm_conf: no such file" 2
  softhsm_conf_given=$softhsm_conf
  softhsm_conf=$(realpath -- "$softhsm_conf")
  need_plain_path "--softhsm-conf (SOFTHSM2_CONF) $(printf %q "$softhsm_conf_given")" "$softhsm_conf"
  export SOFTHSM2_CONF=$softhsm_conf
fi
NGINX=$(command -v nginx || true); [ -n "$NGINX" ] || NGINX=/usr/sbin/nginx
[ -x "$NGINX" ] || die "nginx is not installed (apt-get install nginx, or bash scripts/bootstrap.sh --test)"
command -v pkcs11-tool >/dev/null || die "pkcs11-tool is not installed (apt-get install opensc)"
enginesdir=$(openssl version -e | sed -n 's/^ENGINESDIR: "\(.*\)"$/\1/p')
engine=$enginesdir/pkcs11.so
[ -e "$engine" ] || die "the pkcs11 OpenSSL engine $engine is missing (apt-get install libengine-pkcs11-openssl)"
need_plain_path "the pkcs11 OpenSSL engine" "$engine"  # openssl.cnf's dynamic_path
# The work directory: as root, root's alone (checked before anything is written in it, and again once it exists).
if [ "$is_root" = 1 ]; then why=$(trusted_workdir) || refuse_workdir "$why"; fi
if [ ! -e "$workdir" ] && [ ! -L "$workdir" ]; then
  (umask "$umask0" && mkdir -p -- "$(dirname -- "$workdir")") || die "cannot create $(dirname -- "$workdir")"
  mkdir -m 700 -- "$workdir" || die "cannot create the work directory $workdir"
fi
if [ "$is_root" = 1 ]; then why=$(trusted_workdir) || refuse_workdir "$why"; fi
[ -d "$workdir" ] || die "--workdir $workdir is not a directory" 2
pid=$(running_pid) && die "already running in $workdir (master pid $pid); stop it with --stop --workdir $workdir"
# Left over from an nginx of this work directory that was never --stop'ped:
restore_access || die "cannot restore what $access_record records (see above; run --stop as root)"

if [ "$is_root" = 1 ]; then
  user=${user:-nobody}
  if [ -z "$group" ]; then
    if [ "$user" = root ]; then group=root
    elif getent group softhsm >/dev/null; then group=softhsm
    elif getent group nogroup >/dev/null; then group=nogroup
    else group=$(id -gn "$user"); fi
  fi
  getent passwd "$user" >/dev/null || die "no user $user" 2
  getent group "$group" >/dev/null || die "no group $group" 2
  [ "$user" = root ] && say "warning: --user root: the workers run as root"
elif [ -n "$user" ] && [ "$user" != "$(id -un)" ]; then
  die "--user needs root (nginx can only switch users when started as root)" 2
fi

# As USER:GROUP (only when root and USER is not root), else as ourselves.
as_worker() {
  if [ "$is_root" = 1 ] && [ "$user" != root ]; then
    setpriv --reuid="$user" --regid="$group" --clear-groups -- "$@"
  else
    "$@"
  fi
}

# pkcs11-tool logged in to the token; the PIN is in its environment only (opensc's --pin env:VAR).
p11() {
  local -x "$PIN_VAR=$pin"
  "$@" --module "$module" --token-label "$token" --login --pin "env:$PIN_VAR"
}

# The private key objects labelled OBJECT that the token shows after login (one line per object); pkcs11-tool's
# errors go to $p11_err.
p11_err=$workdir/.pkcs11-tool.err
list_keys() {
  rm -f -- "$p11_err"
  p11 "$@" pkcs11-tool --list-objects --type privkey 2>"$p11_err" \
    | want=$object awk '
        /^[A-Z]/ { inkey = ($0 ~ /^Private Key Object/) }
        inkey && $1 == "label:" { sub(/^[ \t]*label:[ \t]*/, ""); if ($0 == ENVIRON["want"]) print "key" }'
}

mkdir -p -- "$workdir/logs" "$workdir/tmp"
found=$(list_keys) || true
if [ -z "$found" ]; then
  if grep -q 'No slot with token named' "$p11_err"; then
    die "there is no token $token in $module; run keybroker-client provision first (with --init-token)"
  elif grep -q 'CKR_PIN_INCORRECT\|CKR_PIN_LEN_RANGE' "$p11_err"; then
    die "wrong PIN for the token $token"
  elif grep -qi 'error' "$p11_err"; then
    die "pkcs11-tool failed: $(tr '\n' ' ' <"$p11_err")"
  fi
  die "the token $token has no private key $object; run keybroker-client provision first"
fi
[ "$(wc -l <<<"$found")" -gt 1 ] && say "warning: the token $token holds $(wc -l <<<"$found") private keys labelled $object; the engine uses the first it finds"

# ---- configuration -----------------------------------------------------------------------------------------------
pct() {  # RFC 3986 percent-encoding of everything but unreserved characters (also keeps nginx's "$" out)
  local LC_ALL=C s=$1 out= c h i
  for ((i = 0; i < ${#s}; i++)); do
    c=${s:i:1}
    case $c in [A-Za-z0-9._~-]) out+=$c ;; *) printf -v h '%%%02X' "'$c"; out+=$h ;; esac
  done
  printf '%s' "$out"
}
key_uri="pkcs11:token=$(pct "$token");object=$(pct "$object");type=private"
# A new file (mode 0600: the umask) with standard input as its content; never written through an existing name.
new_file() { rm -f -- "$1" && cat >"$1"; }

new_file "$workdir/openssl.cnf" <<EOF
# Written by scripts/nginx-pkcs11.sh: OpenSSL loads the libp11 engine for nginx (only nginx gets OPENSSL_CONF).
openssl_conf = openssl_init

[openssl_init]
engines = engine_section

[engine_section]
pkcs11 = pkcs11_section

[pkcs11_section]
engine_id = pkcs11
dynamic_path = $engine
MODULE_PATH = $module
# init = 0 fails: "ENGINE_load_private_key() failed (...engine routines::not initialised)"
init = 1
EOF

# ---- the certificate must be for that key (nginx would only say "key values mismatch") ----------------------------
# From the public-key object with that label, else from the private key itself as the engine loads it (its modulus
# and exponent, or EC point, are public attributes); refuse to start when neither can be read.
token_pub= pub_source=
rm -f -- "$workdir/.token-pub.der"
if p11 pkcs11-tool --read-object --type pubkey --label "$object" -o "$workdir/.token-pub.der" >/dev/null 2>&1; then
  token_pub=$(openssl pkey -pubin -inform DER -in "$workdir/.token-pub.der" 2>/dev/null || true)
  pub_source="the public-key object $object"
fi
rm -f -- "$workdir/.token-pub.der"
if [ -z "$token_pub" ]; then
  token_pub=$(export "$PIN_VAR=$pin"  # a builtin: the PIN is in openssl's environment, not in its argv
              OPENSSL_CONF="$workdir/openssl.cnf" openssl pkey -engine pkcs11 -inform ENGINE -in "$key_uri" \
                -passin "env:$PIN_VAR" -pubout </dev/null 2>/dev/null \
                | sed -n '/-----BEGIN PUBLIC KEY-----/,/-----END PUBLIC KEY-----/p' || true)
  pub_source="the private key $object (through the pkcs11 engine)"
fi
[ -n "$token_pub" ] || die "cannot read the public key of $object in the token $token (no public-key object, and \
the engine could not load the private key), so cannot check that $cert is for it; refusing to start"
new_file "$workdir/cert.pem" <<<"$cert_pem"  # mode 0600: the master reads it as root, before the workers start
cert_pub=$(openssl x509 -in "$workdir/cert.pem" -noout -pubkey)
[ "$token_pub" = "$cert_pub" ] || die "the certificate $cert is not for the key $object in the token $token"
say "the certificate matches $pub_source in the token $token"

# ---- the worker's access to the token (root only) ---------------------------------------------------------------
# Gives GROUP what NAME (in the current directory: "." or ./FILE) lacks: read, and search for directories. First
# records its mode, group, the group given and its device:inode under PATH. Symbolic links and other files are left
# alone. NAME cannot be swapped meanwhile: the current directory is the one checked (enter) and only root changes it.
grant_here() {
  local name=$1 path=$2 need=040 info id mode gid type
  info=$(stat -c '%d:%i %a %g %F' -- "$name") || die "cannot stat $path"
  read -r id mode gid type <<<"$info"
  case $type in directory) need=050 ;; "regular file" | "regular empty file") ;; *) return 0 ;; esac
  [ "$gid" = "$group_id" ] && (( (8#$mode & 8#$need) == 8#$need )) && return 0
  printf 'was\t%s\t%s\t%s\t%s\t%s\n' "$mode" "$gid" "$group_id" "$id" "$path" >>"$access_record"
  chgrp -h -- "$group_id" "$name" && chmod -- "g+r$([ "$need" = 050 ] && echo x)" "$name" \
    || die "cannot give group $group read access to $path"
}
# The directory DIR itself, from inside.
grant_dir() (
  local why
  enter "$1" || die "$1 is not a directory, or changed while this script looked at it"
  why=$(safe_dir . sticky) \
    || die "cannot give the workers access to the token directory safely: ${why/#./$1} (use --user root)" 2
  grant_here . "$1"
)
# The token's directory DIR and the files in it (SoftHSM keeps a token's files in one flat directory): DIR must be
# root's and writable by root only, so that nobody else can swap a file for a link while this runs.
grant_token() (
  local why name
  why=$(safe_dir "$1") \
    || die "cannot give the workers access to the token's directory safely: $why (use --user root)" 2
  enter "$1" || die "$1 is not a directory, or changed while this script looked at it"
  why=$(safe_dir .) \
    || die "cannot give the workers access to the token's directory safely: ${why/#./$1} (use --user root)" 2
  grant_here . "$1"
  while IFS= read -r -d '' name; do
    [[ $name =~ ^[A-Za-z0-9._+-]+$ ]] \
      || die "refusing to give the workers access to $(printf %q "$1/$name"): an unexpected name (use --user root)" 2
    grant_here "./$name" "$1/$name"
  done < <(find . -mindepth 1 -maxdepth 1 -printf '%f\0')
)
keep_access=0
on_exit() { [ "$keep_access" = 1 ] || restore_access || true; }
if [ "$is_root" = 1 ] && [ "$user" != root ] && [ "$(basename "$module")" = libsofthsm2.so ]; then
  conf=${SOFTHSM2_CONF:-/etc/softhsm/softhsm2.conf}
  tokendir=$(sed -n 's/^[ \t]*directories\.tokendir[ \t]*=[ \t]*//p' "$conf" | tail -n1 | sed 's/[ \t]*$//')
  tokendir_given=$tokendir
  [ -z "$tokendir_given" ] || [[ $tokendir_given = /* ]] || tokendir_given=$(pwd -P)/$tokendir_given
  serial=$(pkcs11-tool --module "$module" -L 2>/dev/null | want=$token awk '
      /^Slot / { label = "" }
      $1 == "token" && $2 == "label" { sub(/^[^:]*:[ \t]*/, ""); label = $0 }
      $1 == "serial" && $2 == "num" && label == ENVIRON["want"] { sub(/^[^:]*:[ \t]*/, ""); print; exit }')
  tokdir=
  if [ -n "$tokendir" ] && [ -n "$serial" ]; then
    tokendir=$(realpath -m -- "$tokendir")
    for d in "$tokendir"/*/; do  # SoftHSM's serial is the last 16 hex digits of the token directory's UUID
      name=$(basename "$d"); name=${name//-/}
      [ "${name: -16}" = "$serial" ] && { tokdir=${d%/}; break; }
    done
  fi
  [ -n "$tokdir" ] || die "cannot find the SoftHSM directory of token $token under '$tokendir'; use --user root"
  [ "$tokendir" != / ] || die "SoftHSM's token directory is /: use --user root"
  plain_path "$tokendir" && plain_path "$tokdir" || die "refusing the token directory $(printf %q "$tokdir"): its \
path may only hold letters, digits and . _ / + - (use --user root)" 2
  # The token's directory and every directory above it must be root's alone (those above may be sticky), or whoever
  # can rename one could swap in files of theirs between the checks and the chgrp/chmod below.
  why=$(trusted_path "${tokendir_given%/}/${tokdir##*/}" "$tokdir") || die "cannot give the workers access to the \
token's directory $tokdir safely: $why. As root, the token's directory must be owned by root and writable by nobody \
else, and so must every directory above it (or be sticky, like /tmp); use --user root" 2
  # Refuse before changing anything when the worker could not get there anyway.
  as_worker test -r "$conf" \
    || die "the workers ($user:$group) cannot read $conf (a directory above it is not traversable?); use --user root"
  as_worker test -x "$(dirname "$tokendir")" \
    || die "the workers ($user:$group) cannot reach $tokendir (a directory above it is not traversable); use --user root"
  if ! as_worker test -r "$tokendir" -a -x "$tokendir"; then
    [ "$(stat -c %G "$tokendir")" = root ] || [ "$(stat -c %G "$tokendir")" = "$group" ] \
      || die "$user:$group cannot list $tokendir (group $(stat -c %G "$tokendir")); use --group or --user root"
  fi
  group_id=$(getent group "$group" | cut -d: -f3)
  trap on_exit EXIT  # a failed start puts back what it changed
  rm -f -- "$access_record"
  printf 'needs\t%s\nneeds\t%s\n' "$tokendir" "$tokdir" >"$access_record"  # mode 0600 (the umask)
  as_worker test -r "$tokendir" -a -x "$tokendir" || grant_dir "$tokendir"
  grant_token "$tokdir"
  changed=$(grep -c "^was"$'\t' "$access_record" || true)
  why=
  [ "$group" = nogroup ] && why=" (there is no softhsm group; nogroup is shared with other unprivileged services)"
  say "the workers run as $user:$group; group $group has read access to $tokdir$why" \
    "($changed entries changed, recorded in $access_record; --stop restores them)"
fi
if [ "$is_root" = 1 ] && [ "$user" != root ]; then
  found=$(list_keys as_worker) || true
  [ -n "$found" ] || die "the workers ($user:$group) cannot use the token $token: $(tr '\n' ' ' <"$p11_err")
  every directory above the token directory and SOFTHSM2_CONF must be traversable and readable for them (or use --user root)"
fi
rm -f -- "$p11_err"

user_line="# (not root: the workers run as $(id -un))"
[ "$is_root" = 1 ] && user_line="user $user $group;"
# Mode 0600 (the umask): it holds the PIN (pin-value= in the key's URI: the engine reads it from there). The workers
# need nothing in the work directory: the master opens the logs before they start and the page is this text.
new_file "$workdir/nginx.conf" <<EOF
# Written by scripts/nginx-pkcs11.sh.
daemon on;
worker_processes 1;
$user_line
pid $pidfile;
error_log $workdir/logs/error.log info;
env SOFTHSM2_CONF;   # nginx clears the workers' environment; they re-open the token after fork
env OPENSSL_CONF;
events { worker_connections 64; }
http {
    default_type text/plain;
    access_log $workdir/logs/access.log;
    client_body_temp_path $workdir/tmp/body;
    proxy_temp_path       $workdir/tmp/proxy;
    fastcgi_temp_path     $workdir/tmp/fastcgi;
    uwsgi_temp_path       $workdir/tmp/uwsgi;
    scgi_temp_path        $workdir/tmp/scgi;
    server {
        listen 127.0.0.1:$port ssl;
        ssl_certificate     $workdir/cert.pem;
        ssl_certificate_key "engine:pkcs11:$key_uri;pin-value=$(pct "$pin")";
        ssl_protocols TLSv1.2 TLSv1.3;
        location / { return 200 "served by nginx with its key in PKCS#11 token $(pct "$token")\n"; }
    }
}
EOF

# ---- start -------------------------------------------------------------------------------------------------------
rm -f -- "$pidfile"
# OPENSSL_CONF only for nginx: curl or python started with it would load the engine too.
if ! out=$(OPENSSL_CONF="$workdir/openssl.cnf" "$NGINX" -p "$workdir" -c "$workdir/nginx.conf" \
             -e "$workdir/logs/error.log" 2>&1); then
  printf '%s\n' "$out" >&2
  die "nginx did not start (see $workdir/logs/error.log)"
fi
for _ in $(seq 100); do pid=$(running_pid) && break; sleep 0.05; done
[ -n "${pid:-}" ] || die "nginx did not write $pidfile (see $workdir/logs/error.log)"
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done
# A handshake proves that the workers can use the key (they re-open the token after fork).
if ! env -u OPENSSL_CONF timeout 10 openssl s_client -connect "127.0.0.1:$port" -brief </dev/null >/dev/null 2>&1; then
  tail -n 5 "$workdir/logs/error.log" >&2
  kill -QUIT "$pid" 2>/dev/null || true
  for _ in $(seq 100); do alive "$pid" || break; sleep 0.05; done
  die "the TLS handshake on 127.0.0.1:$port failed, nginx stopped (see $workdir/logs/error.log)"
fi
keep_access=1
say "master pid $pid, https://127.0.0.1:$port/ (key: token $token, object $object, through the pkcs11 engine)"
say "try:  curl --cacert $cert https://127.0.0.1:$port/"
say "stop: $0 --stop --workdir $workdir"
