"""Settings: one TOML file plus ``KEYBROKER_*`` environment variables, loaded once and passed in.

Precedence (highest first): explicit overrides (CLI flags) > environment > TOML file > defaults. Nested keys use a
double underscore in the environment: ``[server] listen`` is ``KEYBROKER_SERVER__LISTEN``. Relative paths are
resolved against the data directory. A variable that a ``{ env = "VAR" }`` secret source names is that secret's,
never a setting (``environment.py``). Nothing in keybroker reads configuration anywhere but here. Every setting is
listed in docs/configuration.md, generated from these models (``python -m keybroker.config.reference``).
"""

from __future__ import annotations

import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from pydantic import (
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError
from sqlalchemy.engine import make_url

from keybroker.config.backends import (
    BackendSettings,
    EmbeddedBackendSettings,
    KmipBackendSettings,
    LocalWrapperSettings,
    Pkcs11WrapperSettings,
    TransitWrapperSettings,
    VaultAuthSettings,
    VaultBackendSettings,
    VaultConnectionSettings,
    WrapperSettings,
    default_backends,
)
from keybroker.config.environment import (
    CLIENT_VARIABLES,
    EnvironmentSource,
    check_environment_names,
    secret_variables,
    unparsable,
)
from keybroker.config.secrets import SecretReader
from keybroker.config.sections import (
    DEFAULT_LISTEN,
    AttestationSettings,
    AuthSettings,
    DatabaseSettings,
    KeySettings,
    LimitsSettings,
    LoggingSettings,
    SecretSource,
    ServerSettings,
    TlsSettings,
    parse_listen,
)
from keybroker.errors import ConfigurationError

CONFIG_FILE_NAME = "keybroker.toml"


# The TOML values of the load_settings() call in progress; a context variable rather than a module global so that
# concurrent loads (tests) cannot see each other's file.
_file_values: ContextVar[dict[str, Any]] = ContextVar("keybroker_config_file_values", default={})  # noqa: B039 - never mutated
# The variables that secret sources name in that load: the environment source skips them.
_secret_names: ContextVar[frozenset[str]] = ContextVar("keybroker_config_secret_names", default=frozenset())


class _TomlValues(PydanticBaseSettingsSource):
    """The configuration file, below the environment in precedence."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return _file_values.get().get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_file_values.get())


class Settings(BaseSettings):
    """The settings outside any table."""

    model_config = SettingsConfigDict(
        env_prefix="KEYBROKER_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    data_dir: Path = Field(
        default=Path(".data"),
        description="keybroker's own files: the SQLite database, master.key, ca.pem, the TLS certificate (mode 0700); "
        "relative paths in the settings are taken from it; --data-dir on the command line",
    )
    server: ServerSettings = ServerSettings()
    database: DatabaseSettings = DatabaseSettings()
    keys: KeySettings = KeySettings()
    backends: dict[str, BackendSettings] = Field(
        default_factory=default_backends,
        description="where key material lives, by name; [backends] in the file replaces the default, one embedded "
        "backend with the local KEK",
    )
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
        return (init_settings, EnvironmentSource(settings_cls, _secret_names.get()), _TomlValues(settings_cls))

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
        """The URL to connect with: the configured one (its password from ``database.password``, never logged),
        or SQLite in the data directory."""
        if not self.database.url:
            return f"sqlite:///{self.data_dir / 'keybroker.db'}"
        if self.database.password is None:
            return self.database.url
        password = self.read_secret(self.database.password, "database password")
        return make_url(self.database.url).set(password=password).render_as_string(hide_password=False)

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
            url = make_url(self.database.url)
            hidden = {name: "***" for name in url.query if name.lower() in _QUERY_SECRETS}  # (?password=...)
            shown["database"]["url"] = url.update_query_dict(hidden).render_as_string(hide_password=True)
        return shown


# Query parameters of a database URL that hold a secret (libpq reads password= there, as in the userinfo).
_QUERY_SECRETS = frozenset({"password", "sslpassword"})


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
    values = dict(overrides or {})
    secrets = secret_variables(Settings, file_values, values)
    check_environment_names(Settings, secrets)
    if data_dir is not None:
        values["data_dir"] = data_dir
    file_token = _file_values.set(file_values)
    secrets_token = _secret_names.set(frozenset(secrets))
    try:
        return Settings(**values)
    except ValidationError as exc:
        raise ConfigurationError(_describe(exc, path)) from None
    except SettingsError as exc:
        raise ConfigurationError(unparsable(exc)) from None
    finally:
        _secret_names.reset(secrets_token)
        _file_values.reset(file_token)


def _describe(exc: ValidationError, path: Path | None) -> str:
    where = f" (file {path} and KEYBROKER_* environment)" if path else " (KEYBROKER_* environment)"
    lines = [f"invalid configuration{where}:"]
    for error in exc.errors(include_input=False, include_url=False):
        location = ".".join(str(part) for part in error["loc"]) or "(root)"
        lines.append(f"  {location}: {error['msg']}")
    return "\n".join(lines)


__all__ = [
    "CLIENT_VARIABLES",
    "CONFIG_FILE_NAME",
    "DEFAULT_LISTEN",
    "AttestationSettings",
    "AuthSettings",
    "BackendSettings",
    "DatabaseSettings",
    "EmbeddedBackendSettings",
    "KeySettings",
    "KmipBackendSettings",
    "LimitsSettings",
    "LocalWrapperSettings",
    "LoggingSettings",
    "Pkcs11WrapperSettings",
    "SecretReader",
    "SecretSource",
    "ServerSettings",
    "Settings",
    "TlsSettings",
    "TransitWrapperSettings",
    "VaultAuthSettings",
    "VaultBackendSettings",
    "VaultConnectionSettings",
    "WrapperSettings",
    "load_settings",
    "parse_listen",
]
