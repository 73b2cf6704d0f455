"""Service CA rotation in-process (``keybroker.ca_rotation``: rotate, activate, retire), each phase checked for
clients that trust only the old CA, only the new one, or the bundle, with two verifiers: Python cryptography's
(``x509.verification``, a webpki-style path builder like Go's and rustls') and OpenSSL (real TLS handshakes in
memory). No cross certificate: published, the new CA issues nothing; activated, it issues everything; retired, the
old CA and its key are gone. Out of order each step is refused with what to run, and changes nothing; repeated it
changes nothing. An expired CA is replaced the same way. (With real server processes: test_ca_rotate.py.)"""

from __future__ import annotations

import contextlib
import ssl
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from sqlalchemy import select, update
from typer.testing import CliRunner

from keybroker import ca_rotation
from keybroker.audit.log import SYSTEM
from keybroker.backends.kek_records import census
from keybroker.ca import ServerCertificate, ServiceCA, fingerprint
from keybroker.cli.main import app
from keybroker.clock import FixedClock
from keybroker.config import load_settings
from keybroker.errors import Conflict, StoredKeyCorrupt
from keybroker.services import Services, build_services, initialise
from keybroker.storage.db import Database
from keybroker.storage.tables import CertificateAuthorityRow
from tests.conftest import NOW

runner = CliRunner()
PEM = serialization.Encoding.PEM


def _certs(pem: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(PEM)


def verified(chain: bytes, trust: bytes, name: str = "localhost", at: datetime = NOW) -> str | None:
    """Python cryptography's verifier: None if ``chain`` (leaf first) verifies to a CA in ``trust``, else why not."""
    leaf, *intermediates = _certs(chain)
    verifier = PolicyBuilder().store(Store(_certs(trust))).time(at).build_server_verifier(x509.DNSName(name))
    try:
        verifier.verify(leaf, intermediates)
    except VerificationError as exc:
        return str(exc)
    return None


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


def expect(served: ServerCertificate, trusts: dict[str, tuple[bytes, bool]], at: datetime = NOW) -> None:
    """Both verifiers agree with the expectation for each client: (what it trusts, whether it must verify)."""
    chain = served.cert_file.read_bytes()
    for who, (trust, ok) in trusts.items():
        by_cryptography, by_openssl = verified(chain, trust, at=at), handshake(served, trust)
        if ok:
            assert (by_cryptography, by_openssl) == (None, None), who
        else:
            assert by_cryptography is not None, f"{who}: cryptography's verifier accepted it"
            assert by_openssl is not None, f"{who}: OpenSSL accepted it"


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


def _state(services: Services) -> tuple[Any, ...]:
    """Every CA row and the audit head (a refused step changes neither)."""
    with services.database.transaction() as session:
        rows = session.scalars(select(CertificateAuthorityRow).order_by(CertificateAuthorityRow.name))
        found = [(row.name, row.cert_pem, row.key_wrapped, row.kek_id) for row in rows]
    return tuple(found), services.audit.head()


def _serve(ca: ServiceCA, clock: FixedClock) -> ServerCertificate:
    """A server certificate as ``serve`` issues it at start, kept apart (the next one overwrites the files)."""
    issued = ca.server_certificate(["localhost"], clock.now(), 30)
    kept = issued.cert_file.parent / f"kept-{uuid.uuid4().hex}"
    kept.mkdir()
    cert, key = kept / "server.pem", kept / "server-key.pem"
    cert.write_bytes(issued.cert_file.read_bytes())
    key.write_bytes(issued.key_file.read_bytes())
    return ServerCertificate(cert, key, issued.key_password)


def _csr() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "svc.example")]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("svc.example")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(PEM).decode()


