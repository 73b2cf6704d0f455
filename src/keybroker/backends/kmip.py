"""The KMIP ``KeyStore``: key material held by a KMIP server, reached with the PyKMIP client over mutual TLS.

Contract:

* ``put`` **registers** the material (it is generated or imported by keybroker): AES as a ``SymmetricKey`` (raw
  bytes), RSA and EC as a ``PrivateKey`` in PKCS#8. The object is named ``keybroker:<key id>`` and its KMIP unique
  identifier is the ``BackendRef``. The PyKMIP server stores EC private keys registered this way (P-256/384/521)
  and returns the same bytes; it only cannot *generate* EC keys, which keybroker never asks of it.
* ``get`` reads the object's Name first and refuses (``StoredKeyCorrupt``) an object not named for the key being
  read, so that a key record pointed at another key's object does not yield it; then it checks the object against
  the key's spec (type, algorithm, AES length, RSA size, EC curve) and returns AES raw, RSA/EC as PKCS#8 DER.
* ``register_existing`` adopts an object created outside keybroker (the ``kmip_key_id`` mode): it must exist and
  match the spec; its ref is ``registered:<id>``. Such refs skip the name binding (the object is not ours to name)
  and ``delete`` leaves them on the server.
* ``delete`` destroys (revoking first when the server says the object is active); a missing object is fine.
  ``purge`` destroys every object named ``keybroker:<key id>``. ``check`` is a Query round trip.
* Errors: unreachable server, TLS failures and timeouts are ``BackendUnavailable`` naming ``host:port`` (code
  ``backend_misconfigured`` when retrying cannot help: a certificate refused either way, or the server denying
  keybroker's identity access to an object); KMIP "item not found" is ``NotFound``.

Connections: a pool of ``connections`` PyKMIP clients, opened lazily and kept open. A pooled connection that the
server has closed is noticed before use and replaced; one that breaks during a call is discarded and the call is
tried once more on a fresh connection. Nothing else is retried: a timeout leaves the connection's stream in an
unknown state (a late reply would answer the next request), so it is discarded and the call fails. The store
itself never needs rebuilding: once the server is back, the next call connects again. A Register whose connection
broke after the server had acted on it leaves a second object named for the key, which ``purge`` removes.

TLS: PyKMIP's own socket setup neither checks the server's host name nor accepts a modern ``SSLContext``; the
store connects each client itself, from one ``SSLContext`` built here (TLS >= 1.2, only ``ca_file`` trusted, the
host name checked against the server certificate's SAN), and PyKMIP only frames the KMIP messages on it.
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import socket
import ssl
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.utils import CryptographyDeprecationWarning

from keybroker.backends.base import Capability
from keybroker.config import KmipBackendSettings, Settings
from keybroker.errors import (
    BackendUnavailable,
    ConfigurationError,
    InvalidKeyMaterial,
    NotFound,
    StoredKeyCorrupt,
    UnknownReference,
)
from keybroker.keys.models import Algorithm, BackendRef, Curve, KeyId, KeyMaterial, KeySpec

# PyKMIP pulls in deprecated ciphers from cryptography and SQLAlchemy 1.x APIs at import; the warnings say nothing
# about keybroker and would fail a ``-W error`` run. Only this import is silenced.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", CryptographyDeprecationWarning)
    warnings.simplefilter("ignore", DeprecationWarning)
    from kmip.core import enums as kmip_enums
    from kmip.core import exceptions as kmip_core_exceptions
    from kmip.pie import objects as kmip_objects
    from kmip.pie.client import ProxyKmipClient
    from kmip.pie.exceptions import KmipOperationFailure
    from kmip.services.kmip_protocol import KMIPProtocol, RequestLengthMismatch

NAME_PREFIX = "keybroker:"
REGISTERED_PREFIX = "registered:"

_T = TypeVar("_T")

_CURVES: dict[str, Curve] = {"secp256r1": Curve.P256, "secp384r1": Curve.P384, "secp521r1": Curve.P521}
# What an EC private key may be tagged as when created outside keybroker; keybroker registers ``EC``.
_EC_TAGS = frozenset({kmip_enums.CryptographicAlgorithm.EC, kmip_enums.CryptographicAlgorithm.ECDSA})

# A connection that raised one of these is in an unknown state: it is discarded, never returned to the pool.
_BROKEN = (OSError, EOFError, RequestLengthMismatch, kmip_core_exceptions.ConnectionClosed)
# Replies that do not decode: not a (working) KMIP server at the other end.
_GARBLED = (
    kmip_core_exceptions.InvalidKmipEncoding,
    kmip_core_exceptions.InvalidPrimitiveLength,
    kmip_core_exceptions.ReadValueError,
    kmip_core_exceptions.StreamNotEmptyError,
    kmip_core_exceptions.InvalidMessage,
)
# TLS alerts by which the server rejects keybroker's client certificate: a configuration problem, not an outage.
_CERT_REFUSED = frozenset(
    {
        "TLSV1_ALERT_UNKNOWN_CA",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "SSLV3_ALERT_CERTIFICATE_REVOKED",
        "TLSV1_ALERT_ACCESS_DENIED",
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
    }
)

_MISCONFIGURED = "backend_misconfigured"


class _Mismatch(Exception):
    """An object that does not hold a key of the expected spec (the message says how; never its bytes)."""


def _parse_ref(ref: str) -> tuple[str, bool]:
    """``(object id, bound)``: ``bound`` is False for a ``registered:`` ref (an adopted object, not ours)."""
    if ref.startswith(REGISTERED_PREFIX):
        return ref[len(REGISTERED_PREFIX) :], False
    return ref, True


def _valid_uid(uid: str) -> bool:
    # An empty identifier must never reach PyKMIP: KMIP reads it as "the ID placeholder", i.e. the object the
    # session touched last, which could be another key.
    return bool(uid) and uid == uid.strip() and len(uid) <= 256 and uid.isprintable()


def _clip(text: object, limit: int = 200) -> str:
    value = str(text)
    return value if len(value) <= limit else value[:limit] + "..."


def _ssl_reason(exc: ssl.SSLError) -> str:
    return str(getattr(exc, "reason", None) or exc.__class__.__name__)


def _object_material(obj: Any, spec: KeySpec, *, validate: bool) -> bytes:
    """The key bytes of a PyKMIP object if it holds a ``spec`` key (AES raw, RSA/EC canonical PKCS#8), else
    ``_Mismatch``. ``validate`` runs the full RSA consistency check (objects keybroker did not write)."""
    value = getattr(obj, "value", None)
    if not isinstance(value, bytes):
        raise _Mismatch("it holds no key value")
    object_type = getattr(obj, "object_type", None)
    algorithm = getattr(obj, "cryptographic_algorithm", None)
    if spec.algorithm is Algorithm.AES:
        if object_type != kmip_enums.ObjectType.SYMMETRIC_KEY:
            raise _Mismatch(f"it is a {_type_name(object_type)}, not a symmetric key")
        if algorithm != kmip_enums.CryptographicAlgorithm.AES:
            raise _Mismatch(f"its algorithm is {_enum_name(algorithm)}, not AES")
        if getattr(obj, "key_format_type", None) != kmip_enums.KeyFormatType.RAW:
            raise _Mismatch("its key format is not Raw")
        if len(value) * 8 != spec.key_length or getattr(obj, "cryptographic_length", None) != spec.key_length:
            raise _Mismatch(f"it is {len(value) * 8} bits long, not {spec.key_length}")
        return value
    if object_type != kmip_enums.ObjectType.PRIVATE_KEY:
        raise _Mismatch(f"it is a {_type_name(object_type)}, not a private key")
    wanted = {kmip_enums.CryptographicAlgorithm.RSA} if spec.algorithm is Algorithm.RSA else _EC_TAGS
    if algorithm not in wanted:
        raise _Mismatch(f"its algorithm is {_enum_name(algorithm)}, not {spec.algorithm}")
    return _private_key_material(value, spec, validate=validate)


def _private_key_material(value: bytes, spec: KeySpec, *, validate: bool) -> bytes:
    try:
        # PKCS#8 as keybroker registers it; PKCS#1 or SEC1 DER as other clients may have (all DER key formats).
        key = serialization.load_der_private_key(value, password=None, unsafe_skip_rsa_key_validation=True)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise _Mismatch("its key value does not parse as a DER private key") from None
    if spec.algorithm is Algorithm.RSA:
        if not isinstance(key, rsa.RSAPrivateKey):
            raise _Mismatch("its key value is not an RSA key")
        if key.key_size != spec.key_length:
            raise _Mismatch(f"it is an RSA-{key.key_size} key, not RSA-{spec.key_length}")
        if validate:
            # The checks parse_import makes of an imported key; keybroker's own puts passed them already.
            if key.private_numbers().public_numbers.e < 65537:
                raise _Mismatch("its RSA public exponent is below 65537")
            try:
                serialization.load_der_private_key(value, password=None)
            except ValueError:
                raise _Mismatch("its RSA key fails the consistency check") from None
    else:
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise _Mismatch("its key value is not an EC key")
        if _CURVES.get(key.curve.name) is not spec.curve:
            raise _Mismatch(f"it is on curve {key.curve.name}, not {spec.curve}")
    # Re-encoded so that what keybroker hands out is always PKCS#8, whatever DER format the object was stored in.
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _enum_name(value: object) -> str:
    return str(getattr(value, "name", value))


def _type_name(value: object) -> str:
    return _enum_name(value).replace("_", " ").lower()


def _kmip_object(key_id: KeyId, material: KeyMaterial) -> Any:
    """The PyKMIP object that registers ``material`` under the name ``keybroker:<key_id>``."""
    spec, name = material.spec, NAME_PREFIX + key_id
    alg, mask = kmip_enums.CryptographicAlgorithm, kmip_enums.CryptographicUsageMask
    if spec.algorithm is Algorithm.AES:
        return kmip_objects.SymmetricKey(
            alg.AES, spec.key_length, material.secret, masks=[mask.ENCRYPT, mask.DECRYPT], name=name
        )
    algorithm, masks = (
        (alg.RSA, [mask.SIGN, mask.DECRYPT]) if spec.algorithm is Algorithm.RSA else (alg.EC, [mask.SIGN])
    )
    return kmip_objects.PrivateKey(
        algorithm, spec.key_length, material.secret, kmip_enums.KeyFormatType.PKCS_8, masks=masks, name=name
    )


def _tls_context(cert_file: Path, key_file: Path, ca_file: Path) -> ssl.SSLContext:
    """The client side of the mutual TLS session. Raises ``ConfigurationError`` for unusable files."""
    for what, path in (("cert_file", cert_file), ("key_file", key_file), ("ca_file", ca_file)):
        if not path.is_file():
            raise ConfigurationError(f"KMIP backend: {what} {path} does not exist")
    try:
        certificate = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except (OSError, ValueError):
        raise ConfigurationError(f"KMIP backend: cert_file {cert_file} is not a PEM certificate") from None
    try:
        usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = None
    except ValueError:
        raise ConfigurationError(f"KMIP backend: cert_file {cert_file} has malformed extensions") from None
    if usages is not None and x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
        # KMIP servers (PyKMIP included) refuse such a certificate on every request; say so at start instead.
        raise ConfigurationError(
            f"KMIP backend: cert_file {cert_file} is not for client authentication (its extended key usage lacks "
            "clientAuth)"
        )
    try:
        # PROTOCOL_TLS_CLIENT: certificate and host name verification on; only ca_file is trusted.
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(cert_file), str(key_file))
    except ssl.SSLError as exc:
        raise ConfigurationError(
            f"KMIP backend: cannot use cert_file {cert_file} / key_file {key_file} / ca_file {ca_file}: "
            f"{_ssl_reason(exc)}"
        ) from None
    except OSError as exc:
        raise ConfigurationError(f"KMIP backend: cannot read the TLS files: {exc.strerror}") from None
    return context


class _Pool:
    """``size`` slots, each an open PyKMIP client or ``None`` (to be opened on demand). LIFO, so that a burst
    reuses the connections that are warm and the rest stay unopened."""

    def __init__(self, size: int, wait_seconds: float) -> None:
        self._slots: queue.LifoQueue[Any] = queue.LifoQueue()
        for _ in range(size):
            self._slots.put(None)
        self._wait = wait_seconds
        self._lock = threading.Lock()
        self.closed = False

    def take(self) -> Any:
        """A slot (an open client, or ``None``); raises ``queue.Empty`` after ``wait_seconds``."""
        return self._slots.get(timeout=self._wait)

    def give(self, client: Any) -> None:
        """Return a slot; ``None`` for a connection that was discarded. A closed pool closes what comes back."""
        with self._lock:
            if self.closed and client is not None:
                _close_quietly(client)
                client = None
            self._slots.put(client)

    def close(self) -> None:
        with self._lock:
            self.closed = True
            idle: list[Any] = []
            while True:
                try:
                    idle.append(self._slots.get_nowait())
                except queue.Empty:
                    break
            for client in idle:
                if client is not None:
                    _close_quietly(client)
                self._slots.put(None)


def _close_quietly(client: Any) -> None:
    sock = getattr(client.proxy, "socket", None)
    with contextlib.suppress(Exception):  # closing a broken connection may fail; there is nothing left to release
        client.close()
    if sock is not None:
        # KMIPProxy.close() skips close() when shutdown() fails, as it does on a connection the server dropped,
        # and would leak the descriptor until garbage collection.
        with contextlib.suppress(OSError):
            sock.close()


def _server_closed(client: Any) -> bool:
    """True if a pooled connection cannot carry a request: no socket, or bytes (or EOF) waiting while it is idle.
    Nothing but TLS housekeeping (a TLS 1.3 session ticket, say) may arrive on an idle KMIP connection: the server
    closed it, sent an alert, or the stream is out of step."""
    sock = getattr(client.proxy, "socket", None)
    if sock is None:
        return True
    try:
        if sock.fileno() < 0 or sock.pending():
            return True
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
        if not poller.poll(0):
            return False
        timeout = sock.gettimeout()
        sock.setblocking(False)
        try:
            sock.recv(1)  # b"" at EOF, or a stray byte: unusable either way
        except ssl.SSLWantReadError:
            return False  # only a TLS record for OpenSSL itself, now consumed
        finally:
            sock.settimeout(timeout)
    except (OSError, ValueError):
        return True
    return True


class KmipKeyStore:
    """Key material in a KMIP server (see the module docstring for the contract)."""

    capabilities = frozenset({Capability.STORE, Capability.REGISTER_EXISTING})
    # The PyKMIP server stores all of them (EC private keys included, registered as PKCS#8).
    supported_algorithms = frozenset({Algorithm.AES, Algorithm.RSA, Algorithm.EC})

    def __init__(
        self,
        name: str,
        *,
        host: str,
        port: int,
        tls: ssl.SSLContext,
        timeout_seconds: float = 5.0,
        connections: int = 4,
    ) -> None:
        self.name = name
        self._host = host
        self._port = port
        self._tls = tls
        self._timeout = timeout_seconds
        self._size = connections
        # A caller waits for a free connection as long as for a reply: past that, the server is too slow anyway.
        self._pool = _Pool(connections, wait_seconds=timeout_seconds)

    @classmethod
    def from_settings(cls, name: str, settings: Settings, cfg: KmipBackendSettings) -> KmipKeyStore:
        """Checks the TLS files now (``ConfigurationError``); connects only when first used, so that keybroker
        starts while the KMIP server is down (readiness reports it)."""
        tls = _tls_context(
            settings.resolve(cfg.cert_file), settings.resolve(cfg.key_file), settings.resolve(cfg.ca_file)
        )
        return cls(
            name,
            host=cfg.host,
            port=cfg.port,
            tls=tls,
            timeout_seconds=cfg.timeout_seconds,
            connections=cfg.connections,
        )

    def __repr__(self) -> str:
        return f"KmipKeyStore(name={self.name!r}, server={self._where!r}, connections={self._size})"

    @property
    def _where(self) -> str:
        return f"{self._host}:{self._port}"

    # -- KeyStore ------------------------------------------------------------------------------------------------
    def supports(self, spec: KeySpec) -> bool:
        return spec.algorithm in self.supported_algorithms

    def put(self, key_id: KeyId, material: KeyMaterial) -> BackendRef:
        managed = _kmip_object(key_id, material)
        try:
            # Never store what get would refuse (and never send malformed material to the server).
            _object_material(managed, material.spec, validate=False)
        except _Mismatch as exc:
            raise InvalidKeyMaterial(f"the {material.spec.describe()} key material does not match: {exc}") from None
        uid = self._call(f"registering key {key_id}", lambda client: client.register(managed))
        return BackendRef(str(uid))

    def get(self, key_id: KeyId, ref: BackendRef, spec: KeySpec) -> KeyMaterial:
        uid, bound = _parse_ref(ref)
        if not _valid_uid(uid):
            raise StoredKeyCorrupt(f"the key record of {key_id} holds a malformed KMIP reference")
        missing = NotFound("the key material is not in the KMIP server", code="key_material_missing")
        if bound:
            # The name is checked before the material is fetched: an object not bound to this key is never read.
            names = self._names(uid, missing)
            if NAME_PREFIX + key_id not in names:
                raise StoredKeyCorrupt(f"KMIP object {uid} is not the material of key {key_id}")
        obj = self._object(uid, missing)
        try:
            return KeyMaterial(spec, _object_material(obj, spec, validate=False))
        except _Mismatch as exc:
            raise StoredKeyCorrupt(f"KMIP object {uid} does not hold the {spec.describe()} key: {exc}") from None

    def register_existing(self, key_id: KeyId, object_id: str, spec: KeySpec) -> BackendRef:
        missing = UnknownReference(f"KMIP object {object_id!r} does not exist", code="kmip_object_not_found")
        if not _valid_uid(object_id):
            raise missing
        if any(name.startswith(NAME_PREFIX) for name in self._names(object_id, missing)):
            # keybroker's own objects hold keys under their own transfer policies: adopting one under another
            # policy would release it to whoever that policy allows.
            raise InvalidKeyMaterial(
                f"KMIP object {object_id} is a key keybroker stored itself; it cannot be registered again",
                code="kmip_object_managed",
            )
        obj = self._object(object_id, missing)
        try:
            _object_material(obj, spec, validate=True)
        except _Mismatch as exc:
            raise InvalidKeyMaterial(f"KMIP object {object_id} does not hold a {spec.describe()} key: {exc}") from None
        return BackendRef(REGISTERED_PREFIX + object_id)

    def delete(self, ref: BackendRef) -> None:
        uid, bound = _parse_ref(ref)
        if not bound or not _valid_uid(uid):
            return  # an adopted object belongs to its creator; a malformed ref names nothing to destroy
        self._destroy(uid)

    def purge(self, key_id: KeyId) -> None:
        def locate(client: Any) -> Any:
            name = client.attribute_factory.create_attribute(kmip_enums.AttributeType.NAME, NAME_PREFIX + key_id)
            return client.locate(attributes=[name])

        uids = self._call(f"looking up the objects of key {key_id}", locate)
        for uid in uids or ():
            self._destroy(str(uid))

    def check(self) -> None:
        def query(client: Any) -> None:
            result = client.proxy.query(query_functions=[kmip_enums.QueryFunction.QUERY_SERVER_INFORMATION])
            status = getattr(result.result_status, "value", result.result_status)
            if status != kmip_enums.ResultStatus.SUCCESS:
                reason = getattr(result.result_reason, "value", result.result_reason)
                message = getattr(result.result_message, "value", result.result_message)
                raise KmipOperationFailure(status, reason, message)

        self._call("querying the server", query)

    def close(self) -> None:
        self._pool.close()

    # -- operations ----------------------------------------------------------------------------------------------
    def _names(self, uid: str, missing: Exception) -> list[str]:
        def names(client: Any) -> list[str]:
            _, attributes = client.get_attributes(uid, ["Name"])
            found: list[str] = []
            for attribute in attributes or ():
                value = getattr(attribute.attribute_value, "name_value", None)
                if attribute.attribute_name.value == "Name" and value is not None:
                    found.append(str(value.value))
            return found

        return self._call(f"reading the name of object {uid}", names, missing=missing)

    def _object(self, uid: str, missing: Exception) -> Any:
        return self._call(f"reading object {uid}", lambda client: client.get(uid), missing=missing)

    def _destroy(self, uid: str) -> None:
        gone = kmip_enums.ResultReason.ITEM_NOT_FOUND

        def destroy(client: Any) -> None:
            try:
                client.destroy(uid)
                return
            except KmipOperationFailure as exc:
                if exc.reason == gone:
                    return  # already gone: deleting is idempotent
                if exc.reason != kmip_enums.ResultReason.PERMISSION_DENIED:
                    raise
                denied = exc
            # KMIP forbids destroying an Active object (PyKMIP answers PERMISSION_DENIED, "Object is active and
            # cannot be destroyed."): revoke it, then destroy. Any other denial is a real permission problem.
            try:
                _, attributes = client.get_attributes(uid, ["State"])
                states = [getattr(a.attribute_value, "value", None) for a in attributes or ()]
                if kmip_enums.State.ACTIVE not in states:
                    raise denied
                client.revoke(kmip_enums.RevocationReasonCode.CESSATION_OF_OPERATION, uid)
                client.destroy(uid)
            except KmipOperationFailure as exc:
                if exc.reason != gone:  # destroyed by someone else meanwhile: just as good
                    raise

        self._call(f"destroying object {uid}", destroy)

    # -- connections ---------------------------------------------------------------------------------------------
    def _connect(self) -> Any:
        """A new, connected PyKMIP client. Raises ``BackendUnavailable``.

        The TLS connection is made here rather than by ``ProxyKmipClient.open()``, whose socket setup builds its
        own ``SSLContext`` without host name checking, supports IPv4 only, and logs every failure at ERROR (twice)
        before raising it; keybroker's ``BackendUnavailable`` already says what went wrong."""
        client = ProxyKmipClient(
            hostname=self._host,
            port=self._port,
            # os.devnull: PyKMIP otherwise reads ~/.pykmip/pykmip.conf and /etc/pykmip/pykmip.conf, and would send a
            # username/password found in their [client] section with every request.
            config_file=os.devnull,
            kmip_version=kmip_enums.KMIPVersion.KMIP_1_2,
        )
        try:
            raw = socket.create_connection((self._host, self._port), timeout=self._timeout)
        except OSError as exc:
            raise self._unreachable(exc) from None
        try:
            # The handshake runs here, under the same timeout as every later read.
            sock = self._tls.wrap_socket(raw, server_side=False, server_hostname=self._host)
        except OSError as exc:
            raw.close()
            raise self._unreachable(exc) from None
        # What KMIPProxy.open() would have set up: the socket, its framing, and the client's "open" flag.
        client.proxy.socket = sock
        client.proxy.protocol = KMIPProtocol(sock)
        client._is_open = True
        return client

    def _unreachable(self, exc: BaseException) -> BackendUnavailable:
        """The ``BackendUnavailable`` for a transport failure: names the server, never data."""
        where = self._where
        if isinstance(exc, ssl.SSLError):
            return self._tls_failure(exc)
        if isinstance(exc, TimeoutError):
            detail = f"the KMIP server {where} did not answer within {self._timeout:g} s"
        elif isinstance(exc, ConnectionRefusedError):
            detail = f"the KMIP server {where} refused the connection"
        elif isinstance(exc, socket.gaierror):
            detail = f"cannot resolve the KMIP server host {self._host!r}"
        elif isinstance(exc, OSError):
            detail = f"cannot reach the KMIP server {where} ({exc.strerror or type(exc).__name__})"
        elif isinstance(exc, _GARBLED):
            detail = f"the KMIP server {where} sent a reply that does not decode"
        else:
            detail = f"the connection to the KMIP server {where} failed ({type(exc).__name__})"
        return BackendUnavailable(detail)

    def _tls_failure(self, exc: ssl.SSLError) -> BackendUnavailable:
        where, reason = self._where, _ssl_reason(exc)
        if isinstance(exc, ssl.SSLCertVerificationError):
            return BackendUnavailable(
                f"the KMIP server {where} presented a certificate that does not verify against ca_file "
                f"({_clip(exc.verify_message or reason)})",
                code=_MISCONFIGURED,
            )
        if reason in _CERT_REFUSED:
            return BackendUnavailable(
                f"the KMIP server {where} refused keybroker's client certificate ({reason}); it must be issued by "
                "a CA the server trusts, with the clientAuth usage",
                code=_MISCONFIGURED,
            )
        return BackendUnavailable(f"TLS with the KMIP server {where} failed ({reason})")

    def _call(self, what: str, operation: Callable[[Any], _T], *, missing: Exception | None = None) -> _T:
        """Run ``operation`` on a pooled connection, translating PyKMIP's failures into keybroker errors.

        ``missing`` is raised for KMIP "item not found" (``None``: let ``operation`` deal with it)."""
        if self._pool.closed:
            raise BackendUnavailable(f"the KMIP store {self.name!r} is closed")
        try:
            client = self._pool.take()
        except queue.Empty:
            raise BackendUnavailable(
                f"all {self._size} connections to the KMIP server {self._where} stayed busy for {self._timeout:g} s"
            ) from None
        try:
            for attempt in (1, 2):
                fresh = client is None
                if client is not None and _server_closed(client):
                    _close_quietly(client)
                    client, fresh = None, True
                if client is None:
                    client = self._connect()
                try:
                    return operation(client)
                except KmipOperationFailure as exc:
                    raise self._refused(what, exc, missing) from None  # a reply: the connection is fine
                except _BROKEN + _GARBLED as exc:
                    _close_quietly(client)
                    client = None
                    # Retry once, and only if the connection was an old one the server may have dropped; a fresh
                    # connection failing, or any timeout, means the server is not answering now.
                    if fresh or attempt == 2 or isinstance(exc, (TimeoutError, *_GARBLED)):
                        raise self._unreachable(exc) from None
                except BaseException:
                    _close_quietly(client)  # state unknown (e.g. interrupted mid-reply): never reuse it
                    client = None
                    raise
            raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises
        finally:
            self._pool.give(client)

    def _refused(self, what: str, exc: Any, missing: Exception | None) -> Exception:
        reason = exc.reason
        if reason == kmip_enums.ResultReason.ITEM_NOT_FOUND and missing is not None:
            return missing
        message = _clip(getattr(exc, "message", "") or "")
        if reason in (
            kmip_enums.ResultReason.PERMISSION_DENIED,
            kmip_enums.ResultReason.AUTHENTICATION_NOT_SUCCESSFUL,
        ):
            return BackendUnavailable(
                f"the KMIP server {self._where} denied keybroker permission for {what} ({_enum_name(reason)}: "
                f"{message}); check the client certificate and the object's owner and operation policy",
                code=_MISCONFIGURED,
            )
        return BackendUnavailable(
            f"the KMIP server {self._where} failed {what} ({_enum_name(reason)}: {message})",
        )
