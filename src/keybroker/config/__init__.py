"""Settings: one TOML file plus ``KEYBROKER_*`` environment variables, loaded once and passed in.

Precedence (highest first): explicit overrides (CLI flags) > environment > TOML file > defaults. Nested keys use a
double underscore in the environment: ``[server] listen`` is ``KEYBROKER_SERVER__LISTEN``. Relative paths are
resolved against the data directory. Nothing in keybroker reads configuration anywhere but here.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from sqlalchemy.engine import make_url

from keybroker.errors import ConfigurationError

CONFIG_FILE_NAME = "keybroker.toml"
DEFAULT_LISTEN = "127.0.0.1:9443"


# The TOML values of the load_settings() call in progress; a context variable rather than a module global so that
# concurrent loads (tests) cannot see each other's file.
_file_values: ContextVar[dict[str, Any]] = ContextVar("keybroker_config_file_values", default={})  # noqa: B039


class _TomlValues(PydanticBaseSettingsSource):
    """The configuration file, below the environment in precedence."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return _file_values.get().get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_file_values.get())


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Section):
    listen: str = DEFAULT_LISTEN
    public_url: str | None = Field(
        default=None, description="Base URL clients use (for transfer_link); default: from the request"
    )
    max_body_bytes: int = Field(default=1_048_576, ge=1024, le=64 * 1_048_576)
    keygen_workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="threads for costly requests (RSA generation, key import checks, collateral import): at most "
        "this many run at once, so that they cannot take the cores transfers need",
    )
    costly_queue: int = Field(
        default=64, ge=1, le=100_000, description="costly requests waiting for those threads; more get 503 server_busy"
    )
    workers: int = Field(default=1, ge=1, le=64, description="server processes (use the cores; SQLite or PostgreSQL)")
    role: Literal["all", "kbs", "attestation"] = "all"
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


class DatabaseSettings(_Section):
    url: str | None = Field(default=None, description="SQLAlchemy URL; default: SQLite in the data directory")


class SecretSource(_Section):
    """Where a credential comes from: an environment variable (by name) or a file (mode 0600). Never the TOML file
    itself, so that configuration can be shared and committed without secrets."""

    env: str | None = Field(default=None, description="name of the environment variable holding it")
    file: Path | None = Field(default=None, description="file holding it (trailing newline ignored)")

    @model_validator(mode="after")
    def _one(self) -> SecretSource:
        if (self.env is None) == (self.file is None):
            raise ValueError("give exactly one of env or file")
        return self


class LocalWrapperSettings(_Section):
    """KEK held locally: a 32-byte master key from a file (mode 0600) or from the environment."""

    type: Literal["local"] = "local"
    master_key_file: Path = Path("master.key")
    master_key: SecretStr | None = Field(
        default=None,
        description="base64 32-byte KEK; set it via KEYBROKER_BACKENDS__<NAME>__WRAPPER__MASTER_KEY",
    )


class VaultAuthSettings(_Section):
    """Vault/OpenBao authentication: a token, or an AppRole login (renewed, and repeated when renewal fails)."""

    method: Literal["token", "approle"] = "token"
    token: SecretSource | None = Field(default=None, description="method=token: where the token is")
    role_id: str | None = Field(default=None, description="method=approle: the role id (not secret)")
    secret_id: SecretSource | None = Field(default=None, description="method=approle: where the secret id is")
    approle_mount: str = "approle"

    @model_validator(mode="after")
    def _complete(self) -> VaultAuthSettings:
        if self.method == "token" and self.token is None:
            raise ValueError("method token needs token = {env = ...} or {file = ...}")
        if self.method == "approle" and (self.role_id is None or self.secret_id is None):
            raise ValueError("method approle needs role_id and secret_id")
        return self


class VaultConnectionSettings(_Section):
    url: str = Field(description="https://vault.example:8200 (http:// only on loopback)")
    ca_file: Path | None = Field(
        default=None,
        description="CA bundle to verify Vault's certificate (default: certifi's bundle, or REQUESTS_CA_BUNDLE)",
    )
    namespace: str | None = None
    timeout_seconds: float = Field(default=5.0, gt=0, le=120)
    auth: VaultAuthSettings

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        _check_url(value)
        return value.rstrip("/")