def test_each_phase_verifies_for_exactly_the_clients_it_should(deployment: tuple[Services, FixedClock]) -> None:
    services, clock = deployment
    ca = services.ca
    old = ca.certificate_pem()
    before = _serve(ca, clock)
    expect(before, {"old only": (old, True)})

    # 1. rotate: the new CA is published beside the old one, which still issues.
    published = ca_rotation.rotate(ca, clock.now(), services.audit, SYSTEM)
    bundle = ca.certificate_pem()
    assert [fingerprint(_pem(c)) for c in _certs(bundle)] == [published.issuing_sha384, published.other_sha384]
    assert fingerprint(bundle) == fingerprint(old)  # clients reading the first certificate keep the old CA
    new = _pem(_certs(bundle)[1])
    assert _certs(new)[0].subject == _certs(old)[0].subject
    phase1 = {"old only": (old, True), "new only": (new, False), "bundle": (bundle, True)}
    expect(_serve(ca, clock), phase1)
    signed = ca.sign_csr(_csr(), clock.now(), 30)
    assert len(_certs(signed)) == 2  # the certificate and the CA that issued it: no cross certificate
    assert [verified(signed, trust, "svc.example") is None for trust in (old, new, bundle)] == [True, False, True]

    # 2. activate: the new CA issues (each replica's certificate at its next start); the bundle does not change.
    activated = ca_rotation.activate(ca, services.audit, SYSTEM)
    assert (activated.issuing_sha384, activated.other_sha384) == (published.other_sha384, published.issuing_sha384)
    assert ca.certificate_pem() == bundle
    expect(before, {"bundle, a replica not restarted yet": (bundle, True)})
    phase2 = {"old only": (old, False), "new only": (new, True), "bundle": (bundle, True)}
    expect(_serve(ca, clock), phase2)
    signed = ca.sign_csr(_csr(), clock.now(), 30)
    assert [verified(signed, trust, "svc.example") is None for trust in (old, new, bundle)] == [False, True, True]

    # 3. retire: the old CA leaves the bundle, its key is deleted.
    retired = ca_rotation.retire(ca, services.audit, SYSTEM)
    assert (retired.issuing_sha384, retired.other_sha384) == (activated.issuing_sha384, None)
    assert ca.certificate_pem() == new
    assert ca.rows().old is None
    assert census(services.database).own["CA keys"].total() == 2  # the service and the workload CA: no old key
    expect(_serve(ca, clock), {"old only": (old, False), "new only": (new, True), "bundle": (bundle, True)})

    audited = [(e["action"], e["details"]) for e in services.audit.entries() if e["target"] == "ca:service"]
    assert audited == [
        ("ca.rotate", {"issuing_sha384": published.issuing_sha384, "sha384": published.other_sha384}),
        ("ca.activate", {"sha384": published.other_sha384, "previous_sha384": published.issuing_sha384}),
        ("ca.retire", {"retired_sha384": published.issuing_sha384, "sha384": published.other_sha384}),
    ]


def test_steps_out_of_order_are_refused_and_repeated_ones_change_nothing(
    deployment: tuple[Services, FixedClock],
) -> None:
    services, clock = deployment
    ca, audit = services.ca, services.audit

    def refused(step: Callable[[], object], code: str, says: str) -> None:
        before = _state(services)
        with pytest.raises(Conflict) as caught:
            step()
        assert caught.value.instance_code == code
        assert says in caught.value.detail
        assert _state(services) == before

    refused(lambda: ca_rotation.activate(ca, audit, SYSTEM), "no_ca_rotation", "run 'keybroker ca rotate' first")
    refused(lambda: ca_rotation.retire(ca, audit, SYSTEM), "no_ca_rotation", "no predecessor to retire")
    first = ca_rotation.rotate(ca, clock.now(), audit, SYSTEM)
    state = _state(services)
    again = ca_rotation.rotate(ca, clock.now(), audit, SYSTEM)
    assert again.done_before
    assert (again.issuing_sha384, again.other_sha384) == (first.issuing_sha384, first.other_sha384)
    assert _state(services) == state
    refused(lambda: ca_rotation.retire(ca, audit, SYSTEM), "ca_not_activated", "run 'keybroker ca activate' first")
    ca_rotation.activate(ca, audit, SYSTEM)
    state = _state(services)
    assert ca_rotation.activate(ca, audit, SYSTEM).done_before
    assert _state(services) == state
    refused(
        lambda: ca_rotation.rotate(ca, clock.now(), audit, SYSTEM),
        "ca_rotation_in_progress",
        "run 'keybroker ca retire' first",
    )
    ca_rotation.retire(ca, audit, SYSTEM)
    refused(lambda: ca_rotation.retire(ca, audit, SYSTEM), "no_ca_rotation", "no predecessor to retire")
    assert ca_rotation.rotate(ca, clock.now(), audit, SYSTEM).done_before is False  # a next rotation may begin


def test_a_step_that_lost_a_race_changes_nothing(deployment: tuple[Services, FixedClock]) -> None:
    services, clock = deployment
    ca, audit = services.ca, services.audit
    other = ServiceCA(services.database, ca.wrapper, services.settings.data_dir)
    ca_rotation.rotate(ca, clock.now(), audit, SYSTEM)
    real_opens = ServiceCA.opens

    def opens_while_another_activates(self: ServiceCA, row: CertificateAuthorityRow) -> None:
        real_opens(self, row)
        if self is ca:  # between reading the rows and switching them, another operator activates
            ca_rotation.activate(other, audit, SYSTEM)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ServiceCA, "opens", opens_while_another_activates)
        with pytest.raises(Conflict, match="changed meanwhile") as lost:
            ca_rotation.activate(ca, audit, SYSTEM)
    assert lost.value.instance_code == "ca_changed"
    actions = [e["action"] for e in audit.entries() if e["target"] == "ca:service"]
    assert actions == ["ca.rotate", "ca.activate"]
    assert ca.rows().next is None


