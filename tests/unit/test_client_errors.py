"""Where a failed ``fetch_key`` says the failure came from: the evidence provider (``EvidenceError``, with its
cause), the server's answer (``TransportError`` naming what is wrong with it), or TLS set up in a way that cannot
work (``TlsError``, saying what to pass instead). A local mistake is never a ``TransportError``.

The replicas are the in-process fakes of test_client_retry.py (PROTOCOL.md §3 over httpx.MockTransport); the TLS
cases run against real TLS servers in threads of this process (the same hints against a real keybroker process:
tests/integration/test_client_readme.py).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import json
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from keybroker.sim.pki import PlatformSpec, add_platform, init_pki
from keybroker_client import (
    Client,
    EvidenceError,
    PinMismatch,
    ProblemError,
    Retry,
    TlsError,
    TransportError,
    UnwrapError,
)
from keybroker_client import cli as workload_cli
from keybroker_client.evidence import SimulatedEvidence
from tests.conftest import NOW
from tests.unit.test_client_retry import KEY, Behaviour, Evidence, FakeTime, Replicas, _released


def _client(replicas: Replicas, time: FakeTime, attempts: int = 4) -> Client:
    return Client(
        "http://a,http://b",
        transport=httpx.MockTransport(replicas.handle),
        retry=Retry(attempts=attempts),
        clock=time.clock,
        sleep=time.sleep,
    )


class Failing:
    tee_type = "SGX"

    def __init__(self, error: Exception) -> None:
        self.error = error

    def quote(self, report_data: bytes) -> bytes:
        raise self.error


class Returning:
    tee_type = "TDX"

    def __init__(self, value: object) -> None:
        self.value = value

    def quote(self, report_data: bytes) -> bytes:
        return self.value  # type: ignore[return-value]  # a provider that breaks its contract is the test


# --- the evidence provider's failures are its own --------------------------------------------------------------


@pytest.mark.parametrize(
    ("evidence", "message"),
    [
        (Failing(ValueError("bad measurement")), "the evidence provider Failing failed: ValueError: bad measurement"),
        (Failing(TypeError("quote() takes")), "the evidence provider Failing failed: TypeError: quote() takes"),
        (Failing(PermissionError(13, "Permission denied")), "failed: PermissionError: [Errno 13] Permission denied"),
        (Failing(KeyError("mrenclave")), "failed: KeyError: 'mrenclave'"),
        (Returning(b""), "the evidence provider Returning returned no quote"),
        (Returning("a quote"), "the evidence provider Returning returned no quote"),
    ],
)
def test_an_evidence_failure_is_an_evidence_error_not_retried(evidence: object, message: str) -> None:
    replicas, time = Replicas(), FakeTime()
    with _client(replicas, time) as client, pytest.raises(EvidenceError) as caught:
        client.fetch_key("k", evidence)  # type: ignore[arg-type]  # the fakes above are providers
    assert message in str(caught.value)
    assert not isinstance(caught.value, TransportError)
    if isinstance(evidence, Failing):
        assert caught.value.__cause__ is evidence.error  # the provider's traceback is kept
    assert replicas.calls in ([("a", "nonce")], [("b", "nonce")])  # one nonce, no transfer, no retry
    assert time.pauses == []


def test_a_provider_s_own_keybroker_error_passes_through() -> None:
    own = TransportError("the quoting service at https://qs is down")
    with _client(Replicas(), FakeTime()) as client, pytest.raises(TransportError) as caught:
        client.fetch_key("k", Failing(own))
    assert caught.value is own


def test_the_readme_s_simulated_evidence_with_a_hex_mrenclave_is_sent(tmp_path: Path) -> None:
    """The report of issue #15: a hex ``mrenclave`` ended as ``TransportError: unexpected answer ...: TypeError``."""
    pki = init_pki(tmp_path / "sim", NOW - timedelta(days=1))
    add_platform(pki, PlatformSpec(), NOW - timedelta(days=1))
    quotes: list[bytes] = []

    def record(step: str, body: dict[str, object]) -> httpx.Response | None:
        if step == "transfer":
            quotes.append(base64.b64decode(str(body["quote"])))
        return None

    replicas = Replicas(fail={"a": record, "b": record})
    with _client(replicas, FakeTime()) as client:
        released = client.fetch_key("k", SimulatedEvidence(tmp_path / "sim", "sgx", mrenclave="ab" * 32))
    assert released.key == KEY
    assert quotes[0][48 + 64 : 48 + 96] == b"\xab" * 32  # MRENCLAVE in the quote sent


# --- the server's answers --------------------------------------------------------------------------------------


def _answer(step: str, answer: httpx.Response) -> Behaviour:
    return lambda at, body: answer if at == step else None


def _transfer_answer(change: dict[str, object]) -> Behaviour:
    def failure(step: str, body: dict[str, object]) -> httpx.Response | None:
        if step != "transfer":
            return None
        return httpx.Response(200, json={**_released(body), **change})  # type: ignore[arg-type]  # the test's JSON

    return failure