class TransitWrapperSettings(VaultConnectionSettings):
    """KEK held in Vault/OpenBao Transit: data keys are encrypted and decrypted there; no master key on this host."""

    type: Literal["vault-transit"]
    mount: str = "transit"
    key_name: str = "keybroker-kek"


class Pkcs11WrapperSettings(_Section):
    """KEK held in a PKCS#11 token (an HSM; SoftHSM2 in tests) as a non-extractable AES-256 key."""

    type: Literal["pkcs11"]
    module: Path = Field(description="the PKCS#11 library, e.g. /usr/lib/softhsm/libsofthsm2.so")
    token_label: str
    key_label: str = "keybroker-kek"
    pin: SecretSource = Field(description="the user PIN: {env = ...} or {file = ...}")
    sessions: int = Field(default=4, ge=1, le=64, description="session pool size")


def _type_or(default: str) -> Callable[[Any], str]:
    """A discriminator reading ``type``, ``default`` when it is left out: the local KEK and the embedded backend
    need no ``type``, so that one environment variable such as KEYBROKER_BACKENDS__EMBEDDED__WRAPPER__MASTER_KEY
    is a complete backend definition."""

    def discriminate(value: Any) -> str:
        if isinstance(value, dict):
            return str(value.get("type", default))
        return str(getattr(value, "type", ""))

    return discriminate


WrapperSettings = Annotated[
    Annotated[LocalWrapperSettings, Tag("local")]
    | Annotated[TransitWrapperSettings, Tag("vault-transit")]
    | Annotated[Pkcs11WrapperSettings, Tag("pkcs11")],
    Discriminator(_type_or("local")),
]


class EmbeddedBackendSettings(_Section):
    type: Literal["embedded"] = "embedded"
    wrapper: WrapperSettings = LocalWrapperSettings()


class VaultBackendSettings(VaultConnectionSettings):
    """Key material in a Vault/OpenBao KV engine, one secret per key at ``<mount>/<path_prefix><key id>``."""

    type: Literal["vault"]
    mount: str = "keybroker"
    kv_version: Literal[1, 2] = 1
    path_prefix: str = ""


class KmipBackendSettings(_Section):
    """Key material in a KMIP server, over mutual TLS."""

    type: Literal["kmip"]
    host: str
    port: int = Field(default=5696, ge=1, le=65535)
    cert_file: Path = Field(description="client certificate (clientAuth); its CN is the KMIP owner")
    key_file: Path
    ca_file: Path = Field(description="CA that signed the KMIP server's certificate")
    timeout_seconds: float = Field(default=5.0, gt=0, le=120)
    connections: int = Field(default=4, ge=1, le=64, description="connection pool size")


BackendSettings = Annotated[
    Annotated[EmbeddedBackendSettings, Tag("embedded")]
    | Annotated[VaultBackendSettings, Tag("vault")]
    | Annotated[KmipBackendSettings, Tag("kmip")],
    Discriminator(_type_or("embedded")),
]


def _default_backends() -> dict[str, BackendSettings]:
    return {"embedded": EmbeddedBackendSettings()}


def _check_url(value: str) -> None:
    from urllib.parse import urlsplit

    parts = urlsplit(value)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError(f"must be an http(s) URL, got {value!r}")
    if parts.scheme == "http" and parts.hostname not in {"127.0.0.1", "localhost", "::1"}:
        raise ValueError("plain http is only allowed to a loopback address; use https")


class KeySettings(_Section):
    default_backend: str = "embedded"
    reconcile_after_seconds: int = Field(
        default=600, ge=0, description="finish key writes interrupted at least this long ago (crash, KMS down)"
    )
    reconcile_interval_seconds: int = Field(default=60, ge=1)


class TlsSettings(_Section):
    """HTTPS by default, with a certificate from the service CA. Plain HTTP only with ``enabled = false``."""

    enabled: bool = True
    san: list[str] = Field(default_factory=lambda: ["localhost", "127.0.0.1", "::1"], min_length=1)
    server_cert_days: int = Field(default=365, ge=1, le=825)
    cert_file: Path | None = Field(default=None, description="your own certificate chain (PEM) instead")
    key_file: Path | None = None
    key_password: SecretStr | None = None

    @model_validator(mode="after")
    def _own_pair(self) -> TlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class AuthSettings(_Section):
    default_token_ttl_days: int = Field(default=30, ge=1, le=366)
    admin_token_ttl_days: int = Field(default=365, ge=1, le=366)


