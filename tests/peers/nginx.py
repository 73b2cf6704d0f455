"""nginx serving TLS with its key in a PKCS#11 token, through ``scripts/nginx-pkcs11.sh`` (the libp11 engine route).

The script daemonises nginx; the master's pid is in ``WORKDIR/logs/nginx.pid``. ``stop`` sends it SIGQUIT (through the
script's ``--stop``), and ``leftovers`` finds any nginx master of a work directory, or worker of a known master, that
is still alive (zombies waiting to be reaped by init do not count).
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "nginx-pkcs11.sh"


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a live process, or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


def _alive_nginx(pid: int) -> bool:
    stat = _stat(pid)
    if stat is None or stat[0] == "Z":
        return False
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "nginx"
    except OSError:
        return False


def nginx_pids(workdir: Path) -> list[int]:
    """The live masters whose command line names ``workdir``'s nginx.conf, and their workers."""
    conf = f"{workdir}/nginx.conf"
    masters: list[int] = []
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        stat = _stat(pid)
        if stat is None or stat[0] == "Z":
            continue
        children.setdefault(stat[1], []).append(pid)
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if conf in cmdline and _alive_nginx(pid):
            masters.append(pid)
    return masters + [child for m in masters for child in children.get(m, []) if _alive_nginx(child)]


def run_script(
    *args: str, softhsm_conf: Path | None = None, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The script with ``args``, in this environment without OPENSSL_CONF and SOFTHSM2_CONF, plus ``env``."""
    base = {k: v for k, v in os.environ.items() if k not in ("OPENSSL_CONF", "SOFTHSM2_CONF")}
    if softhsm_conf is not None:
        base["SOFTHSM2_CONF"] = str(softhsm_conf)
    env = {**base, **(env or {})}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def stop(workdir: Path) -> subprocess.CompletedProcess[str]:
    return run_script("--stop", "--workdir", str(workdir))


def leftovers(workdir: Path, known: list[int]) -> list[int]:
    return sorted(set(nginx_pids(workdir)) | {pid for pid in known if _alive_nginx(pid)})


def served_certificate(port: int, cafile: Path, timeout: float = 10.0) -> tuple[bytes, str]:
    """Handshake with verification against ``cafile`` (hostname 127.0.0.1): (the server's DER cert, TLS version)."""
    context = ssl.create_default_context(cafile=str(cafile))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der, str(tls.version())


def get(port: int, cafile: Path, path: str = "/", timeout: float = 10.0) -> tuple[int, str]:
    """GET ``path`` over TLS verified against ``cafile``: (the status code, the body)."""
    context = ssl.create_default_context(cafile=str(cafile))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        response = b""
        while chunk := tls.recv(65536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()
