"""Wiring: builds the service objects from the settings, once, for the API and the CLI's local commands."""

from __future__ import annotations

import functools
import hashlib
import os
import secrets
import socket
import ssl
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy.exc import SQLAlchemyError

from keybroker import __version__
from keybroker.attestation.appraisal import AppraisalPolicies
from keybroker.attestation.nonce import NonceService
from keybroker.attestation.pcs import PcsClient
from keybroker.attestation.service import AttestationService
from keybroker.attestation.store import CollateralStore
from keybroker.attestation.tokens import TokenIssuer
from keybroker.attestation.verifier import QuoteVerifier, TrustAnchors, intel_root_der
from keybroker.audit.log import SYSTEM, AuditLog
from keybroker.auth.roles import RoleStore
from keybroker.auth.tokens import TokenStore
from keybroker.backends.base import KeyWrapper
from keybroker.backends.embedded import EmbeddedKeyStore
from keybroker.backends.kek_records import check_keks
from keybroker.backends.local_kek import LocalKeyWrapper
from keybroker.backends.registry import Backends, build_backends
from keybroker.ca import ServiceCA, forget_legacy_files
from keybroker.clock import Clock, SystemClock
from keybroker.config import EmbeddedBackendSettings, LocalWrapperSettings, Settings
from keybroker.errors import ConfigurationError
from keybroker.keys.service import KeyService
from keybroker.policy.store import PolicyStore
from keybroker.storage.cluster import Leases, Replicas
from keybroker.storage.copy import sqlite_file
from keybroker.storage.db import Database
from keybroker.storage.deployment import deployment_id
from keybroker.storage.tables import DeploymentRow, ServiceSecretRow
from keybroker.transfer.service import TransferService
from keybroker.transfer.verifiers import EvidenceVerifier, LocalVerifier, RemoteVerifier

ADMIN_TOKEN_FILE = "admin-token"  # noqa: S105 - a file name


@dataclass(frozen=True)
class Services:
    settings: Settings
    clock: Clock
    database: Database
    audit: AuditLog
    roles: RoleStore
    tokens: TokenStore
    policies: PolicyStore
    keys: KeyService
    ca: ServiceCA
    collateral: CollateralStore
    attestation: AttestationService
    transfer: TransferService
    upstream: PcsClient | None = None
    backends: Backends | None = None
    workload_ca: ServiceCA | None = None  # signs key certificates (never the service CA: see ca.WORKLOAD_CA_CERT)

    @property
    def replica_id(self) -> str:
        """This replica: its host and data directory (stable across restarts, the same for its worker processes)."""
        digest = hashlib.sha256(str(self.settings.data_dir).encode()).hexdigest()[:8]
        return f"{socket.gethostname()}:{digest}"

    @property
    def address(self) -> str:
        server = self.settings.server
        if server.public_url:
            return server.public_url
        scheme = "https" if self.settings.tls.enabled else "http"
        return f"{scheme}://{server.listen}"

    @functools.cached_property  # (a frozen dataclass still has the instance __dict__ it writes to)
    def leases(self) -> Leases:
        """Cluster-wide job leases, held by this process (``storage.cluster``)."""
        return Leases(self.database, self.clock, f"{self.replica_id}/{os.getpid()}")

    @functools.cached_property
    def replicas(self) -> Replicas:
        return Replicas(self.database, self.clock)

    def join(self) -> None:
        """A replica about to serve announces itself (its heartbeat) and then checks the KEKs again: a ``keybroker
        kek rotate`` that began after ``build_services`` checked either sees this heartbeat and stops, or is seen
        here and this replica refuses to start (``backends.kek_guard``)."""
        self.replicas.heartbeat(self.replica_id, self.address, __version__, self.database.schema_revision() or "?")
        if self.backends is not None:
            _check_keks(self.database, self.backends)

    def close(self) -> None:
        if self.upstream is not None:
            self.upstream.close()
        if isinstance(self.transfer.verifier, RemoteVerifier):
            self.transfer.verifier.close()
        if self.backends is not None:
            self.backends.close()
        self.database.close()


def build_services(settings: Settings, clock: Clock | None = None) -> Services:
    clock = clock or SystemClock()
    database = _open_initialised(settings)
    database.migrate()
    audit = AuditLog(database, clock)
    roles = RoleStore(database, audit, clock)
    with database.transaction(write=True) as session:
        roles.seed(session)  # built-in roles an upgrade added, and admin's fixed permissions
    tokens = TokenStore(database, roles, audit, clock)
    policies = PolicyStore(database, audit, clock)
    try:
        backends = build_backends(settings, database, clock)
    except BaseException:
        database.close()
        raise
    try:
        return _assemble(settings, clock, database, audit, roles, tokens, policies, backends)
    except BaseException:  # e.g. the KEK of the service's own secrets unreachable: release what was opened
        backends.close()
        database.close()
        raise


