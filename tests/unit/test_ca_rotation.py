"""Service CA rotation in-process (``ServiceCA.rotate``/``retire``), with real TLS handshakes in memory: during the
transition a server certificate of the new CA verifies for clients that trust only the old CA, only the new one or
the bundle, and pins of the old CA keep matching; after the retirement only the new CA is published and chained, so
a client that trusts only the old CA fails. Refusals (a second rotation, nothing to retire, a concurrent change)
change nothing. (With real server processes: tests/integration/test_ca_rotate.py.)"""

from __future__ import annotations

import ssl
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import select
from typer.testing import CliRunner

from keybroker.audit.log import SYSTEM
from keybroker.ca import ServerCertificate, ServiceCA, fingerprint
from keybroker.cli.main import app
from keybroker.clock import FixedClock
from keybroker.config import load_settings
from keybroker.errors import Conflict
from keybroker.services import Services, build_services, initialise
from keybroker.storage.tables import CertificateAuthorityRow
from tests.conftest import NOW

runner = CliRunner()


def _certs(pem: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem)


def handshake(served: ServerCertificate, trust: bytes) -> str | None:
    """A TLS handshake in memory with a client trusting ``trust``: None if it verifies, else OpenSSL's reason."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(served.cert_file, served.key_file, served.key_password)
    client = ssl.create_default_context(cadata=trust.decode())
    pipes = [ssl.MemoryBIO() for _ in range(4)]
    tls_client = client.wrap_bio(pipes[0], pipes[1], server_hostname="localhost")
    tls_server = server.wrap_bio(pipes[2], pipes[3], server_side=True)
    done = [False, False]
    for _ in range(20):
        for n, end in enumerate((tls_client, tls_server)):
            if not done[n]:
                try:
                    end.do_handshake()
                    done[n] = True
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLCertVerificationError as exc:
                    return str(exc.verify_message)
        pipes[2].write(pipes[1].read())
        pipes[0].write(pipes[3].read())
        if all(done):
            return None
    raise AssertionError("the handshake did not finish")


@pytest.fixture
def deployment(
    tmp_path: Path, database_settings: Callable[[Path], dict[str, Any]]
) -> Iterator[tuple[Services, FixedClock]]:
    settings = load_settings(data_dir=tmp_path / "data", overrides=database_settings(tmp_path / "data"))
    clock = FixedClock(NOW)
    initialise(settings, clock)
    services = build_services(settings, clock)
    yield services, clock
    services.close()


def _row(services: Services) -> tuple[Any, ...]:
    with services.database.transaction() as session:
        row = session.scalars(select(CertificateAuthorityRow).where(CertificateAuthorityRow.name == "service")).one()
        return (row.cert_pem, row.key_wrapped, row.kek_id, row.retiring_pem, row.cross_pem)


def _serve(ca: ServiceCA, clock: FixedClock) -> ServerCertificate:
    """A server certificate as ``serve`` issues it at start, kept apart (the next one overwrites the files)."""
    issued = ca.server_certificate(["localhost"], clock.now(), 30)
    kept = issued.cert_file.parent / f"kept-{uuid.uuid4().hex}"
    kept.mkdir()
    cert, key = kept / "server.pem", kept / "server-key.pem"
    cert.write_bytes(issued.cert_file.read_bytes())
    key.write_bytes(issued.key_file.read_bytes())
    return ServerCertificate(cert, key, issued.key_password)


def test_clients_of_either_ca_verify_until_the_old_one_is_retired(deployment: tuple[Services, FixedClock]) -> None:
    services, clock = deployment
    ca = services.ca
    old = ca.certificate_pem()
    before = _serve(ca, clock)
    assert handshake(before, old) is None

    done = ca.rotate(clock.now(), services.audit, SYSTEM)
    bundle = ca.certificate_pem()
    assert [fingerprint(c.public_bytes(serialization.Encoding.PEM)) for c in _certs(bundle)] == [
        done.old_sha384,
        done.new_sha384,
    ]
    assert fingerprint(bundle) == fingerprint(old) == done.old_sha384  # a pin of the old CA matches the first one
    new = _certs(bundle)[1].public_bytes(serialization.Encoding.PEM)
    assert _certs(bundle)[1].subject == _certs(old)[0].subject  # the same name: the cross certificate is self-issued

    during = _serve(ca, clock)
    chain = _certs(during.cert_file.read_bytes())
    assert chain[1].issuer == chain[1].subject
    assert chain[1].public_key() == _certs(new)[0].public_key()  # the new CA's key, certified by the old CA
    for trust in (old, new, bundle):
        assert handshake(during, trust) is None
    assert handshake(before, bundle) is None  # a replica not restarted yet still serves a certificate of the old CA

    # Certificates for other services (ca issue) chain the same way.
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "svc")]))
        .sign(key, hashes.SHA256())
    )
    signed = _certs(ca.sign_csr(csr.public_bytes(serialization.Encoding.PEM).decode(), clock.now(), 30))
    assert signed[0].issuer == chain[1].subject
    assert signed[1] == chain[1]

    retired = ca.retire(services.audit, SYSTEM)
    assert retired == done.old_sha384
    assert ca.certificate_pem() == new
    after = _serve(ca, clock)
    assert after.cert_file.read_bytes().endswith(new)
    assert handshake(after, new) is None
    assert handshake(after, bundle) is None
    assert handshake(after, old) == "self-signed certificate in certificate chain"

    audited = [(e["action"], e["details"]) for e in services.audit.entries() if e["target"] == "ca:service"]
    assert audited == [
        ("ca.rotate", {"old_sha384": done.old_sha384, "new_sha384": done.new_sha384}),
        ("ca.retire", {"retired_sha384": done.old_sha384, "sha384": done.new_sha384}),
    ]


def test_a_second_rotation_before_the_retirement_is_refused(deployment: tuple[Services, FixedClock]) -> None:
    services, clock = deployment
    services.ca.rotate(clock.now(), services.audit, SYSTEM)
    before, head = _row(services), services.audit.head()
    with pytest.raises(Conflict, match="run 'keybroker ca retire' first") as refused:
        services.ca.rotate(clock.now(), services.audit, SYSTEM)
    assert refused.value.instance_code == "ca_rotation_in_progress"
    assert (_row(services), services.audit.head()) == (before, head)


def test_retiring_without_a_rotation_is_refused(deployment: tuple[Services, FixedClock]) -> None:
    services, _ = deployment
    before, head = _row(services), services.audit.head()
    with pytest.raises(Conflict, match="no predecessor to retire") as refused:
        services.ca.retire(services.audit, SYSTEM)
    assert refused.value.instance_code == "no_ca_rotation"
    assert (_row(services), services.audit.head()) == (before, head)


def test_a_rotation_that_lost_a_race_changes_nothing(
    deployment: tuple[Services, FixedClock], monkeypatch: pytest.MonkeyPatch
) -> None:
    services, clock = deployment
    other = ServiceCA(services.database, services.ca._wrapper, services.settings.data_dir)
    real_wrap = services.ca._wrapper.wrap
    raced: list[bool] = []

    def wrap_while_another_rotates(data: bytes, context: bytes) -> bytes:
        if not raced:  # between reading the CA and writing the new one, another process rotates it
            raced.append(True)
            other.rotate(clock.now(), services.audit, SYSTEM)
        return real_wrap(data, context)

    monkeypatch.setattr(services.ca._wrapper, "wrap", wrap_while_another_rotates)
    with pytest.raises(Conflict, match="changed meanwhile") as refused:
        services.ca.rotate(clock.now(), services.audit, SYSTEM)
    assert refused.value.instance_code == "ca_changed"
    assert [e["action"] for e in services.audit.entries() if e["target"] == "ca:service"] == ["ca.rotate"]


def test_the_commands_publish_the_bundle_then_the_new_ca_alone(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert runner.invoke(app, ["init", "--data-dir", str(data)]).exit_code == 0
    old = (data / "ca.pem").read_bytes()
    rotated = runner.invoke(app, ["ca", "rotate", "--data-dir", str(data)])
    assert rotated.exit_code == 0, rotated.output
    bundle = (data / "ca.pem").read_bytes()
    assert bundle.startswith(old)
    assert len(_certs(bundle)) == 2
    new_pin = fingerprint(_certs(bundle)[1].public_bytes(serialization.Encoding.PEM))
    assert f"new service CA: SHA-384 {new_pin}" in rotated.output
    again = runner.invoke(app, ["ca", "rotate", "--data-dir", str(data)])
    assert again.exit_code == 1
    assert again.output.startswith("Error: the service CA was rotated already")
    assert (data / "ca.pem").read_bytes() == bundle

    retired = runner.invoke(app, ["ca", "retire", "--data-dir", str(data)])
    assert retired.exit_code == 0, retired.output
    assert fingerprint((data / "ca.pem").read_bytes()) == new_pin
    assert len(_certs((data / "ca.pem").read_bytes())) == 1
    nothing = runner.invoke(app, ["ca", "retire", "--data-dir", str(data)])
    assert nothing.exit_code == 1
    assert "has no predecessor to retire" in nothing.output


def test_a_kek_rotation_carries_a_ca_rotation_in_progress(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert runner.invoke(app, ["init", "--data-dir", str(data)]).exit_code == 0
    assert runner.invoke(app, ["ca", "rotate", "--data-dir", str(data)]).exit_code == 0
    bundle = (data / "ca.pem").read_bytes()
    to = tmp_path / "new-kek.toml"
    to.write_text('[backends.embedded]\nwrapper = { type = "local", master_key_file = "master-2.key" }\n')
    moved = runner.invoke(app, ["kek", "rotate", "--to", str(to), "--data-dir", str(data)])
    assert moved.exit_code == 0, moved.output
    (data / "keybroker.toml").write_text(to.read_text())
    (data / "master.key").unlink()
    services = build_services(load_settings(data_dir=data), FixedClock(NOW))
    try:
        assert services.ca.certificate_pem() == bundle
        served = _serve(services.ca, FixedClock(NOW))  # the new CA's key opens under the new KEK
        assert handshake(served, _certs(bundle)[0].public_bytes(serialization.Encoding.PEM)) is None
        services.ca.retire(services.audit, SYSTEM)
    finally:
        services.close()
