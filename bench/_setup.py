"""Setup shared by the transfer benchmarks: a simulated TEE and its collateral, the policy and key to release,
workload key pairs, and REPORTDATA."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dcap_qvl
import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from _common import Loop, SetupError, timed_loop
from keybroker.attestation.collateral import bundle_to_qvl, bundle_upload
from keybroker.sim.collateral import CollateralSpec, make_collateral
from keybroker.sim.pki import PlatformSpec, SimPki, add_platform, init_pki
from keybroker_client.sim_platform import load_platform
from keybroker_client.sim_quotes import Platform, SgxMeasurements, build_quote

MRENCLAVE = bytes.fromhex("5a" * 32)
MRSIGNER = bytes.fromhex("a5" * 32)
ISVPRODID, ISVSVN = 1, 2
MEASUREMENTS = SgxMeasurements(mrenclave=MRENCLAVE, mrsigner=MRSIGNER, isvprodid=ISVPRODID, isvsvn=ISVSVN)

# --- setup ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Simulator:
    directory: Path  # made by init_pki / add_platform (or `keybroker sim init`)
    collateral: Path  # OUT with OUT/sgx and OUT/tdx bundles
    platform: Platform
    root_der: bytes


def make_simulator(tmp: Path, existing: Path | None) -> Simulator:
    """A simulated TEE (``existing``, or a new one in ``tmp``) and fresh UpToDate collateral for it in ``tmp``."""
    now = datetime.now(UTC)
    start = now - timedelta(days=1)  # a margin for clocks and certificate second granularity
    if existing is not None:
        if not (existing / "root-ca.pem").is_file():
            raise SetupError(f"{existing} is not a simulator directory (no root-ca.pem); run 'keybroker sim init'")
        directory, pki = existing, SimPki(existing)
    else:
        directory = tmp / "sim"
        pki = init_pki(directory, start)
        add_platform(pki, PlatformSpec(name="default"), start)
    out = tmp / "coll"
    make_collateral(pki, out, CollateralSpec(platform="default", valid_from=start), now)
    root_pem = (directory / "root-ca.pem").read_bytes()
    root_der = x509.load_pem_x509_certificate(root_pem).public_bytes(serialization.Encoding.DER)
    return Simulator(directory, out, load_platform(directory, "default"), root_der)


def expect(response: httpx.Response, status: int, what: str) -> dict[str, Any]:
    if response.status_code != status:
        raise SetupError(f"{what}: HTTP {response.status_code} {response.text[:400]}")
    body: dict[str, Any] = response.json()
    return body


def import_collateral(admin: httpx.Client, out: Path) -> None:
    """POST each bundle's items to /collateral/v1/items, as ``keybroker collateral import`` does."""
    for bundle in (out / "sgx", out / "tdx"):
        items = bundle_upload(bundle)
        response = admin.post("/collateral/v1/items", json={"items": items, "source": f"bench {bundle.name}"})
        expect(response, 200, f"collateral import of {bundle}")


def create_key(admin: httpx.Client, secret: bytes) -> str:
    """A transfer policy for the simulated enclave and an AES-256 key with ``secret`` as material; the key id."""
    document = {
        "attestation_type": ["SGX"],
        "sgx": {
            "attributes": {
                "mrenclave": [MRENCLAVE.hex()],
                "mrsigner": [MRSIGNER.hex()],
                "isvprodid": [ISVPRODID],
                "isvsvn": ISVSVN,
            }
        },
        "allow_simulated": True,
    }
    policy = expect(admin.post("/kbs/v1/key-transfer-policies", json=document), 201, "transfer policy create")
    info = {"algorithm": "AES", "key_length": 256, "key_string": base64.b64encode(secret).decode()}
    body = {"key_information": info, "transfer_policy_id": policy["id"], "label": "bench-transfer"}
    return str(expect(admin.post("/kbs/v1/keys", json=body), 201, "key import")["id"])


@dataclass(frozen=True)
class WorkloadKey:
    private: rsa.RSAPrivateKey
    spki: bytes  # DER SubjectPublicKeyInfo: the transfer's user_data
    spki_b64: str


def workload_keys(count: int) -> list[WorkloadKey]:
    keys = []
    for _ in range(count):
        private = rsa.generate_private_key(public_exponent=65537, key_size=3072)
        spki = private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        keys.append(WorkloadKey(private, spki, base64.b64encode(spki).decode()))
    return keys


def report_data(nonce: dict[str, str], spki: bytes) -> bytes:
    return hashlib.sha512(base64.b64decode(nonce["val"]) + base64.b64decode(nonce["iat"]) + spki).digest()


def bare_verify_loop(sim: Simulator, duration: float, max_calls: int) -> Loop:
    """``dcap_qvl.verify_with_root_ca`` of one simulated quote with the bundle's collateral (parsed once)."""
    collateral = bundle_to_qvl(sim.collateral / "sgx")
    quote = build_quote(sim.platform, os.urandom(64), sgx=MEASUREMENTS)
    now = int(time.time())
    status = str(dcap_qvl.verify_with_root_ca(quote, collateral, sim.root_der, now).status)
    if status != "UpToDate":
        raise SetupError(f"the simulated quote verifies as {status}, not UpToDate")
    return timed_loop(
        "bare dcap_qvl verify",
        lambda: dcap_qvl.verify_with_root_ca(quote, collateral, sim.root_der, now),
        duration,
        max_calls,
    )


@contextlib.contextmanager
def local_postgres(tmp: Path) -> Iterator[tuple[dict[str, str], int]]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (started as the postgres user when root, with durable commits:
    fsync on), a database for keybroker; yields the server's environment for it and the postmaster's pid."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the test suite's PostgreSQL helper
    from tests.peers.postgres import Postgres

    server = Postgres(tmp / "postgres", durable=True).init()
    try:
        pid = int((server.data / "postmaster.pid").read_text().split()[0])
        env = {
            "KEYBROKER_BACKENDS__EMBEDDED__WRAPPER__MASTER_KEY": base64.b64encode(os.urandom(32)).decode(),
            "KEYBROKER_DATABASE__URL": server.url_for(server.database),
            "KEYBROKER_DATABASE__PASSWORD__ENV": "KEYBROKER_BENCH_PG_PASSWORD",
            "KEYBROKER_BENCH_PG_PASSWORD": server.password,
        }
        yield env, pid
    finally:
        server.remove()
