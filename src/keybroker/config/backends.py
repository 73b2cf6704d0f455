"""The ``[backends.<name>]`` sections: where key material lives and which KEK protects it, and where their
credentials come from (``SecretSource``: never the TOML file itself)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, SecretStr, Tag, field_validator, model_validator

from keybroker.config.sections import SecretSource, Section, check_url


class LocalWrapperSettings(Section):
    """KEK held locally: a 32-byte master key from a file (mode 0600) or from the environment."""

    type: Literal["local"] = Field(default="local", description="the KEK is local")
    master_key_file: Path = Field(
        default=Path("master.key"),
        description="the 32 bytes themselves (not base64), mode 0600; created by init on SQLite when missing",
    )
    master_key: SecretStr | None = Field(
        default=None,
        description="the 32-byte KEK in base64, instead of master_key_file (better in the environment than the file)",
    )

    @field_validator("master_key")
    @classmethod
    def _master_key(cls, value: SecretStr | None) -> SecretStr | None:
        """32 bytes in base64, as serve reads it; the message never holds the value (nor a part of it)."""
        if value is None or not value.get_secret_value():  # (unset, or set empty: as before, for init's checks)
            return value
        import base64
        import binascii

        try:
            length = len(base64.b64decode(value.get_secret_value(), validate=True))
        except (binascii.Error, ValueError):
            raise ValueError("master_key is not valid base64 (give the 32-byte KEK in base64)") from None
        if length != 32:  # (AES-256: backends.local_kek.MASTER_KEY_BYTES, a layer below)
            raise ValueError(f"master_key is {length} bytes once decoded from base64, not 32")
        return value


class VaultAuthSettings(Section):
    """Vault/OpenBao authentication: a token, or an AppRole login (renewed, and repeated when renewal fails)."""

    method: Literal["token", "approle"] = Field(default="token", description="how keybroker logs in")
    token: SecretSource | None = Field(default=None, description="method=token: where the token is")
    role_id: str | None = Field(default=None, description="method=approle: the role id (not secret)")
    secret_id: SecretSource | None = Field(default=None, description="method=approle: where the secret id is")
    approle_mount: str = Field(default="approle", description="method=approle: where the AppRole auth is mounted")

    @model_validator(mode="after")
    def _complete(self) -> VaultAuthSettings:
        if self.method == "token" and self.token is None:
            raise ValueError("method token needs token = {env = ...} or {file = ...}")
        if self.method == "approle" and (self.role_id is None or self.secret_id is None):
            raise ValueError("method approle needs role_id and secret_id")
        return self


_NO_NODES = "addresses must list at least one node (or leave it out and give url)"


class VaultConnectionSettings(Section):
    """Where Vault/OpenBao is: one address (``url``), or the nodes of one cluster (``addresses``), whose active node
    keybroker finds and follows through a leader change, retrying for at most ``failover_seconds``."""

    url: str = Field(
        description="https://vault.example:8200 (http:// only on loopback); with addresses: the node tried first "
        "(default: the first of them)"
    )
    addresses: list[str] | None = Field(
        default=None,
        description="the nodes of one Vault/OpenBao cluster (each like url): requests go to the active node, found "
        "through sys/health and sys/leader; a node that is down, sealed or a standby sends keybroker to another",
    )
    failover_seconds: float = Field(
        default=10.0,
        gt=0,
        le=120,
        description="with addresses: how long one operation may spend finding the active node and retrying before "
        "it reports the backend unavailable (plus at most one timeout_seconds for the request under way)",
    )
    ca_file: Path | None = Field(
        default=None,
        description="CA bundle to verify Vault's certificate (default: certifi's bundle, or REQUESTS_CA_BUNDLE)",
    )
    namespace: str | None = Field(default=None, description="the Vault Enterprise namespace of every request")
    timeout_seconds: float = Field(default=5.0, gt=0, le=120, description="one request to Vault/OpenBao")
    auth: VaultAuthSettings = Field(description="how keybroker logs in: token or AppRole")

    @model_validator(mode="before")
    @classmethod
    def _url_or_addresses(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("url") is None:
            addresses = data.get("addresses")
            if addresses is None:
                raise ValueError("give url (one Vault/OpenBao address) or addresses (the nodes of one cluster)")
            if isinstance(addresses, list | tuple) and not addresses:
                raise ValueError(_NO_NODES)
            if isinstance(addresses, list | tuple) and isinstance(addresses[0], str):
                data = {**data, "url": addresses[0]}
        return data

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        check_url(value)
        return value.rstrip("/")

    @field_validator("addresses")
    @classmethod
    def _addresses(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError(_NO_NODES)
        nodes: list[str] = []
        for address in value:
            check_url(address)
            node = address.rstrip("/")
            if node in nodes:
                raise ValueError(f"addresses lists {node} twice")
            nodes.append(node)
        return nodes

    @model_validator(mode="after")
    def _url_among_addresses(self) -> VaultConnectionSettings:
        if self.addresses is not None and self.url not in self.addresses:
            raise ValueError("url must be one of addresses (or leave it out: the first address is tried first)")
        return self

    @property
    def nodes(self) -> tuple[str, ...] | None:
        """The cluster's addresses, ``url`` first; None for a single address (no failover)."""
        if self.addresses is None:
            return None
        return (self.url, *(address for address in self.addresses if address != self.url))


