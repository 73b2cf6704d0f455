"""``KmipKeyStore``: key material in a KMIP server; its contract is the package docstring."""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import ssl
from collections.abc import Callable
from typing import Any, TypeVar

from keybroker.backends.base import Capability
from keybroker.backends.kmip.codec import (
    NAME_PREFIX,
    REGISTERED_PREFIX,
    Mismatch,
    clip,
    enum_name,
    kmip_object,
    object_material,
    parse_ref,
    valid_uid,
)
from keybroker.backends.kmip.connection import Pool, close_quietly, server_closed, ssl_reason, tls_context
from keybroker.backends.kmip.vendor import (
    BROKEN,
    CERT_REFUSED,
    GARBLED,
    KmipOperationFailure,
    KMIPProtocol,
    ProxyKmipClient,
    kmip_enums,
)
from keybroker.config import KmipBackendSettings, SecretReader
from keybroker.errors import (
    BackendUnavailable,
    BackendUnsupported,
    InvalidKeyMaterial,
    NotFound,
    StoredKeyCorrupt,
    UnknownReference,
)
from keybroker.ids import BackendRef, KeyId
from keybroker.keys.models import Algorithm, KeyMaterial, KeySpec

# How long a Create / CreateKeyPair may take (unless timeout_seconds is longer): the server generates the key
# before it answers, RSA-4096 in up to a few seconds.
GENERATE_TIMEOUT_SECONDS = 30.0

_T = TypeVar("_T")

_MISCONFIGURED = "backend_misconfigured"


