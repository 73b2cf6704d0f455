"""Loading a simulated platform (made by ``keybroker sim init``) to produce quotes on the workload side (public: used
by ``evidence.SimulatedEvidence``, ``keybroker sim quote`` and the benchmarks)."""

from __future__ import annotations

import json
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from keybroker_client.sim_quotes import Platform


def _key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path} is not an EC private key")
    return key


def load_platform(directory: str | Path, name: str = "default") -> Platform:
    root = Path(directory)
    folder = root / "platforms" / name
    try:
        info = json.loads((folder / "platform.json").read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no simulated platform {name!r} in {root} (run 'keybroker sim init {root}')") from None
    chain = (folder / "pck.pem").read_bytes() + (root / "pki" / f"{info['ca']}.pem").read_bytes()
    chain += (root / "root-ca.pem").read_bytes()
    return Platform(
        pck_key=_key(folder / "pck.key"),
        ak=_key(folder / "ak.key"),
        pem_chain=chain,
        cpusvn=bytes.fromhex(info["cpusvn"]),
        pcesvn=int(info["pcesvn"]),
        qe_svn=int(info["qe_svn"]),
        tee_tcb_svn=bytes.fromhex(info["tee_tcb_svn"]),
    )