class AttestationSettings(_Section):
    """The attestation service: trust anchors, nonce and token lifetimes, the collateral source."""

    simulated_root: Path | None = Field(
        default=None, description="trust quotes of the simulated TEE signed under this root (development only)"
    )
    nonce_ttl_seconds: int = Field(default=300, ge=10, le=3600)
    token_ttl_seconds: int = Field(default=300, ge=10, le=3600)
    upstream_url: str | None = Field(default=None, description="Intel PCS or a PCCS, for collateral not cached")
    upstream_api_key: SecretStr | None = None
    upstream_ca_file: Path | None = Field(default=None, description="CA to verify the upstream (default: system)")
    upstream_timeout_seconds: float = Field(default=10.0, gt=0, le=120)
    refresh_before_seconds: int = Field(default=86400, ge=60, description="refresh items this long before expiry")
    refresh_interval_seconds: int = Field(default=3600, ge=10)
    url: str | None = Field(
        default=None, description="a separate keybroker attestation service that verifies for this KBS"
    )
    url_ca_file: Path | None = Field(default=None, description="CA of that attestation service (its DATA_DIR/ca.pem)")


class LimitsSettings(_Section):
    """Abuse limits, per client address and per server process (see the README's "Limits")."""

    unauthenticated_rps: float = Field(
        default=50, gt=0, le=1_000_000, description="requests/s per address without a valid token (token bucket)"
    )
    unauthenticated_burst: int = Field(default=100, ge=1, le=10_000_000)
    transfer_rps: float = Field(
        default=5000,
        gt=0,
        le=1_000_000,
        description="requests/s per address to the attested endpoints (transfer, appraisal nonce/attest): a "
        "cluster scaling up behind one NAT address must not be starved",
    )
    transfer_burst: int = Field(default=10_000, ge=1, le=10_000_000)
    trusted_proxies: list[str] = Field(
        default_factory=list,
        max_length=256,
        description="addresses or networks (CIDR) whose X-Forwarded-For is believed; nobody's by default",
    )
    audit_window_seconds: int = Field(
        default=60, ge=1, le=86_400, description="anonymous refusals are audited as one entry per address and window"
    )
    max_connections_per_address: int = Field(default=256, ge=1, le=1_000_000)

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


class LoggingSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"


