"""``keybroker-client provision`` (the workload agent of the Intel guide's Nginx flow) and ``scripts/nginx-pkcs11.sh``
against a real keybroker server with a simulated TEE, a real SoftHSM2 token and a real nginx.

The simulated workload of ``--evidence sim:DIR:sgx`` has all-zero measurements: keys under the "zero" policy are
released to it, keys under the "other" policy (another MRENCLAVE) are not.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from keybroker.cli.main import app
from keybroker_client.provision import KeysFileError, parse_keys_file
from tests.integration.conftest import Server, clean_env, free_port, start_server, stop
from tests.peers import nginx
from tests.peers.softhsm import SO_PIN, SoftHsm, Token, module_path

pkcs11 = pytest.importorskip("pkcs11")
from pkcs11 import Attribute, GCMParams, Mechanism, ObjectClass  # noqa: E402 - after the importorskip that guards it
from pkcs11.exceptions import AttributeSensitive  # noqa: E402 - after the importorskip that guards it

runner = CliRunner()
OTHER_MRENCLAVE = "5a" * 32
PKCS8 = (serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


@dataclass
class Key:
    id: str
    material: bytes = field(repr=False)  # raw AES, or PKCS#8 DER
    private: Any = field(default=None, repr=False)  # the cryptography key, for RSA/EC


@dataclass
class Setup:
    server: Server
    sim: Path
    base: Path  # pytest's temporary directory for this module
    root: Path  # a directory nginx's workers (nobody) can traverse: the SoftHSM token dir and nginx's work dirs
    hsm: SoftHsm
    keys: dict[str, Key]
    timings: dict[str, float] = field(default_factory=dict)


def _post(server: Server, path: str, body: dict[str, Any]) -> dict[str, Any]:
    with server.client() as http:
        response = http.post(path, json=body)
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


def _import_key(server: Server, policy: str, info: dict[str, Any]) -> str:
    return str(_post(server, "/kbs/v1/keys", {"key_information": info, "transfer_policy_id": policy})["id"])


def transfers(server: Server, key_id: str) -> int:
    with server.client() as http:
        response = http.get("/kbs/v1/audit", params={"target": key_id})
    assert response.status_code == 200, response.text
    return sum(1 for entry in response.json() if entry["action"] == "key.transfer")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    base = tmp_path_factory.mktemp("provision")
    # pytest's base dir is 0700; nginx's workers run as nobody when the tests run as root, so the token directory
    # and nginx's work directories live in a traversable directory of their own.
    root = Path(tempfile.mkdtemp(prefix="kb-provision-"))
    root.chmod(0o755)
    saved_conf = os.environ.get("SOFTHSM2_CONF")
    sim = base / "sim"
    assert runner.invoke(app, ["sim", "init", str(sim)]).exit_code == 0
    assert runner.invoke(app, ["sim", "collateral", str(sim), "--out", str(sim / "coll")]).exit_code == 0
    server = start_server(base / ".data", KEYBROKER_ATTESTATION__SIMULATED_ROOT=str(sim / "root-ca.pem"))
    try:
        result = runner.invoke(
            app,
            ["collateral", "import", str(sim / "coll"), "--addr", server.url, "--token", server.token,
             "--cacert", str(server.ca_file)],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        policy = {"attestation_type": "SGX", "allow_simulated": True}
        zero = _post(server, "/kbs/v1/key-transfer-policies",
                     {**policy, "sgx": {"attributes": {"mrenclave": ["00" * 32]}}})["id"]  # fmt: skip
        other = _post(server, "/kbs/v1/key-transfer-policies",
                      {**policy, "sgx": {"attributes": {"mrenclave": [OTHER_MRENCLAVE]}}})["id"]  # fmt: skip
        keys: dict[str, Key] = {}
        rsa_key = rsa.generate_private_key(65537, 3072)
        pem = rsa_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        keys["RSA"] = Key(
            _import_key(server, zero, {"algorithm": "RSA", "key_length": 3072, "key_string": pem}),
            rsa_key.private_bytes(*PKCS8),
            rsa_key,
        )
        ec_key = ec.generate_private_key(ec.SECP256R1())
        pem = ec_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        keys["EC"] = Key(
            _import_key(server, zero, {"algorithm": "EC", "curve_type": "secp256r1", "key_string": pem}),
            ec_key.private_bytes(*PKCS8),
            ec_key,
        )
        for name, policy_id in (("AES", zero), ("DENIED", other)):
            raw = os.urandom(32)
            info = {"algorithm": "AES", "key_length": 256, "key_string": base64.b64encode(raw).decode()}
            keys[name] = Key(_import_key(server, policy_id, info), raw)
        hsm = SoftHsm(root / "hsm")
        yield Setup(server, sim, base, root, hsm, keys)
    finally:
        stop(server.process)
        # Leave SoftHSM finalised: the next user in this process initialises it with its own SOFTHSM2_CONF.
        lib = pkcs11.lib(os.path.realpath(module_path()))
        if lib.initialized:
            lib.finalize()
        if saved_conf is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = saved_conf
        shutil.rmtree(root, ignore_errors=True)


def keys_line(token: Token, key: Key, label: str, kind: str = "private") -> str:
    return f"pkcs11:token={token.label};id={key.id};object={label};type={kind};pin-value={token.pin};"


def provision(setup: Setup, lines: list[str], *extra: str, name: str = "") -> subprocess.CompletedProcess[str]:
    keys_file = setup.base / f"keys-{uuid.uuid4().hex[:8]}.txt"
    keys_file.write_text("# the keys for nginx\n\n" + "\n".join(lines) + "\n")
    command = [
        sys.executable, "-m", "keybroker_client.cli", "provision", "--keys", str(keys_file),
        "--pkcs11-module", setup.hsm.module, "--kbs", setup.server.url, "--ca", str(setup.server.ca_file),
        "--evidence", f"sim:{setup.sim}:sgx", *extra,
    ]  # fmt: skip
    started = time.monotonic()
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=180, check=False,
        env=clean_env(SOFTHSM2_CONF=str(setup.hsm.conf)),
    )  # fmt: skip
    if name:
        setup.timings[name] = time.monotonic() - started
    return result


@contextmanager
def session(setup: Setup, token: Token) -> Iterator[Any]:
    """A user session in this process. SoftHSM reads SOFTHSM2_CONF at C_Initialize and python-pkcs11 caches the
    library, so re-initialise: that also makes tokens created by the subprocesses visible. (The fixture finalises
    the library at the end of the module.)"""
    os.environ["SOFTHSM2_CONF"] = str(setup.hsm.conf)
    lib = pkcs11.lib(os.path.realpath(setup.hsm.module))  # the path keybroker's PKCS#11 backend loads it by
    lib.reinitialize()
    with lib.get_token(token_label=token.label).open(user_pin=token.pin) as opened:
        yield opened


def objects(opened: Any, label: str, key: Key | None = None) -> list[Any]:
    template: dict[Any, Any] = {Attribute.LABEL: label}
    if key is not None:
        template[Attribute.ID] = key.id.encode()
    return list(opened.get_objects(template))


def pair(opened: Any, label: str, key: Key) -> tuple[Any, Any]:
    """The private and the public key object with this label and id (exactly one each)."""
    found = objects(opened, label, key)
    classes = sorted(o[Attribute.CLASS] for o in found)
    assert classes == [ObjectClass.PUBLIC_KEY, ObjectClass.PRIVATE_KEY], classes
    private = next(o for o in found if o[Attribute.CLASS] == ObjectClass.PRIVATE_KEY)
    public = next(o for o in found if o[Attribute.CLASS] == ObjectClass.PUBLIC_KEY)
    return private, public


def leaked(setup: Setup, key: Key) -> list[str]:
    """Files under the test's directories that hold ``key``'s bytes (or its private components)."""
    needles = [key.material, key.material.hex().encode(), base64.b64encode(key.material)]
    if isinstance(key.private, rsa.RSAPrivateKey):
        numbers = key.private.private_numbers()
        needles += [n.to_bytes((n.bit_length() + 7) // 8, "big") for n in (numbers.d, numbers.p, numbers.q)]
    elif isinstance(key.private, ec.EllipticCurvePrivateKey):
        needles.append(key.private.private_numbers().private_value.to_bytes(32, "big"))
    found = []
    for top in (setup.base, setup.root):
        for path in top.rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                found += [str(path) for needle in needles if needle in data]
    return found


def test_provision_imports_sensitive_non_extractable_keys(setup: Setup) -> None:
    token = setup.hsm.token()
    rsa_key, ec_key, aes_key = setup.keys["RSA"], setup.keys["EC"], setup.keys["AES"]
    lines = [
        keys_line(token, rsa_key, "RSAKEY"),
        keys_line(token, ec_key, "ECKEY"),
        keys_line(token, aes_key, "AESKEY", "secret-key"),
    ]
    result = provision(setup, lines, name="provision RSA-3072 + EC + AES-256")
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert out == [
        f"imported {rsa_key.id}: token {token.label}, object RSAKEY, RSA-3072 (private key + public key)",
        f"imported {ec_key.id}: token {token.label}, object ECKEY, EC-secp256r1 (private key + public key)",
        f"imported {aes_key.id}: token {token.label}, object AESKEY, AES-256 (secret key)",
    ]
    for key in (rsa_key, ec_key, aes_key):
        assert key.material.hex() not in result.stdout + result.stderr
        assert base64.b64encode(key.material).decode() not in result.stdout + result.stderr

    message = b"the launch codes"
    with session(setup, token) as opened:
        private, public = pair(opened, "RSAKEY", rsa_key)
        for attribute, expected in (
            (Attribute.TOKEN, True), (Attribute.PRIVATE, True), (Attribute.SENSITIVE, True),
            (Attribute.EXTRACTABLE, False), (Attribute.SIGN, True), (Attribute.DECRYPT, True),
        ):  # fmt: skip
            assert private[attribute] == expected, attribute
        # Imported, so not "always sensitive / never extractable / local" (PKCS#11 §4.9): a token says that only of
        # keys it generated.
        assert private[Attribute.ALWAYS_SENSITIVE] is False
        for attribute in (Attribute.PRIVATE_EXPONENT, Attribute.PRIME_1, Attribute.PRIME_2):
            with pytest.raises(AttributeSensitive):
                private[attribute]
        signature = private.sign(message, mechanism=Mechanism.SHA256_RSA_PKCS)
        rsa_key.private.public_key().verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
        numbers = rsa_key.private.public_key().public_numbers()
        assert int.from_bytes(public[Attribute.MODULUS], "big") == numbers.n

        ec_private, ec_public = pair(opened, "ECKEY", ec_key)
        assert ec_private[Attribute.SENSITIVE] is True
        assert ec_private[Attribute.EXTRACTABLE] is False
        with pytest.raises(AttributeSensitive):
            ec_private[Attribute.VALUE]
        digest = hashes.Hash(hashes.SHA256())
        digest.update(message)
        raw = ec_private.sign(digest.finalize(), mechanism=Mechanism.ECDSA)  # SoftHSM 2.6 has no CKM_ECDSA_SHA256
        der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
        ec_key.private.public_key().verify(der, message, ec.ECDSA(hashes.SHA256()))
        assert ec_public[Attribute.EC_POINT]

        (secret,) = objects(opened, "AESKEY", aes_key)
        assert secret[Attribute.CLASS] == ObjectClass.SECRET_KEY
        assert secret[Attribute.SENSITIVE] is True
        assert secret[Attribute.EXTRACTABLE] is False
        with pytest.raises(AttributeSensitive):
            secret[Attribute.VALUE]
        iv = os.urandom(12)
        sealed = secret.encrypt(message, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(iv, b"aad", 128))
        assert AESGCM(aes_key.material).decrypt(iv, sealed, b"aad") == message


def test_rerunning_replaces_the_objects(setup: Setup) -> None:
    token = setup.hsm.token()
    lines = [keys_line(token, setup.keys["RSA"], "RSAKEY"), keys_line(token, setup.keys["AES"], "AESKEY", "secret")]
    assert provision(setup, lines).returncode == 0
    again = provision(setup, lines, "--passport", name="re-provision (replace) RSA + AES, passport mode")
    assert again.returncode == 0, again.stderr
    assert "replaced 2 old object(s)" in again.stdout.splitlines()[0]
    assert "replaced 1 old object(s)" in again.stdout.splitlines()[1]
    with session(setup, token) as opened:
        private, _ = pair(opened, "RSAKEY", setup.keys["RSA"])
        assert [o[Attribute.CLASS] for o in objects(opened, "AESKEY")] == [ObjectClass.SECRET_KEY]
        assert len(list(opened.get_objects())) == 3
        signature = private.sign(b"m", mechanism=Mechanism.SHA256_RSA_PKCS)
        setup.keys["RSA"].private.public_key().verify(signature, b"m", padding.PKCS1v15(), hashes.SHA256())
    # Another key id under the same label is added next to it, with a warning: nginx's URI selects by label only.
    other = provision(setup, [keys_line(token, setup.keys["EC"], "RSAKEY")])
    assert other.returncode == 0, other.stderr
    assert f"warning: token {token.label} also holds 2 object(s) labelled RSAKEY with another id" in other.stderr


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("pkcs11:token=KMS;id={id};object=RSAKEY;type=private;pin-value=1234;", ("KMS", "RSAKEY", "private", "1234")),
        ("PKCS11:token=K%4DS;id={id};object=RSA%20KEY;type=secret-key?pin-value=%3B%26", ("KMS", "RSA KEY", "secret",
                                                                                         ";&")),
        ("pkcs11:object=o;type=secret;token=t;id={id};pin-source=file:pin.txt", ("t", "o", "secret", "4321")),
    ],
)  # fmt: skip
def test_keys_file_uris(tmp_path: Path, line: str, expected: tuple[str, str, str, str]) -> None:
    (tmp_path / "pin.txt").write_text("4321\n")
    key_id = str(uuid.uuid4())
    (entry,) = parse_keys_file(f"# comment\n\n  {line.format(id=key_id)}  \n", str(tmp_path / "keys.txt"))
    assert (entry.token, entry.label, entry.kind, entry.pin) == expected
    assert (entry.key_id, entry.cka_id, entry.line) == (key_id, key_id.encode(), 3)
    assert "4321" not in repr(entry)
    assert "1234" not in repr(entry)


def test_keys_file_errors_name_every_bad_line(tmp_path: Path) -> None:
    key_id = str(uuid.uuid4())
    good = f"pkcs11:token=KMS;id={key_id};object=A;type=private;pin-value=1"
    text = "\n".join(
        [
            good,
            good,  # the same token+object twice
            f"pkcs11:token=KMS;id={key_id};object=B;type=private;pin-value=2",  # another PIN for KMS
            f"pkcs11:token=KMS;id={key_id};object=C;type=cert;pin-value=1",
            f"pkcs11:token=KMS;id={key_id};object=D;object=E;type=private;pin-value=1",
            f"pkcs11:token=KMS;id={key_id};object=F G;type=private;pin-value=1",
            f"pkcs11:token=KMS;id={key_id};object=H;type=private",
            f"pkcs11:token=KMS;id={key_id};object=I;type=private;pin-source=file:/nonexistent/pin",
            f"pkcs11:token=KMS;id={key_id};object=J;type=private;pin-value=1;serial=42",
            f"pkcs11:token={'T' * 33};id={key_id};object=K;type=private;pin-value=1",
        ]
    )
    with pytest.raises(KeysFileError) as caught:
        parse_keys_file(text, str(tmp_path / "keys.txt"))
    lines = {line: message for line, message in caught.value.problems}
    assert sorted(lines) == list(range(2, 11))
    assert "already provisioned by line 1" in lines[2]
    assert "another PIN" in lines[3]
    assert "type=cert" in lines[4]
    assert "appears twice" in lines[5]
    assert "percent-encoded" in lines[6]
    assert "no PIN" in lines[7]
    assert "cannot read" in lines[8]
    assert "serial" in lines[9]
    assert "longer than 32 bytes" in lines[10]


def test_a_malformed_line_is_a_usage_error_and_nothing_is_fetched(setup: Setup) -> None:
    token = setup.hsm.token()
    key = setup.keys["AES"]
    before = transfers(setup.server, key.id)
    lines = [
        keys_line(token, key, "AESKEY", "secret-key"),
        f"pkcs11:token={token.label};id=not-a-uuid;object=X;type=private;pin-value=1",
        f"pkcs11:token={token.label};object=Y;type=private;pin-value=1",
        f"pkcs11:token={token.label};id={key.id};object=Z;type=private;pin-value=1%G1",
        "https://example.com/",
    ]
    result = provision(setup, lines)
    assert result.returncode == 2, result.stderr
    errors = result.stderr.splitlines()
    # keys.txt starts with a comment and a blank line: the URIs are on lines 3..7.
    assert any(":4: id='not-a-uuid' is not a keybroker key id" in e for e in errors), errors
    assert any(":5: id= is required" in e for e in errors), errors
    assert any(":6: attribute 'pin-value'" in e for e in errors), errors
    assert any(":7: not a pkcs11: URI" in e for e in errors), errors
    assert not any(":3:" in e for e in errors)
    assert "nothing was fetched" in result.stderr
    assert transfers(setup.server, key.id) == before
    with session(setup, token) as opened:
        assert list(opened.get_objects()) == []


def test_a_missing_token_is_refused_before_fetching(setup: Setup) -> None:
    key = setup.keys["AES"]
    before = transfers(setup.server, key.id)
    ghost = Token(f"absent-{uuid.uuid4().hex[:8]}", "1234", setup.hsm.module, setup.hsm.conf)
    result = provision(setup, [keys_line(ghost, key, "AESKEY", "secret")])
    assert result.returncode == 1
    assert f"no token labelled {ghost.label}" in result.stderr
    assert "--init-token" in result.stderr
    assert transfers(setup.server, key.id) == before


def test_init_token_creates_the_token(setup: Setup) -> None:
    fresh = Token(f"kms-{uuid.uuid4().hex[:8]}", "5678", setup.hsm.module, setup.hsm.conf)
    so_pin_file = setup.base / "so-pin"
    so_pin_file.write_text(SO_PIN + "\n")
    result = provision(
        setup,
        [keys_line(fresh, setup.keys["RSA"], "RSAKEY")],
        "--init-token",
        "--so-pin-file",
        str(so_pin_file),
        name="--init-token + provision RSA-3072",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"initialised token {fresh.label} (slot ")
    assert f"imported {setup.keys['RSA'].id}: token {fresh.label}, object RSAKEY, RSA-3072" in result.stdout
    with session(setup, fresh) as opened:
        assert len(objects(opened, "RSAKEY", setup.keys["RSA"])) == 2
    # The label is blank-padded like softhsm2-util's: pkcs11-tool finds the token by it.
    listed = subprocess.run(
        ["pkcs11-tool", "--module", setup.hsm.module, "--token-label", fresh.label, "--login", "--pin", fresh.pin,
         "--list-objects", "--type", "privkey"],
        capture_output=True, text=True, check=False, env={**os.environ, "SOFTHSM2_CONF": str(setup.hsm.conf)},
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    assert "RSAKEY" in listed.stdout
    # --init-token without its SO PIN file is a usage error.
    result = provision(setup, [keys_line(fresh, setup.keys["RSA"], "RSAKEY")], "--init-token")
    assert result.returncode == 2
    assert "--so-pin-file" in result.stderr


def test_a_refused_key_means_nothing_is_imported(setup: Setup) -> None:
    token = setup.hsm.token()
    allowed, denied = setup.keys["AES"], setup.keys["DENIED"]
    before = transfers(setup.server, allowed.id)
    lines = [keys_line(token, allowed, "AESKEY", "secret"), keys_line(token, denied, "DENIEDKEY", "secret")]
    result = provision(setup, lines, name="refused (1 released, 1 denied)")
    assert result.returncode == 1
    assert f"refused: key {denied.id} (line 4)" in result.stderr
    assert "policy_denied" in result.stderr
    assert "mrenclave_mismatch" in result.stderr
    assert "nothing was imported" in result.stderr
    assert "imported " not in result.stdout
    assert transfers(setup.server, allowed.id) == before + 1  # the first key was released, then dropped
    with session(setup, token) as opened:
        assert list(opened.get_objects()) == []


def _certificate(key: rsa.RSAPrivateKey, path: Path) -> None:
    """A self-signed certificate for ``key`` (for a key that is not in the token)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


