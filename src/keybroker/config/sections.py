"""The sections of the settings other than the backends: each a frozen model that refuses unknown keys."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

DEFAULT_LISTEN = "127.0.0.1:9443"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(Section):
    """The HTTPS server: where it listens, its processes and threads, and how much a request may carry."""

    listen: str = Field(
        default=DEFAULT_LISTEN, description="HOST:PORT to listen on (IPv6 as [::1]:9443); --listen on the command line"
    )
    public_url: str | None = Field(
        default=None, description="Base URL clients use (for transfer_link); default: from the request"
    )
    max_body_bytes: int = Field(
        default=1_048_576, ge=1024, le=64 * 1_048_576, description="request bodies larger than this get 413"
    )
    keygen_workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="threads for costly requests (RSA generation, key import checks, collateral import): at most "
        "this many run at once, so that they cannot take the cores transfers need",
    )
    transfer_threads: int = Field(
        default=4,
        ge=1,
        le=256,
        description="threads key transfers run on (verification, the backend read, the database write): more only "
        "help with slow remote backends, and contend for the interpreter; a transfer that cannot start within 2 s "
        "gets 503 server_busy",
    )
    costly_queue: int = Field(
        default=64, ge=1, le=100_000, description="costly requests waiting for those threads; more get 503 server_busy"
    )
    workers: int = Field(default=1, ge=1, le=64, description="server processes (use the cores; SQLite or PostgreSQL)")
    role: Literal["all", "kbs", "attestation"] = Field(
        default="all",
        description="what this process serves: everything, the KBS only (with attestation.url) or the attestation "
        "service only; --role on the command line",
    )
    max_header_bytes: int = Field(
        default=65_536, ge=1024, le=1_048_576, description="request line and headers larger than this get 431"
    )
    header_timeout_seconds: float = Field(
        default=10.0,
        ge=0.1,
        le=300,
        description="a connection whose TLS handshake or request headers take longer is closed (slow clients)",
    )

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        parse_listen(value)
        return value

    @property
    def host(self) -> str:
        return parse_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return parse_listen(self.listen)[1]


class SecretSource(Section):
    """Where a credential comes from: an environment variable (by name) or a file (mode 0600). Never the TOML file
    itself, so that configuration can be shared and committed without secrets."""

    env: str | None = Field(default=None, description="name of the environment variable holding it")
    file: Path | None = Field(default=None, description="file holding it (trailing newline ignored)")

    @model_validator(mode="after")
    def _one(self) -> SecretSource:
        if (self.env is None) == (self.file is None):
            raise ValueError("give exactly one of env or file")
        return self


DATABASE_SCHEMES = {"sqlite": "sqlite", "postgresql": "postgresql+psycopg", "postgresql+psycopg": "postgresql+psycopg"}


class DatabaseSettings(Section):
    """SQLite in the data directory (one host), or a PostgreSQL database shared by several replicas."""

    url: str | None = Field(
        default=None,
        description="sqlite:///PATH or postgresql://USER@HOST:PORT/DB (default: SQLite in the data directory)",
    )
    password: SecretSource | None = Field(
        default=None, description="the database password, from {env = ...} or {file = ...} (not in the url)"
    )
    connect_timeout_seconds: float = Field(default=5.0, gt=0, le=60, description="connecting to PostgreSQL")
    statement_timeout_seconds: float = Field(
        default=8.0, gt=0, le=600, description="one statement on PostgreSQL (lock waits included)"
    )

    @field_validator("url")
    @classmethod
    def _known_database(cls, value: str | None) -> str | None:
        if value is None:
            return None
        scheme = value.partition("://")[0].lower()
        if scheme not in DATABASE_SCHEMES:
            raise ValueError(f"database.url must be sqlite:/// or postgresql://, not {scheme}://")
        return DATABASE_SCHEMES[scheme] + value[len(scheme) :]


def check_url(value: str) -> None:
    from urllib.parse import urlsplit

    parts = urlsplit(value)
    if "@" in parts.netloc:  # (checked first: the message must not echo a password)
        raise ValueError(
            "must not hold a user name or password (user:pass@host): the URL is shown by 'config check', in "
            "'backends check' and in errors; credentials go in auth, from an env or a file source"
        )
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError(f"must be an http(s) URL, got {value!r}")
    if parts.scheme == "http" and parts.hostname not in {"127.0.0.1", "localhost", "::1"}:
        raise ValueError("plain http is only allowed to a loopback address; use https")


class KeySettings(Section):
    """Where new keys go, and how interrupted key writes are finished."""

    default_backend: str = Field(
        default="embedded", description="the backend (a name under [backends]) of keys created without one"
    )
    reconcile_after_seconds: int = Field(
        default=600, ge=0, description="finish key writes interrupted at least this long ago (crash, KMS down)"
    )
    reconcile_interval_seconds: int = Field(
        default=60, ge=1, description="how often the server looks for interrupted key writes to finish"
    )


def _default_names() -> list[str]:
    import socket

    names = ["localhost", "127.0.0.1", "::1"]
    host = socket.gethostname()
    return [*names, host] if host and host not in names else names


class TlsSettings(Section):
    """HTTPS by default, with a certificate from the service CA. Plain HTTP only with ``enabled = false``."""

    enabled: bool = Field(default=True, description="false: plain HTTP, with a warning at every start")
    san: list[str] = Field(
        default_factory=_default_names,
        min_length=1,
        description="names of this replica's certificate from the service CA",
        json_schema_extra={"shown_default": '["localhost", "127.0.0.1", "::1", HOST NAME]'},
    )
    server_cert_days: int = Field(
        default=365, ge=1, le=825, description="lifetime of that certificate (renewed 30 days before it expires)"
    )
    cert_file: Path | None = Field(default=None, description="your own certificate chain (PEM) instead")
    key_file: Path | None = Field(default=None, description="the private key (PEM) of cert_file")
    key_password: SecretStr | None = Field(
        default=None, description="the password of an encrypted key_file (better in the environment than the file)"
    )

    @model_validator(mode="after")
    def _own_pair(self) -> TlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class AuthSettings(Section):
    """Bearer tokens' lifetimes."""

    default_token_ttl_days: int = Field(
        default=30, ge=1, le=366, description="lifetime of a token created without --ttl"
    )
    admin_token_ttl_days: int = Field(
        default=365, ge=1, le=366, description="lifetime of the admin token that init prints (--new-admin-token too)"
    )