def _assemble(
    settings: Settings,
    clock: Clock,
    database: Database,
    audit: AuditLog,
    roles: RoleStore,
    tokens: TokenStore,
    policies: PolicyStore,
    backends: Backends,
) -> Services:
    keys = KeyService(database, backends.stores, settings.keys.default_backend, policies, audit, clock)
    _check_keks(database, backends)
    wrapper = backends.service_wrapper
    forget_legacy_files(database, wrapper, settings.data_dir)  # (CA key files from before 0008, imported long ago)
    ca = ServiceCA(database, wrapper, settings.data_dir)
    collateral = CollateralStore(database, clock)
    anchors = trust_anchors(settings)
    upstream = _upstream(settings, anchors, collateral)
    verifier = QuoteVerifier(collateral, anchors, upstream.fetch_missing if upstream else None)
    attestation = AttestationService(
        verifier=verifier,
        nonces=NonceService(
            _service_secret(database, wrapper, "nonce-key"),
            database,
            clock,
            timedelta(seconds=settings.attestation.nonce_ttl_seconds),
        ),
        tokens=TokenIssuer(
            database,
            wrapper,
            audit,
            clock,
            timedelta(seconds=settings.attestation.token_ttl_seconds),
            issuer=f"keybroker:{deployment_id(database)}",
        ),
        policies=AppraisalPolicies(database, audit, clock),
        clock=clock,
    )
    evidence: EvidenceVerifier = LocalVerifier(attestation)
    if settings.attestation.url:
        remote_verify: ssl.SSLContext | bool = True
        if settings.attestation.url_ca_file is not None:
            remote_verify = ssl.create_default_context(cafile=str(settings.resolve(settings.attestation.url_ca_file)))
        evidence = RemoteVerifier(
            settings.attestation.url, clock, timedelta(seconds=settings.attestation.nonce_ttl_seconds), remote_verify
        )
    transfer = TransferService(
        keys, policies, attestation, audit, database, simulated_trusted=anchors.simulated is not None, verifier=evidence
    )
    return Services(
        settings,
        clock,
        database,
        audit,
        roles,
        tokens,
        policies,
        keys,
        ca,
        collateral,
        attestation,
        transfer,
        upstream,
        backends,
        ServiceCA.workload(database, wrapper, settings.data_dir),
    )


def _check_keks(database: Database, backends: Backends) -> None:
    """Every wrapped record opens under the configured KEKs, and no KEK rotation is unfinished (else: which KEK to
    configure, or the kek rotate to finish)."""
    embedded = {
        store.name: store.wrapper.kek_id for store in backends.stores.values() if isinstance(store, EmbeddedKeyStore)
    }
    check_keks(database, embedded, backends.service_wrapper.kek_id)


def trust_anchors(settings: Settings) -> TrustAnchors:
    """Intel's root always; the simulated root only if configured (and then loudly)."""
    simulated = None
    if settings.attestation.simulated_root is not None:
        path = settings.resolve(settings.attestation.simulated_root)
        try:
            simulated = x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(serialization.Encoding.DER)
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"attestation.simulated_root {path}: {exc}") from None
    return TrustAnchors(intel_root_der(), simulated)


def _upstream(settings: Settings, anchors: TrustAnchors, store: CollateralStore) -> PcsClient | None:
    config = settings.attestation
    if not config.upstream_url:
        return None
    verify: object = True
    if config.upstream_ca_file is not None:
        verify = ssl.create_default_context(cafile=str(settings.resolve(config.upstream_ca_file)))
    key = config.upstream_api_key.get_secret_value() if config.upstream_api_key else None
    return PcsClient(config.upstream_url, anchors.roots(), store, config.upstream_timeout_seconds, key, verify)


def _service_secret(database: Database, wrapper: KeyWrapper, name: str) -> bytes:
    """A 256-bit secret of the service, created once and kept wrapped by the KEK."""
    context = f"keybroker/service-secret/v1\0{name}".encode()
    with database.transaction(write=True) as session:
        row = session.get(ServiceSecretRow, name)
        if row is None:
            secret = os.urandom(32)
            session.add(ServiceSecretRow(name=name, kek_id=wrapper.kek_id, wrapped=wrapper.wrap(secret, context)))
            return secret
        return wrapper.unwrap(row.wrapped, context, row.kek_id)


def _open_initialised(settings: Settings) -> Database:
    not_initialised = ConfigurationError(
        f"{settings.data_dir} is not initialised; run 'keybroker init --data-dir {settings.data_dir}'"
    )
    if not settings.data_dir.is_dir():
        raise not_initialised
    sqlite = sqlite_file(settings.database_url)
    if sqlite is not None and not sqlite.is_file():  # (opening it would leave an empty database behind)
        raise not_initialised
    database = Database.from_url(
        settings.database_url,
        settings.database.connect_timeout_seconds,
        settings.database.statement_timeout_seconds,
    )
    try:
        migrated = database.is_migrated()
    except SQLAlchemyError as exc:
        database.close()
        raise ConfigurationError(f"cannot open the database: {type(exc).__name__}") from None
    if not migrated:
        database.close()
        raise not_initialised
    return database