class _Racing:
    """The deployment's database, with one thing done by another process right after the first transaction."""

    def __init__(self, database: Database, then: Callable[[], object]) -> None:
        self._database, self._then = database, then

    @contextlib.contextmanager
    def transaction(self, write: bool = False) -> Iterator[Any]:
        with self._database.transaction(write) as session:
            yield session
        then, self._then = self._then, lambda: None
        then()


def test_a_certificate_is_chained_with_the_ca_that_issued_it_when_the_ca_changes_meanwhile(
    deployment: tuple[Services, FixedClock],
) -> None:
    services, clock = deployment
    ca_rotation.rotate(services.ca, clock.now(), services.audit, SYSTEM)
    other = services.ca

    def activate() -> None:
        ca_rotation.activate(other, services.audit, SYSTEM)

    racing = ServiceCA(_Racing(services.database, activate), other.wrapper, services.settings.data_dir)  # type: ignore[arg-type]  # a Database with a hook
    leaf, issuer = _certs(racing.sign_csr(_csr(), clock.now(), 30))
    leaf.verify_directly_issued_by(issuer)  # the CA of its chain signed it
    assert services.ca.rows().old is not None  # (the activation did happen meanwhile)


def test_a_ca_row_holding_another_rows_key_is_refused(deployment: tuple[Services, FixedClock]) -> None:
    """Rows of one CA share its wrap context: a key moved to another row (by someone with write access to the
    database) is caught by the certificate it does not match."""
    services, clock = deployment
    ca_rotation.rotate(services.ca, clock.now(), services.audit, SYSTEM)
    rows = services.ca.rows()
    assert rows.issuing is not None
    assert rows.next is not None
    with services.database.transaction(write=True) as session:
        table = CertificateAuthorityRow
        session.execute(update(table).where(table.name == "service").values(key_wrapped=rows.next.key_wrapped))
    with pytest.raises(StoredKeyCorrupt) as refused:
        ServiceCA(services.database, services.ca.wrapper, services.settings.data_dir).server_certificate(
            ["localhost"], clock.now(), 30
        )
    assert refused.value.instance_code == "ca_key_mismatch"


@pytest.mark.parametrize(
    ("age", "says"), [(timedelta(days=3651), "expired at"), (timedelta(days=3650) - timedelta(minutes=4), "expires at")]
)
def test_an_expired_ca_is_replaced_by_rotating_and_activating_at_once(
    tmp_path: Path, age: timedelta, says: str
) -> None:
    settings = load_settings(data_dir=tmp_path / "data")
    initialise(settings, FixedClock(NOW - age))
    clock = FixedClock(NOW)
    services = build_services(settings, clock)
    try:
        ca = services.ca
        with pytest.raises(Conflict) as expired:
            ca.server_certificate(["localhost"], clock.now(), 30)
        assert expired.value.instance_code == "ca_expired"
        assert says in expired.value.detail
        assert expired.value.detail.endswith(
            "rotate it: keybroker ca rotate, then keybroker ca activate (docs/operations.md)"
        )
        ca_rotation.rotate(ca, clock.now(), services.audit, SYSTEM)
        with pytest.raises(Conflict, match=says):  # published only: the expired CA still issues
            ca.sign_csr(_csr(), clock.now(), 30)
        ca_rotation.activate(ca, services.audit, SYSTEM)
        new = _pem(_certs(ca.certificate_pem())[1])
        expect(_serve(ca, clock), {"new only": (new, True)})
        ca_rotation.retire(ca, services.audit, SYSTEM)
    finally:
        services.close()


def test_the_commands_on_an_expired_ca(tmp_path: Path) -> None:
    data = tmp_path / "data"
    initialise(load_settings(data_dir=data), FixedClock(NOW - timedelta(days=3651)))
    for command in ("rotate", "activate", "retire"):
        done = runner.invoke(app, ["ca", command, "--data-dir", str(data)])
        assert done.exit_code == 0, done.output
        assert "Traceback" not in done.output
    assert len(_certs((data / "ca.pem").read_bytes())) == 1


