"""Table definitions. The Alembic revisions under ``migrations/versions`` must produce exactly this schema."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, CheckConstraint, ForeignKey, Index, Integer, LargeBinary, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from keybroker.storage.db import UTCDateTime


class Base(DeclarativeBase):
    pass


class TransferPolicyRow(Base):
    __tablename__ = "transfer_policies"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    document: Mapped[dict[str, Any]] = mapped_column(JSON)
    immutable: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_transfer_policies_created", "created_at", "id"),)


class KeyRow(Base):
    __tablename__ = "keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    algorithm: Mapped[str] = mapped_column(String(8))
    key_length: Mapped[int] = mapped_column(Integer)
    curve_type: Mapped[str | None] = mapped_column(String(16))
    label: Mapped[str | None] = mapped_column(String(256))
    usage: Mapped[str | None] = mapped_column(String(256))
    transfer_policy_id: Mapped[str] = mapped_column(String(36), ForeignKey("transfer_policies.id", ondelete="RESTRICT"))
    backend: Mapped[str] = mapped_column(String(64))
    backend_ref: Mapped[str] = mapped_column(String(512))
    kmip_key_id: Mapped[str | None] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (
        Index("ix_keys_created", "created_at", "id"),
        Index("ux_keys_backend_kmip", "backend", "kmip_key_id", unique=True),
        Index("ix_keys_transfer_policy", "transfer_policy_id"),
    )


class EmbeddedMaterialRow(Base):
    """Key material of the embedded store: AES-256-GCM under a per-key data key wrapped by the KEK."""

    __tablename__ = "embedded_key_material"

    ref: Mapped[str] = mapped_column(String(36), primary_key=True)
    key_id: Mapped[str | None] = mapped_column(String(36), index=True)  # None for rows written before 0005
    backend: Mapped[str | None] = mapped_column(String(64))  # None for rows written before 0007
    kek_id: Mapped[str] = mapped_column(String(128))
    wrapped_dek: Mapped[bytes] = mapped_column(LargeBinary)
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class KeyCertificateRow(Base):
    """A certificate (leaf + CA chain, PEM) the service CA issued for a broker-held key; deleted with the key."""

    __tablename__ = "key_certificates"

    serial: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(36), ForeignKey("keys.id", ondelete="CASCADE"))
    chain_pem: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_key_certificates_key", "key_id", "created_at"),)


class PendingMaterialRow(Base):
    """Outbox of backend writes not yet matched by the key table (see migration 0005 and KeyService)."""

    __tablename__ = "pending_material"

    key_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    backend: Mapped[str] = mapped_column(String(64))
    backend_ref: Mapped[str | None] = mapped_column(String(256))
    operation: Mapped[str] = mapped_column(String(16))  # "create" or "delete"
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # set while the reconciler works on it


class ApiTokenRow(Base):
    """Bearer tokens, stored only as SHA-256 hashes."""

    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(128))
    roles: Mapped[list[str]] = mapped_column(JSON)
    context: Mapped[list[str]] = mapped_column(JSON)
    created_by: Mapped[str | None] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class DeploymentRow(Base):
    """One row: this deployment's identity, created at init. Tokens name it, so another deployment's are refused."""

    __tablename__ = "deployment"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    deployment_id: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class RoleRow(Base):
    __tablename__ = "roles"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    permissions: Mapped[list[str]] = mapped_column(JSON)
    builtin: Mapped[bool] = mapped_column(Boolean)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class AuditHeadRow(Base):
    """The newest entry of the audit chain (one row). Appends update it first, which serialises them."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))
    prev_hash: Mapped[str] = mapped_column(String(64), server_default="0" * 64)  # the newest entry's prev_hash


class AuditEventRow(Base):
    __tablename__ = "audit_events"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    action: Mapped[str] = mapped_column(String(64))
    outcome: Mapped[str] = mapped_column(String(16))
    actor: Mapped[str | None] = mapped_column(String(200))
    target: Mapped[str | None] = mapped_column(String(200))
    request_id: Mapped[str | None] = mapped_column(String(64))
    client: Mapped[str | None] = mapped_column(String(64))
    details: Mapped[dict[str, Any]] = mapped_column(JSON)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))

    __table_args__ = (Index("ix_audit_events_at", "at"), Index("ix_audit_events_target", "target"))


class CollateralRow(Base):
    """Intel collateral, every version kept: a quote is verified with the version valid at its ``now``."""

    __tablename__ = "collateral_items"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    issue_date: Mapped[datetime] = mapped_column(UTCDateTime, primary_key=True)
    next_update: Mapped[datetime] = mapped_column(UTCDateTime)
    body: Mapped[bytes] = mapped_column(LargeBinary)
    issuer_chain: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(256))
    imported_at: Mapped[datetime] = mapped_column(UTCDateTime)


class UsedNonceRow(Base):
    """Nonces already used, per purpose ("attest", "transfer"), until they expire anyway."""

    __tablename__ = "used_nonces"

    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    purpose: Mapped[str] = mapped_column(String(16), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_used_nonces_expires", "expires_at"),)


class SigningKeyRow(Base):
    """Attestation token signing keys; the private key is wrapped by the KEK."""

    __tablename__ = "signing_keys"

    kid: Mapped[str] = mapped_column(String(64), primary_key=True)
    algorithm: Mapped[str] = mapped_column(String(8))
    wrapped_key: Mapped[bytes] = mapped_column(LargeBinary)
    kek_id: Mapped[str] = mapped_column(String(128))
    public_jwk: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    retired_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class AppraisalPolicyRow(Base):
    __tablename__ = "appraisal_policies"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    rego: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class ServiceSecretRow(Base):
    """keybroker's own secrets (the nonce key), wrapped by the KEK."""

    __tablename__ = "service_secrets"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    kek_id: Mapped[str] = mapped_column(String(128))
    wrapped: Mapped[bytes] = mapped_column(LargeBinary)


class RevisionRow(Base):
    """One row: bumped in the same transaction as every change to keys or transfer policies."""

    __tablename__ = "revision"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    counter: Mapped[int] = mapped_column(BigInteger)


# The rows of the CAs (0010): the one of each CA that issues, and during a rotation its successor (published, not
# issuing yet) or its predecessor (published until ``keybroker ca retire``). See ``keybroker.ca_rotation``.
CA_ROW_NAMES = ("service", "service:next", "service:old", "workload", "workload:next", "workload:old")


class CertificateAuthorityRow(Base):
    """The deployment's CAs (``service``, ``workload``; ``NAME:next``, ``NAME:old`` during a rotation):
    certificate, and private key wrapped by the KEK."""

    __tablename__ = "certificate_authorities"

    name: Mapped[str] = mapped_column(String(16), primary_key=True)
    cert_pem: Mapped[str] = mapped_column(Text)
    key_wrapped: Mapped[bytes] = mapped_column(LargeBinary)
    kek_id: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (
        CheckConstraint(
            "name IN (" + ", ".join(f"'{name}'" for name in CA_ROW_NAMES) + ")", name="ck_certificate_authorities_name"
        ),
    )


class LeaseRow(Base):
    """Who runs a cluster-wide job now (the reconciler, collateral refresh, nonce purge) and until when; an expired
    lease is taken over, so a replica that died holds nothing for long."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)


class ReplicaRow(Base):
    """A serving process group (one ``keybroker serve``): where it listens, what it runs, when it was last alive."""

    __tablename__ = "replicas"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    address: Mapped[str] = mapped_column(String(255))
    version: Mapped[str] = mapped_column(String(32))
    schema_revision: Mapped[str] = mapped_column(String(32))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime)