@pytest.mark.parametrize(
    ("behaviour", "message"),
    [
        (_answer("nonce", httpx.Response(200, text="<html>")), "did not answer with a nonce: the body is not JSON"),
        (_answer("nonce", httpx.Response(200, json=[1])), "did not answer with a nonce: not a JSON object"),
        (_answer("nonce", httpx.Response(200, json={"val": "AA=="})), "did not answer with a nonce: no iat, signature"),
        (
            _answer("nonce", httpx.Response(200, json={"val": "!!", "iat": "AA==", "signature": "s"})),
            "answered with a nonce whose val is not base64",
        ),
        (_answer("transfer", httpx.Response(200, json={})), "did not answer with a released key: no wrapped_key"),
        (_transfer_answer({"wrapped_swk": 5}), "did not answer with a released key: no wrapped_swk"),
        (_transfer_answer({"wrapped_key": "not base64"}), "a released key whose wrapped_key is not base64"),
    ],
)
def test_an_answer_that_is_not_the_protocol_s_is_a_transport_error_naming_it(
    behaviour: Behaviour, message: str
) -> None:
    replicas = Replicas(fail={"a": behaviour, "b": behaviour})
    with _client(replicas, FakeTime(), attempts=1) as client, pytest.raises(TransportError) as caught:
        client.fetch_key("k", Evidence())
    assert message in str(caught.value)
    assert "unexpected answer" not in str(caught.value)


