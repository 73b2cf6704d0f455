"""``keybroker demo``: the whole story in one command, against a real server process on this machine."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import httpx
import typer

from keybroker.cli import output
from keybroker.cli.common import handled

MRENCLAVE = bytes.fromhex("c0ffee" * 10 + "c0ff")
OTHER = bytes.fromhex("bad0" * 16)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _say(step: str) -> None:
    output.stdout.print(f"[bold cyan]▶[/bold cyan] {step}", highlight=False)


def _keybroker(*args: str, env: dict[str, str] | None = None) -> None:
    subprocess.run([sys.executable, "-m", "keybroker", *args], check=True, capture_output=True, env=env)  # noqa: S603 - fixed argv


@dataclass
class DemoServer:
    """A keybroker server process trusting a simulated TEE, with its collateral imported."""

    base: Path
    sim: Path
    data: Path
    url: str
    admin: httpx.Client


@contextlib.contextmanager
def demo_server(base: Path) -> Iterator[DemoServer]:
    """``sim init`` + collateral, ``keybroker init`` and ``serve`` on a free port; stopped on exit."""
    from keybroker.attestation.collateral import bundle_upload

    sim, data = base / "sim", base / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYBROKER_")}
    env["KEYBROKER_ATTESTATION__SIMULATED_ROOT"] = str(sim / "root-ca.pem")
    _say(f"simulated TEE and collateral in {sim}")
    _keybroker("sim", "init", str(sim))
    _keybroker("sim", "collateral", str(sim), "--out", str(sim / "collateral"))
    _say(f"keybroker init --data-dir {data}")
    _keybroker("init", "--data-dir", str(data), env=env)
    port = _free_port()
    url = f"https://127.0.0.1:{port}"
    with (base / "server.log").open("wb") as log, contextlib.ExitStack() as stack:
        server = subprocess.Popen(  # noqa: S603 - this very interpreter, fixed arguments
            [sys.executable, "-m", "keybroker", "serve", "--data-dir", str(data), "--listen", f"127.0.0.1:{port}"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )

        def stop_server() -> None:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)

        stack.callback(stop_server)
        ca = ssl.create_default_context(cafile=str(data / "ca.pem"))
        token = (data / "admin-token").read_text().strip()
        admin = stack.enter_context(
            httpx.Client(base_url=url, verify=ca, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        )
        for _ in range(300):
            if server.poll() is not None:
                break
            try:
                if admin.get("/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            output.say(f"keybroker did not start; see {base / 'server.log'}")
            raise typer.Exit(1)
        if server.poll() is not None:
            output.say(f"keybroker exited; see {base / 'server.log'}")
            raise typer.Exit(1)
        _say(f"keybroker serving on {url} (trusting the simulated TEE, with a warning in its log)")
        for tee in ("sgx", "tdx"):
            items = bundle_upload(sim / "collateral" / tee)
            admin.post("/collateral/v1/items", json={"items": items}).raise_for_status()
        _say("imported the simulated platform's collateral")
        yield DemoServer(base, sim, data, url, admin)


@handled
def demo(  # noqa: PLR0915 - a narrative, step by step
    directory: Annotated[Path | None, typer.Option("--dir", help="Keep everything here (default: a temp dir).")] = None,
) -> None:
    """Start keybroker with a simulated TEE, release an AES-256 and an RSA-3072 key to an attested workload,
    and show a workload with another MRENCLAVE refused, with its reasons."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from keybroker_client import Client, ProblemError
    from keybroker_client.evidence import SimulatedEvidence

    base = directory or Path(tempfile.mkdtemp(prefix="keybroker-demo-"))
    with demo_server(base) as running:
        sim, data, url, admin = running.sim, running.data, running.url, running.admin
        policy_document = {
            "attestation_type": "SGX",
            "allow_simulated": True,
            "sgx": {"attributes": {"mrenclave": [MRENCLAVE.hex()], "isvsvn": 1}},
        }
        policy = admin.post("/kbs/v1/key-transfer-policies", json=policy_document).json()["id"]
        _say(f"transfer policy {policy}: SGX, MRENCLAVE {MRENCLAVE.hex()[:16]}…, ISVSVN ≥ 1, simulated allowed")
        keys = {}
        for algorithm, length in (("AES", 256), ("RSA", 3072)):
            keys[algorithm] = admin.post(
                "/kbs/v1/keys",
                json={
                    "key_information": {"algorithm": algorithm, "key_length": length},
                    "transfer_policy_id": policy,
                    "label": f"demo-{algorithm.lower()}",
                },
            ).json()["id"]
            _say(f"generated {algorithm}-{length} key {keys[algorithm]} inside keybroker")
        # The service side encrypts a message with each key (as an application in the private cloud would).
        from keybroker.config import load_settings
        from keybroker.services import build_services

        services = build_services(load_settings(data_dir=data))
        try:
            aes = services.keys.load_material(services.keys.get(keys["AES"])).secret
            rsa_der = services.keys.load_material(services.keys.get(keys["RSA"])).secret
        finally:
            services.close()
        message = b"the launch codes are 0000"
        nonce = os.urandom(12)
        sealed = AESGCM(aes).encrypt(nonce, message, None)
        rsa_public = serialization.load_der_private_key(rsa_der, password=None).public_key()
        assert isinstance(rsa_public, rsa.RSAPublicKey)
        oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
        rsa_sealed = rsa_public.encrypt(message, oaep)
        del aes, rsa_der
        workload = SimulatedEvidence(sim, "sgx", mrenclave=MRENCLAVE, isvsvn=1)
        with Client(url, ca=data / "ca.pem") as client:
            released_aes = client.fetch_key(keys["AES"], workload)
            released_rsa = client.fetch_key(keys["RSA"], workload, mode="passport")
            opened = AESGCM(released_aes.key).decrypt(nonce, sealed, None)
            private = serialization.load_der_private_key(released_rsa.key, password=None)
            assert isinstance(private, rsa.RSAPrivateKey)
            opened_rsa = private.decrypt(rsa_sealed, oaep)
            _say(
                f"workload (MRENCLAVE {MRENCLAVE.hex()[:16]}…) attested and received both keys; with them it "
                f"decrypted {opened.decode()!r} (AES-GCM) and {opened_rsa.decode()!r} (RSA-OAEP)"
            )
            try:
                client.fetch_key(keys["AES"], SimulatedEvidence(sim, "sgx", mrenclave=OTHER, isvsvn=1))
                output.say("the second workload was not refused")
                raise typer.Exit(1)
            except ProblemError as refusal:
                reasons = ", ".join(f"{r['code']}: {r['detail']}" for r in refusal.problem.reasons)
                _say(f"a second workload (MRENCLAVE {OTHER.hex()[:16]}…) was refused: {refusal.code} ({reasons})")
        audit = admin.get("/kbs/v1/audit", params={"target": keys["AES"]}).json()
        _say("audit trail of the AES key: " + json.dumps([(e["action"], e["outcome"]) for e in audit]))
    output.stderr.print(f"done; files in {base}", highlight=False)
