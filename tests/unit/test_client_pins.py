"""Pinning the CA across a CA rotation: the server publishes a bundle (old CA first, then the new one) and its
certificate comes from one of them. A pin matches ANY certificate of the bundle and only the matching ones are
trusted; several pins (a list, or comma-separated as in KEYBROKER_CA_FINGERPRINT) let clients move from the old CA
to the new one without a gap. The library and the keybroker CLI (``cli/http.py``) alike, against real TLS servers
in threads of this process."""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import ThreadingHTTPServer

import pytest

from keybroker.cli.http import AdminApi, Connection
from keybroker_client import (
    Client,
    ConfigurationError,
    PinMismatch,
    ProblemError,
    TlsError,
    TransportError,
    fetch_pinned_ca,
)
from tests.unit.test_client_errors import _ca, _fetch, _NotFound, _serve, _server_files


class _Bundle(_NotFound):
    ca_pem = b""


@dataclass
class Rotating:
    url: str
    old: str  # the pin of the old CA (first in the bundle)
    new: str  # the pin of the new CA, which issued the server's certificate
    new_pem: bytes
    third: str  # a CA of nobody here


def _pin(pem: bytes) -> str:
    return hashlib.sha384(ssl.PEM_cert_to_DER_cert(pem.decode())).hexdigest()


@pytest.fixture(scope="module")
def rotating(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rotating]:
    directory = tmp_path_factory.mktemp("rotating")
    old_file, _, _ = _ca(directory, "old")
    new_file, new, new_key = _ca(directory, "new")
    third_file, _, _ = _ca(directory, "third")
    cert_file, key_file = _server_files(directory, new, new_key)  # activated: the new CA issues
    _Bundle.ca_pem = old_file.read_bytes() + new_file.read_bytes()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Bundle)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = _serve(server)
    pins = [_pin(path.read_bytes()) for path in (old_file, new_file, third_file)]
    try:
        yield Rotating(
            f"https://127.0.0.1:{server.server_address[1]}", pins[0], pins[1], new_file.read_bytes(), pins[2]
        )
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_a_pin_of_any_certificate_of_the_bundle_matches_and_only_it_is_trusted(rotating: Rotating) -> None:
    assert fetch_pinned_ca(rotating.url, rotating.new).encode() == rotating.new_pem.strip()
    reached = _fetch(rotating.url, ca_fingerprint=rotating.new)  # not the first certificate: it matches all the same
    assert isinstance(reached, ProblemError)
    # The old pin matches the bundle too, but only the old CA is trusted then: the new CA's certificate fails.
    refused = _fetch(rotating.url, ca_fingerprint=rotating.old)
    assert isinstance(refused, TlsError)
    assert "does not chain to the pinned CA" in str(refused)


@pytest.mark.parametrize("shape", ["comma-separated", "list"])
def test_old_and_new_pins_together_work_across_the_switch(rotating: Rotating, shape: str) -> None:
    pins: str | list[str] = [rotating.old, rotating.new]
    if shape == "comma-separated":
        pins = f"{rotating.old}, {rotating.new.upper()}"
    reached = _fetch(rotating.url, ca_fingerprint=pins)
    assert isinstance(reached, ProblemError)
    assert reached.code == "key_not_found"


def test_no_pin_matching_any_certificate_is_a_pin_mismatch_naming_them(rotating: Rotating) -> None:
    with pytest.raises(PinMismatch) as refused:
        Client(rotating.url, ca_fingerprint=rotating.third)
    message = str(refused.value)
    assert f"{rotating.old}, {rotating.new}" in message
    assert f"none is pinned ({rotating.third})" in message


@pytest.mark.parametrize(
    ("pins", "says"),
    [
        ("", "a CA fingerprint is 96 hexadecimal digits"),
        ([], "give at least one CA fingerprint"),
        ("ab" * 48 + ",", "a CA fingerprint is 96 hexadecimal digits"),
        (["ab" * 48, "ab" * 47], "a CA fingerprint is 96 hexadecimal digits"),
        ([b"ab" * 48], "a CA fingerprint is 96 hexadecimal digits"),
    ],
)
def test_wrong_pins_are_refused_before_anything_is_sent(pins: object, says: str) -> None:
    with pytest.raises(ConfigurationError, match=says):
        Client("https://127.0.0.1:9", ca_fingerprint=pins)  # type: ignore[arg-type]  # wrong types on purpose


def test_the_cli_takes_several_pins_the_same_way(rotating: Rotating) -> None:
    both = Connection(addr=rotating.url, token=None, cacert=None, ca_fingerprint=f"{rotating.old},{rotating.new}")
    with AdminApi(both) as api:
        assert api.request("GET", "/cms/v1/ca-certificates").content == _Bundle.ca_pem
    old = Connection(addr=rotating.url, token=None, cacert=None, ca_fingerprint=rotating.old)
    with AdminApi(old) as api, pytest.raises(TransportError) as refused:
        api.request("GET", "/cms/v1/ca-certificates")
    assert "does not chain to the pinned CA" in str(refused.value)
    assert "--ca-fingerprint OLD,NEW" in str(refused.value)