def test_a_passport_answer_without_a_token() -> None:
    def no_token(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/appraisal/v1/attest":
            return httpx.Response(200, json={"jwt": "x"})
        nonce = base64.b64encode(b"n").decode()
        return httpx.Response(200, json={"val": nonce, "iat": nonce, "signature": "s"})

    with (
        Client("http://a", transport=httpx.MockTransport(no_token), retry=Retry(attempts=1)) as client,
        pytest.raises(TransportError, match="http://a did not answer with a token: no token"),
    ):
        client.fetch_key("k", Evidence(), mode="passport")


def test_a_key_that_does_not_unwrap_is_an_unwrap_error() -> None:
    swk = base64.b64encode(bytes(384)).decode()
    replicas = Replicas(fail={"a": _transfer_answer({"wrapped_swk": swk}), "b": _transfer_answer({"wrapped_swk": swk})})
    with _client(replicas, FakeTime(), attempts=1) as client, pytest.raises(UnwrapError) as caught:
        client.fetch_key("k", Evidence())
    assert not isinstance(caught.value, TransportError)


# --- TLS that cannot work says what to do ----------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(directory: Path, name: str) -> tuple[Path, x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = directory / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, cert, key


def _server_files(directory: Path, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_file, key_file = directory / "server.pem", directory / "server.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


class _NotFound(BaseHTTPRequestHandler):
    ca_pem = b""  # served at /cms/v1/ca-certificates, as keybroker does (for pinning)

    def do_GET(self) -> None:
        if self.path != "/cms/v1/ca-certificates":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("content-type", "application/x-pem-file")
        self.send_header("content-length", str(len(self.ca_pem)))
        self.end_headers()
        self.wfile.write(self.ca_pem)

    def do_POST(self) -> None:  # the nonce step of a key that does not exist: the CA was right
        self.rfile.read(int(self.headers.get("content-length", 0)))
        body = json.dumps({"status": 404, "code": "key_not_found", "title": "Not found", "detail": "no key"}).encode()
        self.send_response(404)
        self.send_header("content-type", "application/problem+json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass
class Servers:
    tls_port: int
    plain_port: int
    ca: Path  # the CA of the TLS server's certificate
    other_ca: Path  # another CA


def _serve(server: ThreadingHTTPServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    directory = tmp_path_factory.mktemp("tls")
    ca_file, ca, ca_key = _ca(directory, "ca")
    other, _, _ = _ca(directory, "other")
    cert_file, key_file = _server_files(directory, ca, ca_key)
    _NotFound.ca_pem = ca_file.read_bytes()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    tls = ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    tls.socket = context.wrap_socket(tls.socket, server_side=True)
    plain = ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    threads = [_serve(tls), _serve(plain)]
    try:
        yield Servers(tls.server_address[1], plain.server_address[1], ca_file, other)
    finally:
        for server in (tls, plain):
            server.shutdown()
            server.server_close()
        for thread in threads:
            thread.join(timeout=5)


def _fetch(url: str, **kwargs: object) -> Exception:
    time = FakeTime()
    with (
        Client(url, retry=Retry(attempts=4), clock=time.clock, sleep=time.sleep, **kwargs) as client,  # type: ignore[arg-type]  # ca= only
        pytest.raises((ProblemError, TransportError)) as caught,
    ):
        client.fetch_key("k", Evidence())
    assert time.pauses == [] or not isinstance(caught.value, TlsError)  # a TlsError is never retried
    return caught.value


def test_the_right_ca_reaches_the_server(servers: Servers) -> None:
    refused = _fetch(f"https://127.0.0.1:{servers.tls_port}", ca=servers.ca)
    assert isinstance(refused, ProblemError)
    assert refused.code == "key_not_found"


def test_no_ca_given_says_to_pass_the_deployment_s_ca_or_its_fingerprint(servers: Servers) -> None:
    error = _fetch(f"https://127.0.0.1:{servers.tls_port}")
    assert isinstance(error, TlsError)
    message = str(error)
    assert "no CA was given" in message
    assert "ca='ca.pem'" in message
    assert "--ca ca.pem" in message
    assert "ca_fingerprint=" in message
    assert "'keybroker ca fingerprint' prints it" in message
    assert "CERTIFICATE_VERIFY_FAILED" in message  # and what OpenSSL said


def test_the_wrong_ca_file_is_named(servers: Servers) -> None:
    error = _fetch(f"https://127.0.0.1:{servers.tls_port}", ca=servers.other_ca)
    assert isinstance(error, TlsError)
    assert f"its certificate does not chain to {servers.other_ca}: is that this deployment's ca.pem?" in str(error)


def test_a_host_name_the_certificate_does_not_name(servers: Servers) -> None:
    error = _fetch(f"https://localhost:{servers.tls_port}", ca=servers.ca)
    assert isinstance(error, TlsError)
    assert "its certificate is not for localhost: use a name it was issued for" in str(error)


def test_http_on_a_tls_port_says_to_use_https(servers: Servers) -> None:
    error = _fetch(f"http://127.0.0.1:{servers.tls_port}")
    assert isinstance(error, TlsError)
    assert f"it speaks TLS on port {servers.tls_port}: use https://127.0.0.1:{servers.tls_port}" in str(error)


def test_https_on_a_plain_port_says_it_is_not_tls(servers: Servers) -> None:
    error = _fetch(f"https://127.0.0.1:{servers.plain_port}", ca=servers.ca)
    assert isinstance(error, TlsError)
    assert f"it does not speak TLS on port {servers.plain_port}" in str(error)
    assert "use http://" in str(error)
    refused = _fetch(f"http://127.0.0.1:{servers.plain_port}")  # and plain HTTP there works
    assert isinstance(refused, ProblemError)


def test_a_pinned_ca_reaches_the_server_and_a_wrong_pin_or_port_says_why(servers: Servers) -> None:
    pem = servers.ca.read_text()
    pin = hashlib.sha384(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()
    refused = _fetch(f"https://127.0.0.1:{servers.tls_port}", ca_fingerprint=pin)
    assert isinstance(refused, ProblemError)
    assert refused.code == "key_not_found"
    other = hashlib.sha384(ssl.PEM_cert_to_DER_cert(servers.other_ca.read_text())).hexdigest()
    with pytest.raises(PinMismatch, match=f"has fingerprint {pin}, not the pinned {other}"):
        Client(f"https://127.0.0.1:{servers.tls_port}", ca_fingerprint=other)
    with pytest.raises(TlsError) as caught:
        Client(f"https://127.0.0.1:{servers.plain_port}", ca_fingerprint=pin)
    assert f"cannot fetch the CA certificate from https://127.0.0.1:{servers.plain_port}" in str(caught.value)
    assert f"it does not speak TLS on port {servers.plain_port}" in str(caught.value)


def test_a_port_nobody_listens_on_is_a_plain_transport_error_and_retried(servers: Servers) -> None:
    plain = ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    port = plain.server_address[1]
    plain.server_close()  # nothing listens there now
    time = FakeTime()
    with (
        Client(f"http://127.0.0.1:{port}", retry=Retry(attempts=2), clock=time.clock, sleep=time.sleep) as client,
        pytest.raises(TransportError) as caught,
    ):
        client.fetch_key("k", Evidence())
    assert not isinstance(caught.value, TlsError)
    assert f"cannot reach http://127.0.0.1:{port}" in str(caught.value)
    assert len(time.pauses) == 1


def test_the_workload_cli_prints_the_hint_and_refuses_a_bad_ca_as_usage(
    servers: Servers, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    command = ["fetch-key", "k", "--evidence", "tdx", "--out", str(tmp_path / "key.bin"), "--attempts", "1"]
    assert workload_cli.main([*command, "--kbs", f"https://127.0.0.1:{servers.tls_port}"]) == 1
    assert "no CA was given" in capsys.readouterr().err
    absent = tmp_path / "absent.pem"
    assert workload_cli.main([*command, "--kbs", f"https://127.0.0.1:{servers.tls_port}", "--ca", str(absent)]) == 2
    assert f"error: ca: cannot read {absent}" in capsys.readouterr().err
    assert workload_cli.main([*command, "--kbs", "http://127.0.0.1:9", "--ca", str(servers.ca)]) == 2
    assert "is plain HTTP: the CA given would not be used" in capsys.readouterr().err
    assert not (tmp_path / "key.bin").exists()