def test_the_commands_publish_the_bundle_then_the_new_ca_alone(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert runner.invoke(app, ["init", "--data-dir", str(data)]).exit_code == 0
    old = (data / "ca.pem").read_bytes()
    early = runner.invoke(app, ["ca", "activate", "--data-dir", str(data)])
    assert early.exit_code == 1
    assert early.output.startswith("Error: the service CA has no new CA to activate: run 'keybroker ca rotate' first")

    rotated = runner.invoke(app, ["ca", "rotate", "--data-dir", str(data)])
    assert rotated.exit_code == 0, rotated.output
    bundle = (data / "ca.pem").read_bytes()
    assert bundle.startswith(old)
    assert len(_certs(bundle)) == 2
    new_pin = fingerprint(_pem(_certs(bundle)[1]))
    assert f"new service CA:   SHA-384 {new_pin}" in rotated.output
    assert f"issuing CA (old): SHA-384 {fingerprint(old)}" in rotated.output
    pins = runner.invoke(app, ["ca", "fingerprint", "--data-dir", str(data)])
    assert pins.stdout.split() == [fingerprint(old), new_pin]  # both, to pin together across the switch
    again = runner.invoke(app, ["ca", "rotate", "--data-dir", str(data)])
    assert again.exit_code == 0, again.output
    assert "published already; nothing was changed" in again.output
    assert (data / "ca.pem").read_bytes() == bundle
    early = runner.invoke(app, ["ca", "retire", "--data-dir", str(data)])
    assert early.exit_code == 1
    assert "run 'keybroker ca activate' first" in early.output.replace("\n", " ")

    activated = runner.invoke(app, ["ca", "activate", "--data-dir", str(data)])
    assert activated.exit_code == 0, activated.output
    assert f"issuing CA (new): SHA-384 {new_pin}" in activated.output
    assert (data / "ca.pem").read_bytes() == bundle
    retired = runner.invoke(app, ["ca", "retire", "--data-dir", str(data)])
    assert retired.exit_code == 0, retired.output
    assert f"retired the CA with SHA-384 {fingerprint(old)} and deleted its key" in retired.output
    assert (data / "ca.pem").read_bytes() == _pem(_certs(bundle)[1])
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
    assert "moved 4 records" in moved.output  # the nonce key and three CA keys: the service CA, its successor, workload
    (data / "keybroker.toml").write_text(to.read_text())
    (data / "master.key").unlink()
    now = FixedClock(datetime.now(UTC))  # (the commands ran with the system's clock)
    services = build_services(load_settings(data_dir=data), now)
    try:
        assert services.ca.certificate_pem() == bundle
        ca_rotation.activate(services.ca, services.audit, SYSTEM)  # the new CA's key opens under the new KEK
        trusts = {"new only": (_pem(_certs(bundle)[1]), True), "old only": (_pem(_certs(bundle)[0]), False)}
        expect(_serve(services.ca, now), trusts, at=now.now())
        ca_rotation.retire(services.ca, services.audit, SYSTEM)
    finally:
        services.close()


def test_the_api_answers_an_expired_ca_with_a_problem(tmp_path: Path) -> None:
    """(No 500: 409 ca_expired from POST /cms/v1/certificates, the service CA's, and from a key's certificate, the
    workload CA's.)"""
    from fastapi.testclient import TestClient

    from keybroker.api.app import create_app
    from tests.conftest import sgx_policy

    settings = load_settings(data_dir=tmp_path / "data")
    initialise(settings, FixedClock(NOW - timedelta(days=3651)))
    services = build_services(settings, FixedClock(NOW))
    try:
        token, _ = services.tokens.issue("admin", ["admin"], [], timedelta(days=1), SYSTEM)
        with TestClient(create_app(services), raise_server_exceptions=False) as api:
            api.headers["Authorization"] = f"Bearer {token}"
            signed = api.post("/cms/v1/certificates", json={"csr": _csr(), "days": 30})
            policy = api.post("/kbs/v1/key-transfer-policies", json=sgx_policy()).json()["id"]
            key = api.post(
                "/kbs/v1/keys",
                json={"key_information": {"algorithm": "EC", "curve_type": "secp256r1"}, "transfer_policy_id": policy},
            ).json()["id"]
            certified = api.post(f"/kbs/v1/keys/{key}/certificate", json={"subject": "CN=web.example", "days": 30})
        for answer, which in ((signed, "service"), (certified, "workload")):
            assert answer.status_code == 409, answer.text
            assert answer.headers["content-type"] == "application/problem+json"
            assert answer.json()["code"] == "ca_expired"
            assert answer.json()["detail"].startswith(f"the {which} CA expired at ")
    finally:
        services.close()
