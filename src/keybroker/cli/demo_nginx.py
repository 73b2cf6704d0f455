"""``keybroker demo nginx``: the guide's workload end to end on this machine.

keybroker (simulated TEE) holds an RSA-3072 key under a policy naming one MRENCLAVE and issues a certificate for it;
the workload agent (``keybroker-client provision``) attests, fetches the key and imports it into a SoftHSM2 token as
a non-extractable private key; nginx serves TLS with ``ssl_certificate_key "engine:pkcs11:..."`` from that token
(``scripts/nginx-pkcs11.sh``). Then a workload with another MRENCLAVE is refused and its nginx does not start.
Runs until Ctrl-C (or SIGTERM), then stops nginx and keybroker and removes its files; so does a failed step or a
signal on the way (``demo.Session``). With ``--dir D`` its files go into a new subdirectory of D, which is kept; the
demo changes the permissions of no directory it did not create.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from keybroker.ca import WORKLOAD_CA_CERT
from keybroker.cli import output
from keybroker.cli.common import handled
from keybroker.cli.demo import DemoServer, Session, _environment, _free_port, _say, demo_server, step

MRENCLAVE = bytes.fromhex("5eed" * 16)
OTHER = bytes.fromhex("bad0" * 16)
TOKEN, OBJECT, PIN = "KMS", "RSAKEY", "1234"  # as in the guide's keys.txt
MODULES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
)


def _script() -> Path:
    script = Path(__file__).resolve().parents[3] / "scripts" / "nginx-pkcs11.sh"
    if not script.exists():
        raise typer.BadParameter("scripts/nginx-pkcs11.sh is not here: run the demo from a keybroker checkout")
    return script


def _module() -> str:
    for candidate in MODULES:
        if Path(candidate).exists():
            return candidate
    output.say("SoftHSM2 is not installed: bash scripts/bootstrap.sh --test (as root)")
    raise typer.Exit(1)


def _run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)  # noqa: S603 - no shell
    except subprocess.TimeoutExpired:
        output.say("Error:", f"{Path(command[0]).name} {command[1]} did not finish in 300 s")
        raise typer.Exit(1) from None


def _show(result: subprocess.CompletedProcess[str]) -> None:
    for line in (result.stdout + result.stderr).splitlines():
        output.stdout.print(Text(f"    {line}"), soft_wrap=True)


def _secret_file(path: Path, text: str) -> Path:
    """A new file (never an existing one, nor a symlink's target) with mode 0600 from the start."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    return path


def _untraversable(base: Path) -> Path | None:
    """The first directory above ``base`` that others (nginx's workers, nobody) cannot traverse, if any."""
    for parent in reversed(base.resolve().parents):
        if not parent.stat().st_mode & stat.S_IXOTH:
            return parent
    return None


def _provision(
    running: DemoServer, base: Path, name: str, mrenclave: bytes, key_id: str, module: str, env: dict[str, str]
) -> int:
    # It holds the token PIN, as in the guide.
    line = f"pkcs11:token={name};id={key_id};object={OBJECT};type=private;pin-value={PIN};\n"
    keys_txt = _secret_file(base / f"keys-{name}.txt", line)
    with step(f"the workload (MRENCLAVE {mrenclave.hex()[:16]}…) attests, fetches key {key_id} into token {name}"):
        result = _run(
            [
                sys.executable, "-m", "keybroker_client.cli", "provision", "--keys", str(keys_txt),
                "--pkcs11-module", module, "--kbs", running.url, "--ca", str(running.data / "ca.pem"),
                "--evidence", f"sim:{running.sim}:sgx:mrenclave={mrenclave.hex()}",
                "--init-token", "--so-pin-file", str(base / "so-pin"),
            ],
            env,
        )  # fmt: skip
    _say(f"keybroker-client provision --keys {keys_txt.name} (workload MRENCLAVE {mrenclave.hex()[:16]}…)")
    _show(result)
    return result.returncode


def _stop_nginx(script: Path, workdir: Path, env: dict[str, str]) -> None:
    """``nginx-pkcs11.sh --stop``: stops the nginx of ``workdir`` if it runs and puts back the token directory's
    permissions (also after a start cut short); says nothing when nothing was started there."""
    if not workdir.exists():
        return
    started = any((workdir / made).exists() for made in ("logs/nginx.pid", "token-access"))
    with step(f"stopping nginx ({workdir.name})") if started else contextlib.nullcontext():
        result = _run([str(script), "--stop", "--workdir", str(workdir)], env)
    said = [line for line in (result.stdout + result.stderr).splitlines() if "not running (no live master" not in line]
    for line in said:
        output.stdout.print(Text(f"    {line}"), soft_wrap=True)
    if "stopped (master pid" in result.stdout + result.stderr:
        _say("nginx stopped")


def _handshake(port: int, ca_file: Path) -> bytes:
    context = ssl.create_default_context(cafile=str(ca_file))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        served = tls.getpeercert(binary_form=True)
    assert served is not None
    return served


@handled
def demo_nginx(
    directory: Annotated[
        Path | None,
        typer.Option(
            "--dir",
            metavar="DIR",
            help="Keep everything in a new subdirectory of this one (default: a temp dir, removed).",
        ),
    ] = None,
    port: Annotated[
        int,
        typer.Option("--port", metavar="PORT", help="nginx's HTTPS port (default: a free one).", show_default=False),
    ] = 0,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Keep nginx running until Ctrl-C.")] = True,
) -> None:
    """The guide's Nginx workload: attested key release into a PKCS#11 token, nginx serving TLS with it.

    Example: keybroker demo nginx --port 8443 --no-wait
    """
    script, module = _script(), _module()
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
    with Session() as session:
        # A fresh directory of the demo's own (mkdtemp: mode 0700), opened up for nginx's workers (nobody when run as
        # root), who must reach the token and their work directory. Directories above it are left as they are.
        base = session.directory(
            Path(tempfile.mkdtemp(prefix="keybroker-demo-nginx-", dir=directory)).resolve(), keep=False
        )
        base.chmod(0o755)
        blocked = _untraversable(base) if os.geteuid() == 0 else None
        if blocked is not None:
            output.say(
                f"nginx's workers (nobody) cannot traverse {blocked} (mode {stat.S_IMODE(blocked.stat().st_mode):o}),"
                f" so they could not reach the token under it: give a --dir that others can traverse (e.g. /tmp)."
                f" The demo does not change the permissions of directories it did not create.",
            )
            raise typer.Exit(1)
        session.keep = directory is not None
        _say(f"the demo's files: {base}")
        handled(_story)(session, base, script, module, port, wait)  # a failed step says why before the clean-up


def _story(  # noqa: PLR0915 - a narrative, step by step
    session: Session, base: Path, script: Path, module: str, port: int, wait: bool
) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    port = port or _free_port()
    tokens = base / "softhsm" / "tokens"
    tokens.mkdir(parents=True, exist_ok=True)
    conf = base / "softhsm" / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    _secret_file(base / "so-pin", os.urandom(8).hex())  # the SO PIN for the agent's --init-token
    pin_file = _secret_file(base / "pin", PIN + "\n")  # the token's user PIN for nginx-pkcs11.sh --pin-file
    env = {**_environment(), "SOFTHSM2_CONF": str(conf)}
    running = demo_server(session, base)
    policy = {
        "attestation_type": "SGX",
        "allow_simulated": True,
        "sgx": {"attributes": {"mrenclave": [MRENCLAVE.hex()]}},
    }
    with step("creating the transfer policy and an RSA-3072 key in keybroker"):
        policy_id = running.call("POST", "/kbs/v1/key-transfer-policies", json=policy)["id"]
        key_id = running.call(
            "POST",
            "/kbs/v1/keys",
            json={
                "key_information": {"algorithm": "RSA", "key_length": 3072},
                "transfer_policy_id": policy_id,
                "label": "nginx",
            },
        )["id"]
    _say(f"RSA-3072 key {key_id} generated in keybroker; policy: SGX, MRENCLAVE {MRENCLAVE.hex()[:16]}…")
    with step(f"keybroker issues a certificate for key {key_id}"):
        issued = running.call(
            "POST",
            f"/kbs/v1/keys/{key_id}/certificate",
            json={"subject": "CN=127.0.0.1", "san": ["IP:127.0.0.1", "DNS:localhost"], "days": 30},
        )
    # Signed by keybroker's workload CA (not the service CA its own clients trust): nginx's clients trust it.
    workload_ca = running.data / WORKLOAD_CA_CERT
    cert = base / f"{key_id}.crt"
    cert.write_text(issued["certificate"])
    _say(f"keybroker key certify {key_id} --subject CN=127.0.0.1 --san IP:127.0.0.1 → {cert.name}")
    if (status := _provision(running, base, TOKEN, MRENCLAVE, key_id, module, env)) != 0:
        output.say("Error:", f"the workload's agent failed (exit {status}): see above")
        raise typer.Exit(1)
    nginx_dir = base / "nginx"
    session.cleanups.callback(_stop_nginx, script, nginx_dir, env)  # before it starts: also stops a start cut short
    with step(f'starting nginx on 127.0.0.1:{port}: ssl_certificate_key "engine:pkcs11:pkcs11:token={TOKEN};..."'):
        started = _run(
            [str(script), "--port", str(port), "--cert", str(cert), "--token", TOKEN, "--object", OBJECT,
             "--pin-file", str(pin_file), "--module", module, "--workdir", str(nginx_dir), "--softhsm-conf", str(conf)],
            env,
        )  # fmt: skip
    _say(f'nginx on 127.0.0.1:{port}: ssl_certificate_key "engine:pkcs11:pkcs11:token={TOKEN};object={OBJECT};..."')
    _show(started)
    if started.returncode != 0:
        output.say("Error:", f"nginx did not start (exit {started.returncode}): see above")
        raise typer.Exit(1)
    served = x509.load_der_x509_certificate(_handshake(port, workload_ca))
    reported = running.call("GET", f"/kbs/v1/keys/{key_id}/certificate")["public_key"]
    spki = served.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    same = spki.decode() == reported
    _say(
        "TLS handshake with nginx: OK; the served certificate's public key "
        + ("is" if same else "is NOT")
        + f" the one keybroker reports for key {key_id}"
    )
    if not same:
        raise typer.Exit(1)
    _say("a second workload with another MRENCLAVE asks for the same key for its own token KMS2:")
    refused = _provision(running, base, "KMS2", OTHER, key_id, module, env)
    _say(f"  the agent exited {refused}: nothing was imported")
    other_dir = base / "nginx2"
    session.cleanups.callback(_stop_nginx, script, other_dir, env)
    with step("starting its nginx with token KMS2"):
        other = _run(
            [str(script), "--port", str(_free_port()), "--cert", str(cert), "--token", "KMS2", "--object", OBJECT,
             "--pin-file", str(pin_file), "--module", module, "--workdir", str(other_dir), "--softhsm-conf", str(conf)],
            env,
        )  # fmt: skip
    _show(other)
    _say(f"  its nginx did not start (exit {other.returncode})")
    output.stdout.print(
        Text.assemble(
            "\n",
            ("nginx is serving with a key released only after attestation:", "bold"),
            f"\n  curl --cacert {workload_ca} https://127.0.0.1:{port}/\n",
        ),
        soft_wrap=True,
    )
    if wait:
        session.wait(
            "Ctrl-C stops nginx and keybroker"
            + (f" (keeps {base})." if session.keep else " and removes the demo's files.")
        )