class TransitWrapperSettings(VaultConnectionSettings):
    """KEK held in Vault/OpenBao Transit: data keys are encrypted and decrypted there; no master key on this host."""

    type: Literal["vault-transit"] = Field(description="the KEK is in Vault/OpenBao Transit")
    mount: str = Field(default="transit", description="where the Transit engine is mounted")
    key_name: str = Field(
        default="keybroker-kek", description="the Transit key (aes256-gcm96, created by init if missing)"
    )


class Pkcs11WrapperSettings(Section):
    """KEK held in a PKCS#11 token (an HSM; SoftHSM2 in tests) as a non-extractable AES-256 key."""

    type: Literal["pkcs11"] = Field(description="the KEK is in a PKCS#11 token")
    module: Path = Field(description="the PKCS#11 library, e.g. /usr/lib/softhsm/libsofthsm2.so")
    token_label: str = Field(description="the token's label")
    key_label: str = Field(
        default="keybroker-kek",
        description="the KEK's label in the token (a non-extractable AES-256 key, created by init if missing)",
    )
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


class EmbeddedBackendSettings(Section):
    """Key material in keybroker's database, each key sealed under its own data key, which the KEK wraps."""

    type: Literal["embedded"] = Field(default="embedded", description="the backend is the embedded store")
    wrapper: WrapperSettings = Field(
        default=LocalWrapperSettings(), description="the KEK, an inline table whose type says where it is"
    )


class VaultBackendSettings(VaultConnectionSettings):
    """Key material in a Vault/OpenBao KV engine, one secret per key at ``<mount>/<path_prefix><key id>``."""

    type: Literal["vault"] = Field(description="the backend is a Vault/OpenBao KV engine")
    mount: str = Field(default="keybroker", description="where the KV engine is mounted")
    kv_version: Literal[1, 2] = Field(default=1, description="the KV engine's version (2: writes use check-and-set)")
    path_prefix: str = Field(default="", description="put before each key id in the secret's path")


class KmipBackendSettings(Section):
    """Key material in a KMIP server, over mutual TLS."""

    type: Literal["kmip"] = Field(description="the backend is a KMIP server")
    host: str = Field(description="the KMIP server's host name (checked against its certificate)")

    port: int = Field(default=5696, ge=1, le=65535, description="the KMIP server's port")
    cert_file: Path = Field(description="client certificate (clientAuth); its CN is the KMIP owner")
    key_file: Path = Field(description="the private key (PEM) of cert_file")
    ca_file: Path = Field(description="CA that signed the KMIP server's certificate")
    timeout_seconds: float = Field(default=5.0, gt=0, le=120, description="one KMIP request")
    connections: int = Field(default=4, ge=1, le=64, description="connection pool size")

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        if "@" in value or "/" in value:  # (the message does not echo it: it may hold a password)
            raise ValueError(
                "host is a host name or address alone: no scheme or user:pass@ (KMIP's credentials are the client "
                "certificate, cert_file and key_file)"
            )
        return value


BackendSettings = Annotated[
    Annotated[EmbeddedBackendSettings, Tag("embedded")]
    | Annotated[VaultBackendSettings, Tag("vault")]
    | Annotated[KmipBackendSettings, Tag("kmip")],
    Discriminator(_type_or("embedded")),
]


def default_backends() -> dict[str, BackendSettings]:
    return {"embedded": EmbeddedBackendSettings()}