class AttestationSettings(Section):
    """The attestation service: trust anchors, nonce and token lifetimes, the collateral source."""

    simulated_root: Path | None = Field(
        default=None, description="trust quotes of the simulated TEE signed under this root (development only)"
    )
    nonce_ttl_seconds: int = Field(
        default=300, ge=10, le=3600, description="how long a nonce (transfer or appraisal) may be used, once"
    )
    token_ttl_seconds: int = Field(default=300, ge=10, le=3600, description="lifetime of an attestation token")
    upstream_url: str | None = Field(default=None, description="Intel PCS or a PCCS, for collateral not cached")
    upstream_api_key: SecretStr | None = Field(
        default=None, description="Intel PCS subscription key (better in the environment than the file)"
    )
    upstream_ca_file: Path | None = Field(default=None, description="CA to verify the upstream (default: system)")
    upstream_timeout_seconds: float = Field(
        default=10.0, gt=0, le=120, description="one request to the upstream (retried)"
    )
    refresh_before_seconds: int = Field(default=86400, ge=60, description="refresh items this long before expiry")
    refresh_interval_seconds: int = Field(
        default=3600, ge=10, description="how often the cached collateral is checked for items to refresh"
    )
    url: str | None = Field(
        default=None, description="a separate keybroker attestation service that verifies for this KBS"
    )
    url_ca_file: Path | None = Field(default=None, description="CA of that attestation service (its DATA_DIR/ca.pem)")


class LimitsSettings(Section):
    """Abuse limits, per client address and per server process (see the README's "Limits")."""

    unauthenticated_rps: float = Field(
        default=50, gt=0, le=1_000_000, description="requests/s per address without a valid token (token bucket)"
    )
    unauthenticated_burst: int = Field(
        default=100, ge=1, le=10_000_000, description="requests at once above that rate (the bucket's size)"
    )
    transfer_rps: float = Field(
        default=5000,
        gt=0,
        le=1_000_000,
        description="requests/s per address to the attested endpoints (transfer, appraisal nonce/attest): a "
        "cluster scaling up behind one NAT address must not be starved",
    )
    transfer_burst: int = Field(
        default=10_000, ge=1, le=10_000_000, description="requests at once above transfer_rps (the bucket's size)"
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        max_length=256,
        description="addresses or networks (CIDR) whose X-Forwarded-For is believed; nobody's by default",
    )
    audit_window_seconds: int = Field(
        default=60, ge=1, le=86_400, description="anonymous refusals are audited as one entry per address and window"
    )
    max_connections_per_address: int = Field(
        default=256,
        ge=1,
        le=1_000_000,
        description="open connections per client address, counted before TLS (trusted proxies are exempt)",
    )

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, values: list[str]) -> list[str]:
        import ipaddress

        for value in values:
            try:
                ipaddress.ip_network(value, strict=False)
            except ValueError:
                raise ValueError(f"{value!r} is not an IP address or network") from None
        return values


class LoggingSettings(Section):
    """The log on stderr: one line per request, with the request id that error responses carry."""

    level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="the least severe logged")
    format: Literal["json", "console"] = Field(
        default="json", description="JSON lines (for the journal or a collector), or readable lines for a terminal"
    )


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"listen must be HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)