def _workload_ca(setup: Setup) -> Path:
    """The CA that signs the certificates of keybroker's keys (not the service CA of keybroker's own TLS)."""
    return setup.server.data_dir / "workload-ca.pem"


def _certify(setup: Setup, key: Key, path: Path) -> str:
    """keybroker's certificate for ``key`` (POST /kbs/v1/keys/{id}/certificate, leaf + CA) into ``path``; returns
    the public key (PEM SPKI) the server reports for it."""
    body = {"subject": "CN=127.0.0.1", "san": ["IP:127.0.0.1"], "days": 30}
    issued = _post(setup.server, f"/kbs/v1/keys/{key.id}/certificate", body)
    path.write_text(issued["certificate"])
    chain = x509.load_pem_x509_certificates(path.read_bytes())
    assert chain[1:] == x509.load_pem_x509_certificates(_workload_ca(setup).read_bytes())  # leaf + workload CA
    return str(issued["public_key"])


def _pin_file(path: Path, pin: str, mode: int = 0o600) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as handle:
        handle.write(pin + "\n")
    path.chmod(mode)  # os.open's mode is filtered by the umask
    return path


def _modes(*tops: Path) -> dict[Path, tuple[int, int]]:
    """(mode, gid) of every file and directory under ``tops`` (and of ``tops``)."""
    found = {}
    for top in tops:
        for path in [top, *top.rglob("*")]:
            info = path.lstat()
            found[path] = (info.st_mode, info.st_gid)
    return found