@dataclass(frozen=True)
class SecretReader:
    """Files and credentials of the configuration: relative paths are taken from the data directory; a credential
    comes from an environment variable or a file of keybroker's user that nobody else may read."""

    data_dir: Path

    def resolve(self, path: Path) -> Path:
        """A configured path, relative ones taken from the data directory."""
        return path if path.is_absolute() else self.data_dir / path

    def read(self, source: SecretSource, what: str) -> str:
        """The credential ``source`` points at. Raises ``ConfigurationError`` naming ``what`` and where it looked,
        never the value; a file readable by group or others is refused."""
        if source.env is not None:
            value = os.environ.get(source.env)
            if not value:
                raise ConfigurationError(f"{what}: environment variable {source.env} is not set")
            return value
        assert source.file is not None
        path = self.resolve(source.file)
        try:
            # The mode and owner of the file actually read (fstat of the open file, not a stat before opening).
            with path.open("rb") as handle:
                status = os.fstat(handle.fileno())
                raw = handle.read(65536)
        except OSError as exc:
            raise ConfigurationError(f"{what}: cannot read {path}: {exc.strerror}") from None
        if status.st_mode & 0o077:
            raise ConfigurationError(f"{what}: {path} is readable by others; chmod 600 it")
        if status.st_uid not in {os.geteuid(), 0}:
            raise ConfigurationError(f"{what}: {path} belongs to another user; keybroker's user must own it")
        try:
            value = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise ConfigurationError(f"{what}: {path} is not UTF-8 text") from None
        if not value:
            raise ConfigurationError(f"{what}: {path} is empty")
        return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="KEYBROKER_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    data_dir: Path = Path(".data")
    server: ServerSettings = ServerSettings()
    database: DatabaseSettings = DatabaseSettings()
    keys: KeySettings = KeySettings()
    backends: dict[str, BackendSettings] = Field(default_factory=_default_backends)
    tls: TlsSettings = TlsSettings()
    auth: AuthSettings = AuthSettings()
    attestation: AttestationSettings = AttestationSettings()
    limits: LimitsSettings = LimitsSettings()
    logging: LoggingSettings = LoggingSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _TomlValues(settings_cls))

    @field_validator("data_dir")
    @classmethod
    def _absolute_data_dir(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        if not self.backends:
            raise ValueError("at least one backend must be configured")
        if self.keys.default_backend not in self.backends:
            raise ValueError(
                f"keys.default_backend {self.keys.default_backend!r} is not among the configured backends "
                f"({', '.join(sorted(self.backends))})"
            )
        return self

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{self.data_dir / 'keybroker.db'}"

    @property
    def secrets(self) -> SecretReader:
        """What a backend needs to find its files and credentials, without the rest of the settings."""
        return SecretReader(self.data_dir)

    def resolve(self, path: Path) -> Path:
        """A configured path, relative ones taken from the data directory."""
        return self.secrets.resolve(path)

    def read_secret(self, source: SecretSource, what: str) -> str:
        """The credential ``source`` points at (``SecretReader.read``)."""
        return self.secrets.read(source, what)

    def redacted(self) -> dict[str, Any]:
        """The effective settings for display: secrets shown as ``**********``, database passwords hidden."""
        shown = self.model_dump(mode="json")
        if self.database.url:
            shown["database"]["url"] = make_url(self.database.url).render_as_string(hide_password=True)
        return shown


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"listen must be HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def load_settings(
    data_dir: Path | None = None,
    config_file: Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> Settings:
    """Load and validate the settings once. Raises ``ConfigurationError`` with every problem listed.

    ``config_file`` defaults to ``DATA_DIR/keybroker.toml`` when that file exists.
    """
    file_values: dict[str, Any] = {}
    path = config_file
    if path is None and data_dir is not None and (data_dir / CONFIG_FILE_NAME).is_file():
        path = data_dir / CONFIG_FILE_NAME
    if path is not None:
        try:
            file_values = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigurationError(f"configuration file {path} does not exist") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigurationError(f"{path}: not valid TOML: {exc}") from None
    _check_environment_names()
    values = dict(overrides or {})
    if data_dir is not None:
        values["data_dir"] = data_dir
    token = _file_values.set(file_values)
    try:
        return Settings(**values)
    except ValidationError as exc:
        raise ConfigurationError(_describe(exc, path)) from None
    finally:
        _file_values.reset(token)


# KEYBROKER_* variables that belong to the CLI, not to the service's settings.
CLIENT_VARIABLES = frozenset(
    {"KEYBROKER_ADDR", "KEYBROKER_TOKEN", "KEYBROKER_CACERT", "KEYBROKER_CA_FINGERPRINT", "KEYBROKER_CONFIG"}
)


def _check_environment_names() -> None:
    """pydantic-settings ignores variables it has no field for; a misspelt KEYBROKER_SERVR__LISTEN must not fall back
    to the default silently, so unknown top-level names are errors (nested typos are caught by validation)."""
    known = set(Settings.model_fields)
    unknown = sorted(
        name
        for name in os.environ
        if name.upper().startswith("KEYBROKER_")
        and name.upper() not in CLIENT_VARIABLES
        and name[len("KEYBROKER_") :].split("__")[0].lower() not in known
    )
    if unknown:
        raise ConfigurationError(
            f"unknown setting(s) in the environment: {', '.join(unknown)} (known sections: {', '.join(sorted(known))})"
        )


def _describe(exc: ValidationError, path: Path | None) -> str:
    where = f" (file {path} and KEYBROKER_* environment)" if path else " (KEYBROKER_* environment)"
    lines = [f"invalid configuration{where}:"]
    for error in exc.errors(include_input=False, include_url=False):
        location = ".".join(str(part) for part in error["loc"]) or "(root)"
        lines.append(f"  {location}: {error['msg']}")
    return "\n".join(lines)
