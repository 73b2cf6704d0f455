"""``keybroker demo nginx`` as a user runs it: keybroker issues a certificate for an RSA-3072 key, the workload
agent attests and imports the key into a SoftHSM2 token, Debian's nginx serves TLS with it through the pkcs11
engine. A TLS client gets the certificate made for the key, the handshake succeeds (nginx signed with the key in
the token), and its public key is the one keybroker reports for the key id. A workload with another MRENCLAVE
gets nothing imported, the agent exits non-zero with the server's reasons, and its nginx refuses to start.
Ctrl-C stops everything and puts back the token directory's permissions. ``--dir D`` puts the demo's files in a new
subdirectory of D and leaves D's own mode alone; the files holding PINs are mode 0600."""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.peers.openbao import free_port

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "nginx-pkcs11.sh"


def _read_until(process: subprocess.Popen[str], marker: str, timeout: float) -> str:
    assert process.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        if marker in line:
            return "".join(seen)
    raise AssertionError(f"{marker!r} never came; output:\n{''.join(seen)}")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_demo_nginx_serves_tls_with_the_attested_key_and_refuses_the_other_workload() -> None:
    base = Path(tempfile.mkdtemp(prefix="kb-demo-nginx-"))
    # Traversable, not listable, for nginx's workers (nobody as root): the demo must leave that mode as it is.
    base.chmod(0o711)
    demo: Path | None = None
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYBROKER_")}
    env["COLUMNS"] = "400"  # rich must not wrap the lines this test reads
    process = subprocess.Popen(
        [sys.executable, "-m", "keybroker", "demo", "nginx", "--dir", str(base), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        shown = _read_until(process, "Ctrl-C stops", timeout=240)
        key_id = re.search(r"RSA-3072 key ([0-9a-f-]{36}) generated", shown)
        assert key_id, shown
        master = re.search(r"master pid (\d+)", shown)
        assert master, shown
        files = re.search(r"the demo's files: (\S+)", shown)
        assert files, shown
        demo = Path(files.group(1))
        assert demo.parent == base.resolve()
        assert _mode(base) == 0o711
        assert _mode(demo) == 0o755
        for secret in ("keys-KMS.txt", "keys-KMS2.txt", "so-pin", "pin"):
            assert _mode(demo / secret) == 0o600, secret
        assert "--pin " not in shown
        data = demo / "data"
        ca = data / "ca.pem"  # the service CA: keybroker's own clients trust it
        workload_ca = data / "workload-ca.pem"  # keybroker signs the certificates of its keys with this one
        assert f"curl --cacert {workload_ca} https://127.0.0.1:{port}/" in shown
        # The handshake: nginx proves possession of the key that only the attested workload received.
        context = ssl.create_default_context(cafile=str(workload_ca))
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            served_der = tls.getpeercert(binary_form=True)
            assert tls.version() in {"TLSv1.2", "TLSv1.3"}
        assert served_der is not None
        served = x509.load_der_x509_certificate(served_der)
        issued = x509.load_pem_x509_certificates((demo / f"{key_id.group(1)}.crt").read_bytes())[0]
        assert served == issued  # the certificate keybroker made for this key
        token = (data / "admin-token").read_text().strip()
        with httpx.Client(verify=ssl.create_default_context(cafile=str(ca))) as client:
            reported = client.get(
                shown.split("keybroker serving on ")[1].split()[0] + f"/kbs/v1/keys/{key_id.group(1)}/certificate",
                headers={"Authorization": f"Bearer {token}"},
            ).json()["public_key"]
        with httpx.Client(verify=ssl.create_default_context(cafile=str(workload_ca))) as client:
            page = client.get(f"https://127.0.0.1:{port}/")
        spki = served.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        assert spki.decode() == reported
        assert page.status_code in {200, 403, 404}  # served over the verified TLS connection
        # The other workload: refused with the server's reason, nothing imported, its nginx did not start.
        assert "mrenclave_mismatch" in shown
        assert "nothing was imported" in shown
        assert "there is no token KMS2" in shown or "has no private key" in shown
        assert "its nginx did not start (exit 1)" in shown
        assert _alive(int(master.group(1)))
        # nginx's workers are not root.
        workers = subprocess.run(
            ["ps", "-o", "user=", "--ppid", master.group(1)], capture_output=True, text=True, check=True
        )
        users = set(workers.stdout.split())
        assert users
        assert "root" not in users
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=60)
        assert process.returncode == 0, rest
        assert "nginx stopped" in rest
        assert not _alive(int(master.group(1)))
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0
        if os.geteuid() == 0:  # the workers' read access to the token was taken back
            assert "restored the group and mode of" in rest
            assert not (demo / "nginx" / "token-access").exists()
            for path in (demo / "softhsm" / "tokens").rglob("*"):
                assert _mode(path) & 0o077 == 0, path
        assert demo.exists()  # --dir: kept
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)  # its own clean-up stops keybroker and nginx; SIGKILL would orphan them
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for workdir in [demo / "nginx"] if demo else base.glob("keybroker-nginx-*/nginx"):
            subprocess.run(["bash", str(SCRIPT), "--stop", "--workdir", str(workdir)], capture_output=True, check=False)
        subprocess.run(["rm", "-rf", str(base)], check=False)


def test_demo_nginx_does_not_open_up_an_untraversable_dir(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        return  # only root's nginx runs its workers as another user (nobody)
    private = tmp_path / "home"
    private.mkdir(mode=0o700)
    result = subprocess.run(
        [sys.executable, "-m", "keybroker", "demo", "nginx", "--dir", str(private), "--no-wait"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("KEYBROKER_")}, "COLUMNS": "400"},
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "cannot traverse" in result.stderr
    assert "does not change the permissions of directories it did not create" in result.stderr
    assert _mode(private) == 0o700
    assert list(private.iterdir()) == []