def _spki(certificate_der: bytes) -> str:
    public = x509.load_der_x509_certificate(certificate_der).public_key()
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def _stop_and_check(
    setup: Setup, workdir: Path, known: list[int], timing: str = ""
) -> subprocess.CompletedProcess[str]:
    stopped = time.monotonic()
    result = nginx.stop(workdir)
    if timing:
        setup.timings[timing] = time.monotonic() - stopped
    assert result.returncode == 0, result.stderr
    deadline = time.monotonic() + 10
    while nginx.leftovers(workdir, known) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert nginx.leftovers(workdir, known) == []
    return result


def test_nginx_serves_tls_with_the_provisioned_key(setup: Setup) -> None:
    token = setup.hsm.token()
    key = setup.keys["RSA"]
    assert provision(setup, [keys_line(token, key, "RSAKEY")]).returncode == 0
    cert = setup.root / "nginx-cert.pem"
    reported = _certify(setup, key, cert)  # keybroker's certificate for the key, from its CA
    workdir = setup.root / "nginx-ok"
    port = free_port()
    # The PIN file: mode 0600 (never on a command line); one that group or others can read is refused.
    loose = _pin_file(setup.root / "pin-0644", token.pin, 0o644)
    pin_file = _pin_file(setup.root / "pin", token.pin)
    common = ["--token", token.label, "--object", "RSAKEY", "--module", setup.hsm.module, "--workdir", str(workdir),
              "--softhsm-conf", str(setup.hsm.conf)]  # fmt: skip
    refused = nginx.run_script("--port", str(port), "--cert", str(cert), "--pin-file", str(loose), *common)
    assert refused.returncode == 2
    assert f"--pin-file {loose} is accessible by group or others (mode 644): chmod 600 {loose}" in refused.stderr
    assert not (workdir / "nginx.conf").exists()
    wrong = setup.root / "nginx-wrong-cert.pem"
    _certificate(rsa.generate_private_key(65537, 2048), wrong)
    refused = nginx.run_script("--port", str(port), "--cert", str(wrong), "--pin-file", str(pin_file), *common)
    assert refused.returncode == 1
    assert f"the certificate {wrong} is not for the key RSAKEY in the token {token.label}" in refused.stderr
    assert token.directory is not None
    before = _modes(setup.hsm.tokendir, token.directory)
    known: list[int] = []
    started = time.monotonic()
    result = nginx.run_script("--port", str(port), "--cert", str(cert), "--pin-file", str(pin_file), *common)
    setup.timings["nginx-pkcs11.sh start (checks + handshake)"] = time.monotonic() - started
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        assert "warning" not in result.stderr
        assert f"the certificate matches the public-key object RSAKEY in the token {token.label}" in result.stdout
        known = nginx.nginx_pids(workdir)
        master = int((workdir / "logs" / "nginx.pid").read_text())
        assert f"master pid {master}" in result.stdout
        assert f"curl --cacert {cert} https://127.0.0.1:{port}/" in result.stdout
        assert master in known
        assert len(known) == 2  # the master and one worker
        if os.geteuid() == 0:  # workers unprivileged: nobody, not root
            worker = next(pid for pid in known if pid != master)
            uid_line = next(line for line in Path(f"/proc/{worker}/status").read_text().splitlines()
                            if line.startswith("Uid:"))  # fmt: skip
            assert uid_line.split()[1] != "0"
            assert "group softhsm has read access to" in result.stdout
            assert stat.S_IMODE((workdir / "token-access").stat().st_mode) == 0o600
        # A new work directory is its owner's alone: the workers need nothing in it (they serve a fixed text).
        assert stat.S_IMODE(workdir.stat().st_mode) == 0o700
        assert nginx.get(port, _workload_ca(setup)) == (
            200,
            f"served by nginx with its key in PKCS#11 token {token.label}\n",
        )
        served, version = nginx.served_certificate(port, _workload_ca(setup))  # verified against keybroker's CA
        assert _spki(served) == reported  # the public key keybroker reports for the key id
        assert version in ("TLSv1.2", "TLSv1.3")
        for _ in range(5):  # more handshakes, each signed by the worker through the token
            nginx.served_certificate(port, _workload_ca(setup))
        config = (workdir / "nginx.conf").read_text()
        assert "env SOFTHSM2_CONF;" in config
        # nginx reads a copy of the certificate in the work directory (the PEM certificates only), not --cert.
        assert f"ssl_certificate     {workdir}/cert.pem;" in config
        assert str(cert) not in config
        copy = workdir / "cert.pem"
        assert x509.load_pem_x509_certificates(copy.read_bytes()) == x509.load_pem_x509_certificates(cert.read_bytes())
        assert stat.S_IMODE(copy.stat().st_mode) == 0o600
        assert f'ssl_certificate_key "engine:pkcs11:pkcs11:token={token.label};object=RSAKEY;type=private' in config
        assert f';pin-value={token.pin}"' in config  # the guide's design: nginx reads the PIN from its config...
        assert stat.S_IMODE((workdir / "nginx.conf").stat().st_mode) == 0o600  # ...which only root reads
        assert "init = 1" in (workdir / "openssl.cnf").read_text()
    finally:
        stopped = _stop_and_check(setup, workdir, known, "nginx-pkcs11.sh --stop (SIGQUIT)")
    # --stop put back what the start changed for the workers.
    assert _modes(setup.hsm.tokendir, token.directory) == before
    assert not (workdir / "token-access").exists()
    if os.geteuid() == 0:
        assert "restored the group and mode of" in stopped.stdout