class KmipKeyStore:
    """Key material in a KMIP server (see the package docstring for the contract)."""

    capabilities = frozenset({Capability.STORE, Capability.REGISTER_EXISTING, Capability.GENERATE})
    # The PyKMIP server stores all of them (EC private keys included, registered as PKCS#8).
    supported_algorithms = frozenset({Algorithm.AES, Algorithm.RSA, Algorithm.EC})
    # What the server generates itself (module docstring): no EC, no RSA-7680.
    generated = frozenset(
        {(Algorithm.AES, 128), (Algorithm.AES, 192), (Algorithm.AES, 256)}
        | {(Algorithm.RSA, 2048), (Algorithm.RSA, 3072), (Algorithm.RSA, 4096)}
    )

    def __init__(
        self,
        name: str,
        *,
        host: str,
        port: int,
        tls: ssl.SSLContext,
        timeout_seconds: float = 5.0,
        connections: int = 4,
        namespace: Callable[[], str] = lambda: "",
    ) -> None:
        self.name = name
        # Objects are named keybroker:<deployment>:<key id>: purging by name must never reach objects another
        # keybroker deployment sharing this KMIP identity stored under the same (chosen) key id.
        self._namespace = namespace
        self._host = host
        self._port = port
        self._tls = tls
        self._timeout = timeout_seconds
        self._size = connections
        # A caller waits for a free connection as long as for a reply: past that, the server is too slow anyway.
        self._pool = Pool(connections, wait_seconds=timeout_seconds)

    def _object_name(self, key_id: str) -> str:
        namespace = self._namespace()
        return f"{NAME_PREFIX}{namespace}:{key_id}" if namespace else NAME_PREFIX + key_id

    def _names_of(self, key_id: str) -> tuple[str, ...]:
        """The names this deployment's objects of ``key_id`` may carry: the current one, and ``keybroker:<key id>``
        of objects written before names carried the deployment (still read, and destroyed with their key)."""
        current, legacy = self._object_name(key_id), NAME_PREFIX + key_id
        return (current,) if current == legacy else (current, legacy)

    @classmethod
    def from_settings(
        cls, name: str, secrets: SecretReader, cfg: KmipBackendSettings, namespace: Callable[[], str] = lambda: ""
    ) -> KmipKeyStore:
        """Checks the TLS files now (``ConfigurationError``); connects only when first used, so that keybroker
        starts while the KMIP server is down (readiness reports it)."""
        tls = tls_context(secrets.resolve(cfg.cert_file), secrets.resolve(cfg.key_file), secrets.resolve(cfg.ca_file))
        return cls(
            name,
            host=cfg.host,
            port=cfg.port,
            tls=tls,
            timeout_seconds=cfg.timeout_seconds,
            connections=cfg.connections,
            namespace=namespace,
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
        managed = kmip_object(self._object_name(key_id), material)
        try:
            # Never store what get would refuse (and never send malformed material to the server).
            object_material(managed, material.spec, validate=False)
        except Mismatch as exc:
            raise InvalidKeyMaterial(f"the {material.spec.describe()} key material does not match: {exc}") from None
        uid = self._call(f"registering key {key_id}", lambda client: client.register(managed))
        return BackendRef(str(uid))

    def can_generate(self, spec: KeySpec) -> bool:
        return (spec.algorithm, spec.key_length) in self.generated

    def generate(self, key_id: KeyId, spec: KeySpec) -> BackendRef:
        if not self.can_generate(spec):
            raise BackendUnsupported(f"the KMIP store {self.name!r} cannot have {spec.describe()} keys generated")
        name, length = self._object_name(key_id), spec.key_length
        alg, mask = kmip_enums.CryptographicAlgorithm, kmip_enums.CryptographicUsageMask

        def create(client: Any) -> Any:
            if spec.algorithm is Algorithm.AES:
                return client.create(alg.AES, length, name=name, cryptographic_usage_mask=[mask.ENCRYPT, mask.DECRYPT])
            # The PyKMIP server insists on a usage mask for each half (INVALID_FIELD otherwise).
            _, private = client.create_key_pair(
                alg.RSA,
                length,
                public_name=name,
                public_usage_mask=[mask.VERIFY, mask.ENCRYPT],
                private_name=name,
                private_usage_mask=[mask.SIGN, mask.DECRYPT],
            )
            return private

        what = f"creating the {spec.describe()} key {key_id}"
        uid = str(self._call(what, create, timeout=max(self._timeout, GENERATE_TIMEOUT_SECONDS)))
        if not valid_uid(uid):
            # Whatever the server made is named for the key: the caller's purge removes it.
            raise BackendUnavailable(f"the KMIP server {self._where} answered {what} without a usable identifier")
        return BackendRef(uid)

    def get(self, key_id: KeyId, ref: BackendRef, spec: KeySpec) -> KeyMaterial:
        uid, bound = parse_ref(ref)
        if not valid_uid(uid):
            raise StoredKeyCorrupt(f"the key record of {key_id} holds a malformed KMIP reference")
        missing = NotFound("the key material is not in the KMIP server", code="key_material_missing")
        if bound:
            # The name is checked before the material is fetched: an object not bound to this key is never read.
            names = self._names(uid, missing)
            if not set(self._names_of(key_id)) & set(names):
                raise StoredKeyCorrupt(f"KMIP object {uid} is not the material of key {key_id}")
        obj = self._object(uid, missing)
        try:
            return KeyMaterial(spec, object_material(obj, spec, validate=False))
        except Mismatch as exc:
            raise StoredKeyCorrupt(f"KMIP object {uid} does not hold the {spec.describe()} key: {exc}") from None

    def register_existing(self, key_id: KeyId, object_id: str, spec: KeySpec) -> BackendRef:
        missing = UnknownReference(f"KMIP object {object_id!r} does not exist", code="kmip_object_not_found")
        if not valid_uid(object_id):
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
            object_material(obj, spec, validate=True)
        except Mismatch as exc:
            raise InvalidKeyMaterial(f"KMIP object {object_id} does not hold a {spec.describe()} key: {exc}") from None
        return BackendRef(REGISTERED_PREFIX + object_id)

    def delete(self, ref: BackendRef) -> None:
        uid, bound = parse_ref(ref)
        if not bound or not valid_uid(uid):
            return  # an adopted object belongs to its creator; a malformed ref names nothing to destroy
        self._destroy(uid)

    def purge(self, key_id: KeyId) -> None:
        for object_name in self._names_of(key_id):

            def locate(client: Any, object_name: str = object_name) -> Any:
                name = client.attribute_factory.create_attribute(kmip_enums.AttributeType.NAME, object_name)
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

    def _unreachable(self, exc: BaseException, timeout: float | None = None) -> BackendUnavailable:
        """The ``BackendUnavailable`` for a transport failure: names the server, never data."""
        where = self._where
        if isinstance(exc, ssl.SSLError):
            return self._tls_failure(exc)
        if isinstance(exc, TimeoutError):
            detail = f"the KMIP server {where} did not answer within {timeout or self._timeout:g} s"
        elif isinstance(exc, ConnectionRefusedError):
            detail = f"the KMIP server {where} refused the connection"
        elif isinstance(exc, socket.gaierror):
            detail = f"cannot resolve the KMIP server host {self._host!r}"
        elif isinstance(exc, OSError):
            detail = f"cannot reach the KMIP server {where} ({exc.strerror or type(exc).__name__})"
        elif isinstance(exc, GARBLED):
            detail = f"the KMIP server {where} sent a reply that does not decode"
        else:
            detail = f"the connection to the KMIP server {where} failed ({type(exc).__name__})"
        return BackendUnavailable(detail)

    def _tls_failure(self, exc: ssl.SSLError) -> BackendUnavailable:
        where, reason = self._where, ssl_reason(exc)
        if isinstance(exc, ssl.SSLCertVerificationError):
            return BackendUnavailable(
                f"the KMIP server {where} presented a certificate that does not verify against ca_file "
                f"({clip(exc.verify_message or reason)})",
                code=_MISCONFIGURED,
            )
        if reason in CERT_REFUSED:
            return BackendUnavailable(
                f"the KMIP server {where} refused keybroker's client certificate ({reason}); it must be issued by "
                "a CA the server trusts, with the clientAuth usage",
                code=_MISCONFIGURED,
            )
        return BackendUnavailable(f"TLS with the KMIP server {where} failed ({reason})")

    def _call(
        self,
        what: str,
        operation: Callable[[Any], _T],
        *,
        missing: Exception | None = None,
        timeout: float | None = None,
    ) -> _T:
        """Run ``operation`` on a pooled connection, translating PyKMIP's failures into keybroker errors.

        ``missing`` is raised for KMIP "item not found" (``None``: let ``operation`` deal with it). ``timeout``
        replaces ``timeout_seconds`` as the wait for the reply, for this call only (key generation)."""
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
                if client is not None and server_closed(client):
                    close_quietly(client)
                    client, fresh = None, True
                if client is None:
                    client = self._connect()
                try:
                    if timeout is None:
                        return operation(client)
                    return self._with_timeout(client, timeout, operation)
                except KmipOperationFailure as exc:
                    raise self._refused(what, exc, missing) from None  # a reply: the connection is fine
                except BROKEN + GARBLED as exc:
                    close_quietly(client)
                    client = None
                    # Retry once, and only if the connection was an old one the server may have dropped; a fresh
                    # connection failing, or any timeout, means the server is not answering now.
                    if fresh or attempt == 2 or isinstance(exc, (TimeoutError, *GARBLED)):
                        raise self._unreachable(exc, timeout) from None
                except BaseException:
                    close_quietly(client)  # state unknown (e.g. interrupted mid-reply): never reuse it
                    client = None
                    raise
            raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises
        finally:
            self._pool.give(client)

    def _with_timeout(self, client: Any, timeout: float, operation: Callable[[Any], _T]) -> _T:
        sock = client.proxy.socket
        sock.settimeout(timeout)
        try:
            return operation(client)
        finally:
            # Back to the pool with the usual timeout. (A socket that cannot take it is closed, and the pool's
            # check before the next use replaces it; never an error here, which would retry the operation.)
            with contextlib.suppress(OSError):
                sock.settimeout(self._timeout)

    def _refused(self, what: str, exc: Any, missing: Exception | None) -> Exception:
        reason = exc.reason
        if reason == kmip_enums.ResultReason.ITEM_NOT_FOUND and missing is not None:
            return missing
        message = clip(getattr(exc, "message", "") or "")
        if reason in (
            kmip_enums.ResultReason.PERMISSION_DENIED,
            kmip_enums.ResultReason.AUTHENTICATION_NOT_SUCCESSFUL,
        ):
            return BackendUnavailable(
                f"the KMIP server {self._where} denied keybroker permission for {what} ({enum_name(reason)}: "
                f"{message}); check the client certificate and the object's owner and operation policy",
                code=_MISCONFIGURED,
            )
        return BackendUnavailable(
            f"the KMIP server {self._where} failed {what} ({enum_name(reason)}: {message})",
        )