@dataclass(frozen=True)
class InitResult:
    data_dir: Path
    admin_token: str | None  # only on the run that created it
    created: bool
    joined: bool = False  # a shared database that had the deployment already (another replica's init)
    deployment: str = ""


def initialise(settings: Settings, clock: Clock | None = None, new_admin_token: bool = False) -> InitResult:
    """Create the deployment: data directory, schema, master key (SQLite only), deployment id, roles, the service
    and workload CAs and the first admin token; or, on a database that has a deployment already, join it: check
    that the configured KEK is the deployment's (else refuse, changing nothing), publish the CA certificates in
    the data directory, and write no admin token. Idempotent; ``new_admin_token`` issues another admin token
    (recovery when all have expired)."""
    clock = clock or SystemClock()
    data_dir = settings.data_dir
    if not settings.database.url:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # the SQLite database lives there
    database = Database.from_url(
        settings.database_url,
        settings.database.connect_timeout_seconds,
        settings.database.statement_timeout_seconds,
    )
    try:
        joining = _has_deployment(database)
        _local_master_keys(settings, database, joining)
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        database.migrate()
        backends = build_backends(settings, database, clock)
        try:
            service_wrapper = backends.service_wrapper
            service_ca = ServiceCA(database, service_wrapper, data_dir)
            if joining:
                service_ca.check_kek()  # another KEK than the deployment's: refused before anything is written
            for held in backends.wrappers:
                held.prepare()
            service_ca.create(clock.now(), "keybroker service CA")
            ServiceCA.workload(database, service_wrapper, data_dir).create(clock.now(), "keybroker workload CA")
            forget_legacy_files(database, service_wrapper, data_dir)  # imported: the files are only a danger now
        finally:
            backends.close()
        audit = AuditLog(database, clock)
        roles = RoleStore(database, audit, clock)
        with database.transaction(write=True) as session:
            row = session.get(DeploymentRow, 1)
            created = row is None
            if row is None:
                row = DeploymentRow(id=1, deployment_id=uuid.uuid4().hex, created_at=clock.now())
                session.add(row)
            deployment = row.deployment_id
            roles.seed(session)
        tokens = TokenStore(database, roles, audit, clock)
        admin_token = None
        if tokens.count() == 0 or new_admin_token:
            ttl = timedelta(days=settings.auth.admin_token_ttl_days)
            admin_token, _ = tokens.issue("bootstrap-admin", ["admin"], [], ttl, SYSTEM)
            _write_secret(data_dir / ADMIN_TOKEN_FILE, admin_token + "\n")
    finally:
        database.close()
    return InitResult(data_dir, admin_token, created, joining and not database.is_sqlite, deployment)


def _has_deployment(database: Database) -> bool:
    if not database.is_migrated():
        return False
    with database.transaction() as session:
        return session.get(DeploymentRow, 1) is not None


def _local_master_keys(settings: Settings, database: Database, joining: bool) -> None:
    """Create the master key file of each local KEK that has neither a file nor a key in the environment: on
    SQLite for a new deployment only (a second key for an existing store would split it between two KEKs), and
    never on PostgreSQL, where every replica must hold the same KEK (a file made here would be this host's alone)."""
    local_wrappers = [
        backend.wrapper
        for backend in settings.backends.values()
        if isinstance(backend, EmbeddedBackendSettings) and isinstance(backend.wrapper, LocalWrapperSettings)
    ]
    if not any(isinstance(backend, EmbeddedBackendSettings) for backend in settings.backends.values()):
        local_wrappers.append(LocalWrapperSettings())  # protects the service's own keys (Backends docstring)
    for local in local_wrappers:
        if local.master_key is not None:
            continue
        path = settings.resolve(local.master_key_file)
        if path.exists():
            continue
        if not database.is_sqlite:
            raise ConfigurationError(
                "with a PostgreSQL database every replica must hold the same KEK: set "
                "KEYBROKER_BACKENDS__EMBEDDED__WRAPPER__MASTER_KEY (32 random bytes, base64: openssl rand -base64 32) "
                f"on each, use a vault-transit or pkcs11 wrapper, or give every replica the same {path.name}"
            )
        if joining:
            raise ConfigurationError(
                f"the master key file {path} is missing but the deployment exists already; restore it from your "
                "backup (or set the master key through the environment)"
            )
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        LocalKeyWrapper.create_file(path)


def _write_secret(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600, replacing it atomically."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(text)
    os.replace(tmp, path)