def test_nginx_checks_the_certificate_without_a_public_key_object(setup: Setup) -> None:
    """Without the public-key object, the script reads the public part of the private key through the engine: a
    certificate for another key is still refused (the check fails closed), the right one is served."""
    token = setup.hsm.token()
    key = setup.keys["RSA"]
    assert provision(setup, [keys_line(token, key, "RSAKEY")]).returncode == 0
    deleted = subprocess.run(
        ["pkcs11-tool", "--module", setup.hsm.module, "--token-label", token.label, "--login", "--pin",
         "env:TEST_PIN", "--delete-object", "--type", "pubkey", "--label", "RSAKEY"],
        capture_output=True, text=True, check=False,
        env={**os.environ, "SOFTHSM2_CONF": str(setup.hsm.conf), "TEST_PIN": token.pin},
    )  # fmt: skip
    assert deleted.returncode == 0, deleted.stderr
    with session(setup, token) as opened:
        assert [o[Attribute.CLASS] for o in objects(opened, "RSAKEY")] == [ObjectClass.PRIVATE_KEY]
    cert, wrong = setup.root / "nginx-cert-nopub.pem", setup.root / "nginx-wrong-nopub.pem"
    reported = _certify(setup, key, cert)
    _certificate(rsa.generate_private_key(65537, 2048), wrong)
    workdir = setup.root / "nginx-nopub"
    port = free_port()

    def start(certificate: Path) -> subprocess.CompletedProcess[str]:
        return nginx.run_script(
            "--port", str(port), "--cert", str(certificate), "--token", token.label, "--object", "RSAKEY",
            "--pin-env", "NGINX_TEST_PIN", "--module", setup.hsm.module, "--workdir", str(workdir),
            "--softhsm-conf", str(setup.hsm.conf), env={"NGINX_TEST_PIN": token.pin},
        )  # fmt: skip

    refused = start(wrong)
    assert refused.returncode == 1
    assert f"the certificate {wrong} is not for the key RSAKEY in the token {token.label}" in refused.stderr
    known: list[int] = []
    result = start(cert)
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"matches the private key RSAKEY (through the pkcs11 engine) in the token {token.label}" in result.stdout
        known = nginx.nginx_pids(workdir)
        served, _ = nginx.served_certificate(port, _workload_ca(setup))
        assert _spki(served) == reported
        master = int((workdir / "logs" / "nginx.pid").read_text())
        assert b"NGINX_TEST_PIN" not in Path(f"/proc/{master}/environ").read_bytes()  # --pin-env: not inherited
    finally:
        _stop_and_check(setup, workdir, known)


