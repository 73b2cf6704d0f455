"""Loading a simulated platform (made by ``keybroker sim init``) to produce quotes on the workload side (public: used
by ``evidence.SimulatedEvidence``, ``keybroker sim quote`` and the benchmarks).

Everything is read and checked here, once: a missing directory, platform or file, or one that is not what
``keybroker sim init`` writes, is a ``ConfigurationError`` naming it and saying how to make it."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from keybroker_client._errors import ConfigurationError
from keybroker_client._values import hex_or_bytes, uint16
from keybroker_client.sim_quotes import Platform

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a platform or CA name: one path component
_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"


def _read(path: Path, root: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(
            f"{path}: {exc.strerror or type(exc).__name__} (the simulated TEE in {root} is incomplete: "
            f"run 'keybroker sim init {root}' again)"
        ) from None


def _certificates(path: Path, root: Path) -> bytes:
    data = _read(path, root)
    if _CERTIFICATE not in data:
        raise ConfigurationError(f"{path} holds no PEM certificate (run 'keybroker sim init {root}' again)")
    return data


def _key(path: Path, root: Path) -> ec.EllipticCurvePrivateKey:
    data = _read(path, root)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigurationError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigurationError(f"{path} is not an EC private key")
    return key


def _platforms(root: Path) -> list[str]:
    folder = root / "platforms"
    return sorted(p.name for p in folder.iterdir() if (p / "platform.json").is_file()) if folder.is_dir() else []


def _description(path: Path, root: Path) -> dict[str, Any]:
    data = _read(path, root)
    try:
        info = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        info = None
    if not isinstance(info, dict):
        raise ConfigurationError(f"{path} is not a simulated platform's description (JSON object)")
    return info


def load_platform(directory: str | os.PathLike[str], name: str = "default") -> Platform:
    """The platform ``name`` of the simulated TEE in ``directory``: its PCK key and chain, attestation key and
    TCB. ``ConfigurationError`` says what is missing or wrong."""
    if not isinstance(directory, str | os.PathLike) or not str(directory):
        raise ConfigurationError("directory is the simulated TEE's directory (made by 'keybroker sim init DIR')")
    root = Path(directory)
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigurationError(f"platform {name!r} is not a platform name (letters, digits, '.', '_', '-')")
    if not root.is_dir():
        raise ConfigurationError(
            f"{root} is not a simulated TEE: no such directory (make one with 'keybroker sim init {root}')"
        )
    if not (root / "root-ca.pem").is_file():
        raise ConfigurationError(
            f"{root} is not a simulated TEE: it has no root-ca.pem (make one with 'keybroker sim init {root}')"
        )
    folder = root / "platforms" / name
    if not (folder / "platform.json").is_file():
        known = ", ".join(_platforms(root)) or "none"
        raise ConfigurationError(
            f"no simulated platform {name!r} in {root} (it has: {known}; add it with "
            f"'keybroker sim init {root} --platform {name}')"
        )
    info = _description(folder / "platform.json", root)
    where = folder / "platform.json"
    try:
        ca, cpusvn, pcesvn = info["ca"], info["cpusvn"], info["pcesvn"]
        qe_svn, tee_tcb_svn = info["qe_svn"], info["tee_tcb_svn"]
    except KeyError as exc:
        raise ConfigurationError(f"{where} has no {exc.args[0]!r}: not a simulated platform's description") from None
    if not isinstance(ca, str) or not _NAME.fullmatch(ca):
        raise ConfigurationError(f"{where}: ca {ca!r} is not a CA name")
    chain = _certificates(folder / "pck.pem", root) + _certificates(root / "pki" / f"{ca}.pem", root)
    chain += _certificates(root / "root-ca.pem", root)
    return Platform(
        pck_key=_key(folder / "pck.key", root),
        ak=_key(folder / "ak.key", root),
        pem_chain=chain,
        cpusvn=hex_or_bytes(f"{where}: cpusvn", cpusvn, 16),
        pcesvn=uint16(f"{where}: pcesvn", pcesvn),
        qe_svn=uint16(f"{where}: qe_svn", qe_svn),
        tee_tcb_svn=hex_or_bytes(f"{where}: tee_tcb_svn", tee_tcb_svn, 16),
    )