def test_nginx_refuses_a_token_without_the_key(setup: Setup) -> None:
    token = setup.hsm.token()
    cert = setup.root / "nginx-cert-missing.pem"
    _certificate(setup.keys["RSA"].private, cert)
    workdir = setup.root / "nginx-missing"
    result = nginx.run_script(
        "--port", str(free_port()), "--cert", str(cert), "--token", token.label, "--object", "RSAKEY", "--pin",
        token.pin, "--module", setup.hsm.module, "--workdir", str(workdir), "--softhsm-conf", str(setup.hsm.conf),
    )  # fmt: skip
    assert result.returncode != 0
    # --pin still works, with a warning: the PIN is on the command line, which every local user can read.
    assert "warning: --pin puts the PIN on the command line, visible to every local user" in result.stderr
    assert (
        f"nginx: the token {token.label} has no private key RSAKEY; run keybroker-client provision first"
        in result.stderr
    )
    assert nginx.nginx_pids(workdir) == []
    assert not (workdir / "logs" / "nginx.pid").exists()


@pytest.mark.parametrize("case", ["cert", "module", "workdir", "token"])
def test_nginx_refuses_values_that_would_break_its_configuration(tmp_path: Path, case: str) -> None:
    """Whatever the script writes into nginx.conf or openssl.cnf is refused (exit 2) unless plain: a certificate
    behind a symbolic link whose target holds ';' and newlines (which, written into "ssl_certificate PATH;", would
    add an access_log directive that nginx, as root, creates), such a module, work directory or token label.
    Nothing is created: not the work directory, not the file the injected directive names."""
    base = tmp_path / "base"
    base.mkdir()
    base.chmod(0o755)
    out = base / "out"
    out.mkdir()
    injected = f"x;\naccess_log {out}/OUT;\n#z"
    cert = base / "cert.pem"
    module = base / "libsofthsm2.so"
    workdir = base / "nginx"
    token = "KMS"
    if case == "cert":  # the link's target, as nginx.conf would have named it: "BASE/x;⏎access_log OUT;⏎#z/cert.pem"
        target = Path(f"{base}/{injected}/cert.pem")
        target.parent.mkdir(parents=True)
        _certificate(rsa.generate_private_key(65537, 2048), target)
        cert.symlink_to(target)
        refused = f"nginx: refusing --cert {cert}: its path "
    else:
        _certificate(rsa.generate_private_key(65537, 2048), cert)
        refused = {
            "module": f"nginx: refusing --module {module}: its path ",
            "workdir": "nginx: refusing --workdir $'" + f"{base}/{injected}".replace("\n", "\\n") + "': its path ",
            "token": "nginx: refusing --token $'KMS\\naccess_log': it holds a control character",
        }[case]
    if case == "module":
        target = Path(f"{base}/{injected}/libsofthsm2.so")
        target.parent.mkdir(parents=True)
        shutil.copy(module_path(), target)
        module.symlink_to(target)
    else:
        module.symlink_to(module_path())
    if case == "workdir":
        workdir = Path(f"{base}/{injected}")
    if case == "token":
        token = "KMS\naccess_log"
    result = nginx.run_script(
        "--port", str(free_port()), "--cert", str(cert), "--token", token, "--pin-env", "NGINX_TEST_PIN",
        "--module", str(module), "--workdir", str(workdir), env={"NGINX_TEST_PIN": "1234"},
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert refused in result.stderr
    if case != "token":
        assert "may only hold letters, digits and . _ / + -" in result.stderr
    assert not (out / "OUT").exists()
    assert not workdir.exists()
    assert nginx.nginx_pids(workdir) == []


ROOT_ONLY = pytest.mark.skipif(
    os.geteuid() != 0, reason="as root only: the workers run as nobody and the script changes the token's permissions"
)
NOBODY = 65534


def _nginx_token(setup: Setup, name: str) -> tuple[Token, Path]:
    """A fresh token holding the RSA key as RSAKEY, and keybroker's certificate for it."""
    token = setup.hsm.token()
    key = setup.keys["RSA"]
    assert provision(setup, [keys_line(token, key, "RSAKEY")]).returncode == 0
    cert = setup.root / f"nginx-cert-{name}.pem"
    _certify(setup, key, cert)
    return token, cert


def _start(setup: Setup, token: Token, cert: Path, workdir: Path, port: int = 0) -> subprocess.CompletedProcess[str]:
    return nginx.run_script(
        "--port", str(port or free_port()), "--cert", str(cert), "--token", token.label, "--object", "RSAKEY",
        "--pin-env", "NGINX_TEST_PIN", "--module", setup.hsm.module, "--workdir", str(workdir),
        "--softhsm-conf", str(setup.hsm.conf), env={"NGINX_TEST_PIN": token.pin},
    )  # fmt: skip


def _ident(path: Path) -> str:
    info = path.stat()
    return f"{info.st_dev}:{info.st_ino}"


@ROOT_ONLY
def test_nginx_stop_ignores_planted_entries_in_the_record(setup: Setup) -> None:
    """--stop changes back only what the start changed: entries for files outside the token directory, in the old
    format (no device and inode) or that would add permissions are ignored; the real ones are put back exactly."""
    token, cert = _nginx_token(setup, "planted")
    assert token.directory is not None
    victim = setup.root / "victim-planted"
    victim.write_text("a file of root's\n")
    victim.chmod(0o644)
    before = _modes(setup.hsm.tokendir, token.directory)
    workdir = setup.root / "nginx-planted"
    record = workdir / "token-access"
    known: list[int] = []
    result = _start(setup, token, cert, workdir)
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        known = nginx.nginx_pids(workdir)
        assert stat.S_IMODE(workdir.stat().st_mode) == 0o700
        assert stat.S_IMODE(record.stat().st_mode) == 0o600
        granted = next(line.split("\t")[3] for line in record.read_text().splitlines() if line.startswith("was\t"))
        token_object = token.directory / "token.object"
        planted = [
            f"was\t4777\t0\t{granted}\t{_ident(victim)}\t{victim}",  # outside the token directory
            f"was\t4777\t0\t{granted}\t{_ident(victim)}\t{token.directory}/../../../{victim.name}",  # out by ..
            f"was\t4777\t0\t{victim}",  # the record's old format: no device and inode
            f"was\t4777\t0\t{granted}\t{_ident(token_object)}\t{token_object}",  # would add permissions
        ]
        with record.open("a") as handle:
            handle.write("\n".join(planted) + "\n")
    finally:
        stopped = _stop_and_check(setup, workdir, known)
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644
    assert victim.stat().st_gid == 0
    assert _modes(setup.hsm.tokendir, token.directory) == before
    assert "restored the group and mode of" in stopped.stdout
    assert f"{victim}: not in the token directory {setup.hsm.tokendir}" in stopped.stderr
    assert f"{victim.name}: not in the token directory {setup.hsm.tokendir}" in stopped.stderr
    assert "ignored a malformed entry" in stopped.stderr
    assert f"{token_object}: mode 4777 would add permissions" in stopped.stderr
    assert "ignored 4 entries" in stopped.stderr
    assert not record.exists()


@ROOT_ONLY
def test_nginx_as_root_refuses_a_token_directory_others_can_swap(setup: Setup) -> None:
    """A token whose directory is in a directory that others can write to (0777, not sticky): they could rename the
    token's directory and swap in one of theirs between the checks and the chgrp/chmod, so the start is refused before
    anything is changed. The same token, once that directory is 0755, is served (and --stop puts everything back)."""
    open_dir = setup.root / f"open-{uuid.uuid4().hex[:8]}"
    saved_conf = os.environ.get("SOFTHSM2_CONF")
    try:
        hsm = SoftHsm(open_dir / "hsm")  # its own SOFTHSM2_CONF: tokens in OPEN/hsm/tokens
    finally:
        if saved_conf is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = saved_conf
    other = replace(setup, hsm=hsm)
    token, cert = _nginx_token(other, "open")
    assert token.directory is not None
    open_dir.chmod(0o777)
    before = _modes(hsm.tokendir, token.directory)
    workdir = setup.root / "nginx-open"
    result = _start(other, token, cert, workdir)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"cannot give the workers access to the token's directory {token.directory} safely: {open_dir} is " \
        "writable by group or others (mode 777)" in result.stderr  # fmt: skip
    assert "use --user root" in result.stderr
    assert _modes(hsm.tokendir, token.directory) == before
    assert not (workdir / "token-access").exists()
    assert not (workdir / "nginx.conf").exists()
    assert nginx.nginx_pids(workdir) == []

    open_dir.chmod(0o755)
    known: list[int] = []
    result = _start(other, token, cert, workdir)
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        known = nginx.nginx_pids(workdir)
        assert _modes(hsm.tokendir, token.directory) != before
        nginx.served_certificate(int((workdir / "nginx.conf").read_text().split("listen 127.0.0.1:")[1].split()[0]),
                                 _workload_ca(setup))  # fmt: skip
    finally:
        _stop_and_check(setup, workdir, known)
    assert _modes(hsm.tokendir, token.directory) == before


@ROOT_ONLY
def test_nginx_stop_keeps_the_record_of_what_it_could_not_restore(tmp_path: Path) -> None:
    """--stop fails closed: an entry whose file is another one now (another inode at that name) or in another group
    is left alone, and stays in the record (the only entry left there), and --stop exits non-zero, every time, until
    someone puts it back by hand and removes the record. What could be put back is; a file that is gone is no loss."""
    base = tmp_path / "base"
    base.mkdir()
    base.chmod(0o755)
    token_dir = base / "tokens" / "token"
    token_dir.mkdir(parents=True)
    workdir = base / "nginx"
    workdir.mkdir(mode=0o700)
    record = workdir / "token-access"
    lines = [f"needs\t{base / 'tokens'}", f"needs\t{token_dir}"]
    files = {name: token_dir / name for name in ("restored", "replaced", "regrouped", "gone")}
    entries = {}
    for name, path in files.items():  # as the start leaves them: group NOBODY given read access
        path.write_text(name)
        os.chown(path, -1, NOBODY)
        path.chmod(0o640)
        entries[name] = f"was\t600\t0\t{NOBODY}\t{_ident(path)}\t{path}"
    record.write_text("\n".join(lines + list(entries.values())) + "\n")
    fresh = token_dir / "fresh"  # another file (another inode) at the name "replaced", same group and mode
    fresh.write_text("replaced")
    os.chown(fresh, -1, NOBODY)
    fresh.chmod(0o640)
    fresh.replace(files["replaced"])
    os.chown(files["regrouped"], -1, 0)
    files["gone"].unlink()

    stopped = nginx.stop(workdir)
    assert stopped.returncode == 1, stopped.stdout + stopped.stderr
    assert f"could not restore {files['replaced']}: it is another file" in stopped.stderr
    assert f"could not restore {files['regrouped']}: its group changed since" in stopped.stderr
    assert f"could not restore 2 entries of {record} (see above): kept in it" in stopped.stderr
    assert "restored the group and mode of 1 token file" in stopped.stdout
    assert record.read_text() == "\n".join([*lines, entries["replaced"], entries["regrouped"]]) + "\n"
    info = files["restored"].stat()
    assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o600, 0)
    for name in ("replaced", "regrouped"):  # left alone
        assert stat.S_IMODE(files[name].stat().st_mode) == 0o640
    kept = record.read_text()
    again = nginx.stop(workdir)
    assert again.returncode == 1
    assert record.read_text() == kept
    record.unlink()  # what the message asks for, once the files are checked
    assert nginx.stop(workdir).returncode == 0


@ROOT_ONLY
@pytest.mark.parametrize("case", ["owned by nobody", "group-writable", "world-writable", "parent", "symlink"])
def test_nginx_as_root_refuses_a_work_directory_others_can_change(tmp_path: Path, case: str) -> None:
    """A work directory another user owns, or can write to (or could swap, through a directory above it or their
    own symbolic link), is refused before anything is written in it; --stop does not act on a record in it."""
    base = tmp_path / "base"  # root's, 0755, under pytest's root-only directory
    base.mkdir()
    base.chmod(0o755)
    workdir, given = base / "nginx", base / "nginx"
    if case == "owned by nobody":
        workdir.mkdir()
        os.chown(workdir, NOBODY, -1)
        reason = f"{workdir} is owned by nobody, not by root"
    elif case in ("group-writable", "world-writable"):
        mode = 0o770 if case == "group-writable" else 0o777
        workdir.mkdir()
        workdir.chmod(mode)
        reason = f"{workdir} is writable by group or others (mode {mode:o})"
    elif case == "parent":  # a directory above it that others can write to (and not sticky)
        (base / "open").mkdir()
        (base / "open").chmod(0o777)
        workdir = given = base / "open" / "nginx"
        reason = f"{base / 'open'} is writable by group or others (mode 777)"
    else:  # another user's symbolic link in a sticky directory, to a directory of root's
        (base / "sticky").mkdir()
        (base / "sticky").chmod(0o1777)
        workdir.mkdir(mode=0o700)
        given = base / "sticky" / "nginx"
        given.symlink_to(workdir)
        os.lchown(given, NOBODY, -1)
        reason = f"the way to it goes through {given}, a symbolic link owned by nobody, not by root"
    cert = tmp_path / "cert.pem"
    _certificate(rsa.generate_private_key(65537, 2048), cert)
    result = nginx.run_script(
        "--port", str(free_port()), "--cert", str(cert), "--pin-env", "NGINX_TEST_PIN", "--workdir", str(given),
        env={"NGINX_TEST_PIN": "1234"},
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"nginx: refusing the work directory {workdir}: {reason}." in result.stderr
    if case == "parent":
        assert not workdir.exists()
    else:
        assert list(workdir.iterdir()) == []  # nothing written in it
    # A record planted there for a file in a "token directory" of the planter's choosing, restoring a mode that
    # only takes permissions away (so only the work directory's check stops it): --stop leaves it alone.
    workdir.mkdir(exist_ok=True)
    victim = base / "tokens" / "token" / "file"
    victim.parent.mkdir(parents=True)
    victim.write_text("x")
    victim.chmod(0o644)
    (workdir / "token-access").write_text(
        f"needs\t{base / 'tokens'}\nneeds\t{victim.parent}\nwas\t600\t0\t0\t{_ident(victim)}\t{victim}\n"
    )
    stopped = nginx.stop(given)
    assert stopped.returncode == 1
    assert f"not restoring what {workdir}/token-access records: {reason}" in stopped.stderr
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644
    # The same record in a work directory of root's alone is acted on: the check above is what refused it.
    trusted = base / "trusted"
    trusted.mkdir(mode=0o700)
    (workdir / "token-access").rename(trusted / "token-access")
    assert nginx.stop(trusted).returncode == 0
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600


@ROOT_ONLY
def test_nginx_stop_leaves_the_record_only_to_a_root_nginx_in_a_root_work_directory(setup: Setup) -> None:
    """Another user's process named nginx, naming a work directory of theirs with a record for the same token
    directory, does not get the restore job: --stop puts the permissions back at once. A second nginx of this script
    (root, root work directory) on the same token does get it, and its own --stop puts everything back."""
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.skip("no /usr/bin/python3 for the impostor")
    token, cert = _nginx_token(setup, "heir")
    assert token.directory is not None
    before = _modes(setup.hsm.tokendir, token.directory)
    impostor_dir = setup.root / "nginx-impostor"
    impostor_dir.mkdir()
    (impostor_dir / "token-access").write_text(f"needs\t{setup.hsm.tokendir}\n")
    program = impostor_dir / "nginx"  # comm "nginx", command line "... -c IMPOSTOR_DIR/nginx.conf"
    program.write_text(f"#!{python}\nimport time\ntime.sleep(120)\n")
    program.chmod(0o755)
    for path in (impostor_dir, impostor_dir / "token-access", program):
        os.chown(path, NOBODY, -1)
    impostor = subprocess.Popen(
        [str(program), "-c", f"{impostor_dir}/nginx.conf"], user=NOBODY, group=NOBODY, extra_groups=[]
    )
    first, second = setup.root / "nginx-heir-1", setup.root / "nginx-heir-2"
    known: dict[Path, list[int]] = {first: [], second: []}
    try:
        deadline = time.monotonic() + 10
        while f"{impostor_dir}/nginx.conf".encode() not in Path(f"/proc/{impostor.pid}/cmdline").read_bytes():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert Path(f"/proc/{impostor.pid}/comm").read_text().strip() == "nginx"
        started = _start(setup, token, cert, first)
        assert started.returncode == 0, started.stdout + started.stderr
        known[first] = nginx.nginx_pids(first)
        stopped = _stop_and_check(setup, first, known[first])
        assert "left its permissions" not in stopped.stdout
        assert "restored the group and mode of" in stopped.stdout
        assert _modes(setup.hsm.tokendir, token.directory) == before
        assert (impostor_dir / "token-access").read_text() == f"needs\t{setup.hsm.tokendir}\n"

        ports = {first: free_port(), second: free_port()}
        for workdir, port in ports.items():
            started = _start(setup, token, cert, workdir, port)
            assert started.returncode == 0, started.stdout + started.stderr
            known[workdir] = nginx.nginx_pids(workdir)
        stopped = _stop_and_check(setup, first, known[first])
        assert f"the nginx in {second} uses the same token directory: left its permissions to that one's --stop" in (
            stopped.stdout
        )
        assert _modes(setup.hsm.tokendir, token.directory) != before  # the second one's workers still read it
        nginx.served_certificate(ports[second], _workload_ca(setup))
        stopped = _stop_and_check(setup, second, known[second])
        assert "restored the group and mode of" in stopped.stdout
        assert _modes(setup.hsm.tokendir, token.directory) == before
    finally:
        impostor.kill()
        impostor.wait()
        for workdir in (first, second):
            nginx.stop(workdir)  # both, before any check can fail
        for workdir in (first, second):
            _stop_and_check(setup, workdir, known[workdir])


def test_released_key_bytes_are_nowhere_on_disk(setup: Setup) -> None:
    control = Key(str(uuid.uuid4()), os.urandom(32))  # the scan finds bytes that are there
    (setup.root / "control.bin").write_bytes(b"x" + control.material + b"y")
    assert leaked(setup, control) == [str(setup.root / "control.bin")]
    (setup.root / "control.bin").unlink()
    token = setup.hsm.token()
    lines = [
        keys_line(token, setup.keys["RSA"], "RSAKEY"),
        keys_line(token, setup.keys["EC"], "ECKEY"),
        keys_line(token, setup.keys["AES"], "AESKEY", "secret-key"),
    ]
    assert provision(setup, lines).returncode == 0
    assert any(setup.hsm.tokendir.rglob("*.object"))
    for name in ("RSA", "EC", "AES"):
        assert leaked(setup, setup.keys[name]) == [], name
    print("\ntimings: " + json.dumps({k: round(v, 3) for k, v in setup.timings.items()}, indent=1))
